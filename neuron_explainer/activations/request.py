"""What a debugger request asks for and what it returns (docs/engine.md §2): `SubRequest`,
`SubResult`, and the losses that define the direction of interest D."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from neuron_explainer.activations import node_types as _registered  # noqa: F401 (registers them)
from neuron_explainer.activations.derived_scalars import METRICS
from neuron_explainer.activations.nodes import (
    AttentionTraceType,
    NodeAblation,
    NodeIndex,
    NodeToTrace,
    NodeType,
    describe,
    node_types,
)
from neuron_explainer.activations.token_views import NodeTokenViews, ScoredToken

LossFn = Literal["logit_diff", "logit_minus_mean", "probs", "zero"]
LOSS_FNS: tuple[str, ...] = ("logit_diff", "logit_minus_mean", "probs", "zero")
# The node types of a table unless a request asks for latents: those that need no splice.
NODE_TYPES: tuple[NodeType, ...] = tuple(t for t in node_types() if describe(t).splice is None)
ComponentTypeForMlp = Literal["neuron", "autoencoder_latent"]
ComponentTypeForAttention = Literal["attention_head", "autoencoder_latent"]


@dataclass
class SubRequest:
    prompt: str | Sequence[int]
    target_tokens: Sequence[str | int] = ()
    distractor_tokens: Sequence[str | int] = ()
    loss_fn: LossFn = "logit_diff"
    node_ablations: Sequence[NodeAblation] = ()
    upstream_node_to_trace: NodeToTrace | None = None
    downstream_node_to_trace: NodeToTrace | None = None
    top_and_bottom_k: int = 10
    node_types: Sequence[NodeType] = NODE_TYPES
    # "autoencoder_latent": the latents of the MLP-side (attention-side) autoencoders join the node
    # types and replace the neurons (heads) of the layers that hold one; other layers keep theirs.
    component_type_for_mlp: ComponentTypeForMlp = "neuron"
    component_type_for_attention: ComponentTypeForAttention = "attention_head"
    metrics: Sequence[str] = METRICS
    token_views: bool = True
    token_view_k: int = 10
    # BOS before the prompt; None: the model's default for text (validation.resolve_prepend_bos).
    prepend_bos: bool | None = None
    # Further (node type, metric) scalars to compute without ranking them (read via `inspect`).
    extra_scalars: Sequence[tuple[NodeType, str]] = ()
    # Node types whose token views will be asked for beyond the table's (read via `inspect`).
    extra_view_types: Sequence[NodeType] = ()


@dataclass
class SubResult:
    tokens: list[int]
    token_strings: list[str]
    read_position: int  # where D is read (the last token, or the traced node's token)
    direction_value: float  # D
    bias_direct_effect: float  # direct effect of the layers' output biases before the cut
    nodes: list[NodeIndex]  # the union over sub-requests and metrics (same list in every result)
    metrics: dict[str, list[float | None]]  # metric -> value per node (None: not in this prompt)
    # node type -> metric -> per-token sum over all nodes at that token (heads: two views)
    token_sums: dict[str, dict[str, list[float]]]
    top_logits: list[ScoredToken]
    bottom_logits: list[ScoredToken]
    target_logits: list[ScoredToken]
    distractor_logits: list[ScoredToken]
    token_views: dict[NodeIndex, NodeTokenViews]
    trace_description: str | None = None


def loss_value(
    loss_fn: str, logits: torch.Tensor, targets: list[int], distractors: list[int]
) -> torch.Tensor:
    """D for one row from its logits [V] at the read position (docs/terminology.md)."""
    if loss_fn == "zero":
        return logits.sum().detach() * 0.0
    if loss_fn == "probs":
        return logits.softmax(-1)[targets].sum()
    target_mean = logits[targets].mean()
    if loss_fn == "logit_diff" and distractors:
        return target_mean - logits[distractors].mean()
    return target_mean - logits.mean()


def describe_trace(
    upstream: NodeToTrace | None, downstream: NodeToTrace | None, strings: list[str] | None
) -> str | None:
    """The question a trace asks, in words: "What caused mlp L5 #3 at ' Paris' (4)?"; through a
    head's value, "What drives the effect of attn L3 H1 at ... attending to ... through its value on
    the loss?"."""
    if upstream is None:
        return None

    def at(t: int) -> str:
        return f"{strings[t]!r} ({t})" if strings else f"({t})"

    def name(n: NodeToTrace) -> str:
        node = n.node
        desc = describe(node.node_type)
        if desc.per_token_pair:
            assert node.attended_token is not None
            return (
                f"{desc.short_name} L{node.layer} H{node.component} at {at(node.token)} "
                f"attending to {at(node.attended_token)}"
            )
        return f"{desc.short_name} L{node.layer} #{node.component} at {at(node.token)}"

    node = upstream.node
    desc = describe(node.node_type)
    if upstream.attention_trace_type == AttentionTraceType.VALUE:
        # D is the pair's direct effect through its value (the pattern fixed), not a pre-activation.
        onto = "the loss" if downstream is None else f"the pre-activation of {name(downstream)}"
        return f"What drives the effect of {name(upstream)} through its value on {onto}?"
    if desc.per_token_pair:
        assert node.attended_token is not None
        side = (upstream.attention_trace_type or "query_and_key").replace("_", " ")
        return (
            f"What caused {desc.short_name} L{node.layer} H{node.component} at {at(node.token)} "
            f"to attend to {at(node.attended_token)}, through the {side}?"
        )
    return f"What caused {name(upstream)}?"
