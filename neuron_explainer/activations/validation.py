"""Checking a debugger request against the model before anything runs.

Every check raises `RequestError` with a path relative to what it was given (`("layer",)` for a
node's layer); callers prefix where that value sits with `nodes.at(...)`, so an error names the
exact field: `(1, "node_ablations", 0, "node", "layer")`. `prepare_row` turns a valid sub-request
into the `Row` the pass runs on.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from neuron_explainer.activations.derived_scalars import METRICS
from neuron_explainer.activations.node_types.autoencoder_latents import HOW_TO_LOAD
from neuron_explainer.activations.nodes import (
    AttentionTraceType,
    NodeIndex,
    NodeToTrace,
    NodeType,
    PromptTooLongError,
    RequestError,
    at,
    by_api_name,
    describe,
    node_types,
)
from neuron_explainer.activations.request import LOSS_FNS, SubRequest
from neuron_explainer.models.autoencoders import AutoencoderSide
from neuron_explainer.models.tokenizer import Tokenizer
from neuron_explainer.models.tokenizer_files import TokenizerError
from neuron_explainer.models.transformer import HookedTransformer


@dataclass
class Row:
    """A validated sub-request, as the pass runs it."""

    request: SubRequest
    tokens: list[int]
    targets: list[int]
    distractors: list[int]
    cut: int  # residual write position D reads (2·n_layers for the loss)
    cut_hook: str  # the hook of the residual stream there
    upstream_token_limit: int  # nodes at later tokens are not upstream of D
    node_types: tuple[NodeType, ...]  # of the node table: the request's, with latents if asked


def token_id(model: HookedTransformer, value: str | int) -> int:
    """A token given as an id or as text that must be exactly one token."""
    if isinstance(value, int):
        if not 0 <= value < model.cfg.vocab_size:
            raise RequestError((), f"token id {value} is outside the vocabulary")
        return value
    if model.tokenizer is None:
        raise RequestError((), "this model has no tokenizer; give token ids")
    try:
        return model.tokenizer.single_token_id(value)
    except TokenizerError as e:
        raise RequestError((), str(e)) from e


# Unicode normalization (NFC) can compose at most 4 characters into one.
NORMALIZATION_SHRINK = 4


@functools.lru_cache(maxsize=8)
def longest_token_bytes(tokenizer: Tokenizer) -> int:
    """The most bytes one token of `tokenizer` stands for (81 for SmolLM2's, a run of spaces)."""
    longest = 1
    for token_id in range(tokenizer.vocab_size):
        try:
            longest = max(longest, len(tokenizer.token_bytes(token_id)))
        except TokenizerError:
            continue  # an id that names no token
    return longest


def resolve_prepend_bos(
    model: HookedTransformer, prompt: str | Sequence[int], prepend_bos: bool | None
) -> bool:
    """Whether BOS goes before the prompt: as asked, or where unset (None), the model's default
    for a text prompt (its tokenizer's `add_bos_token`: Gemma yes, GPT-2 and SmolLM2 no); token
    ids are taken as given."""
    if prepend_bos is not None:
        return prepend_bos
    return isinstance(prompt, str) and model.tokenizer is not None and model.tokenizer.add_bos_token


def check_prompt_size(
    model: HookedTransformer,
    prompt: str | Sequence[int],
    prepend_bos: bool | None,
    max_prompt_tokens: int,
) -> None:
    """Refuse, without tokenizing, a prompt that cannot fit in `max_prompt_tokens`: a token-id
    list longer than that, or a text longer than that many times the most characters a token
    can stand for (`NORMALIZATION_SHRINK` × the longest token's bytes), which encodes to more
    tokens. Cheap enough to run before a request waits for the model."""
    prepend_bos = resolve_prepend_bos(model, prompt, prepend_bos)
    limit = max_prompt_tokens - int(prepend_bos)
    if isinstance(prompt, str):
        if model.tokenizer is None:
            return  # prompt_tokens says so
        chars = limit * NORMALIZATION_SHRINK * longest_token_bytes(model.tokenizer)
        if len(prompt) > chars:
            raise PromptTooLongError(
                "prompt",
                f"{len(prompt):,} characters cannot fit in the maximum of {max_prompt_tokens} "
                f"tokens (at most {chars:,} characters could)",
            )
    elif len(prompt) > limit:
        raise PromptTooLongError(
            "prompt",
            f"{len(prompt) + int(prepend_bos)} tokens exceed the maximum of {max_prompt_tokens}",
        )


def check_finite_logits(
    model: HookedTransformer, logits: torch.Tensor, ablated: bool, direction: float = 0.0
) -> None:
    """Refuse a pass whose logits (or `D`) are not finite: the model's arithmetic overflowed (an
    ablation value too large for its dtype, or a prompt beyond what a float16 model can take).
    Nothing computed from such a pass means anything. `ablated`: the row has ablations."""
    if math.isfinite(direction) and bool(torch.isfinite(logits).all()):
        return
    dtype = str(model.dtype).removeprefix("torch.")
    if ablated:
        raise RequestError(
            "node_ablations",
            f"the model's {dtype} arithmetic overflowed under these ablations (its logits are "
            "not finite numbers): set smaller values",
        )
    raise RequestError(
        "prompt",
        f"the model's {dtype} arithmetic overflowed on this prompt (its logits are not finite "
        "numbers)" + ("; serve it in float32" if dtype != "float32" else ""),
    )


def prompt_tokens(model: HookedTransformer, req: SubRequest, max_prompt_tokens: int) -> list[int]:
    """The sub-request's prompt as token ids, validated (empty, too long, unknown ids)."""
    check_prompt_size(model, req.prompt, req.prepend_bos, max_prompt_tokens)
    if isinstance(req.prompt, str):
        if model.tokenizer is None:
            raise RequestError("prompt", "this model has no tokenizer")
        tokens = model.tokenizer.encode(req.prompt)
    else:
        with at("prompt"):
            tokens = [token_id(model, int(t)) for t in req.prompt]
    if resolve_prepend_bos(model, req.prompt, req.prepend_bos):
        if model.tokenizer is None or model.tokenizer.bos_token_id is None:
            raise RequestError("prepend_bos", "this tokenizer has no BOS token")
        tokens = [model.tokenizer.bos_token_id, *tokens]
    if not tokens:
        raise RequestError("prompt", "the prompt is empty")
    if len(tokens) > max_prompt_tokens:
        raise PromptTooLongError(
            "prompt", f"{len(tokens)} tokens exceed the maximum of {max_prompt_tokens}"
        )
    return tokens


def check_layer(model: HookedTransformer, node_type: NodeType, layer: int) -> None:
    """Raise a RequestError naming `layer` unless `node_type` has nodes in `layer`."""
    desc = describe(node_type)
    n_layers = 1 if desc.writes == "embedding" else model.cfg.n_layers
    if not 0 <= layer < n_layers:
        raise RequestError("layer", f"layer {layer} is out of range [0, {n_layers})")
    if desc.width(model, layer) == 0:
        raise RequestError(
            "layer", f"layer {layer} holds no {desc.label}s: {desc.availability(model)}"
        )


def check_component(model: HookedTransformer, node_type: NodeType, layer: int, index: int) -> None:
    """Raise a RequestError naming `component` unless the layer has component `index`."""
    width = describe(node_type).width(model, layer)
    if not 0 <= index < width:
        kind = "latent" if describe(node_type).splice is not None else "component"
        raise RequestError("component", f"{kind} {index} is out of range [0, {width})")


def validate_node(model: HookedTransformer, node: NodeIndex, n_tokens: int) -> None:
    if node.node_type not in node_types():
        raise RequestError("node_type", f"unknown node type {node.node_type!r}")
    check_layer(model, node.node_type, node.layer)
    if not 0 <= node.token < n_tokens:
        raise RequestError("token", f"token {node.token} is out of range for {n_tokens} tokens")
    check_component(model, node.node_type, node.layer, node.component)
    if node.attended_token is not None:
        if not describe(node.node_type).per_token_pair:
            raise RequestError("attended_token", "only attention heads have one")
        if not 0 <= node.attended_token <= node.token:
            raise RequestError(
                "attended_token",
                f"attended token {node.attended_token} must be in [0, {node.token}] (causal)",
            )


def validate_trace(
    model: HookedTransformer, trace: NodeToTrace, n_tokens: int, downstream: bool = False
) -> None:
    """A node to trace: one with a pre-activation; token-pair nodes name a key token and how the
    trace goes through the pair (a downstream node through its pre-activation only)."""
    with at("node"):
        validate_node(model, trace.node, n_tokens)
    desc = describe(trace.node.node_type)
    if desc.trace is None:
        raise RequestError(("node", "node_type"), f"{desc.label}s have no pre-activation to trace")
    through_value = trace.attention_trace_type == AttentionTraceType.VALUE
    if through_value and desc.trace.value is None:
        raise RequestError(
            "attention_trace_type", "tracing through the value is for attention heads"
        )
    if desc.per_token_pair:
        if trace.attention_trace_type is None:
            raise RequestError("attention_trace_type", "required for an attention head")
        if trace.node.attended_token is None:
            raise RequestError(("node", "attended_token"), "a traced head pair needs one")
    if downstream and through_value:
        raise RequestError(
            "attention_trace_type",
            "a downstream node is traced through its pre-activation: query, key or query_and_key",
        )


def trace_cut(model: HookedTransformer, trace: NodeToTrace | None) -> tuple[int, str]:
    """(write position, hook name) of the residual stream D reads: the end of the model, or just
    before the traced node (before its block for attention writers, between attention and MLP for
    MLP writers; before the block for both in parallel blocks, whose MLP reads resid_pre)."""
    n_layers = model.cfg.n_layers
    if trace is None:
        return 2 * n_layers, f"blocks.{n_layers - 1}.hook_resid_post"
    L = trace.node.layer
    if describe(trace.node.node_type).writes == "attention" or model.cfg.parallel_blocks:
        return 2 * L, f"blocks.{L}.hook_resid_pre"
    return 2 * L + 1, f"blocks.{L}.hook_resid_mid"


def table_node_types(model: HookedTransformer, req: SubRequest) -> tuple[NodeType, ...]:
    """The node types of a row's table: its node_types, plus the latents that replace neurons
    (heads) for component types "autoencoder_latent" (an error naming the field when the model
    holds no such autoencoder)."""
    types = list(req.node_types)
    for name, value, default, writes in (
        ("component_type_for_mlp", req.component_type_for_mlp, "neuron", "mlp"),
        (
            "component_type_for_attention",
            req.component_type_for_attention,
            "attention_head",
            "attention",
        ),
    ):
        if value not in (default, "autoencoder_latent"):
            raise RequestError(
                name, f"unknown component type {value!r}; use {default!r} or 'autoencoder_latent'"
            )
        if value == "autoencoder_latent":
            [latent] = [t for t in by_api_name(value) if describe(t).writes == writes]
            if not describe(latent).layers(model):
                raise RequestError(name, describe(latent).availability(model))
            types.append(latent)
    for t in types:
        if t not in node_types():
            raise RequestError("node_types", f"unknown node type {t!r}")
        if not describe(t).layers(model):
            raise RequestError("node_types", describe(t).availability(model))
    return tuple(dict.fromkeys(types))


def in_table(
    model: HookedTransformer, row_types: Sequence[NodeType], node_type: NodeType, layer: int
) -> bool:
    """Whether a row's table has `node_type` nodes in `layer`: False where a type the row asked
    for replaces them in that layer (latents replace their block's neurons or heads), and where
    the layer has none."""
    if describe(node_type).width(model, layer) == 0:
        return False
    return not any(
        describe(t).replaces == node_type and describe(t).width(model, layer) > 0 for t in row_types
    )


def prepare_row(model: HookedTransformer, req: SubRequest, max_prompt_tokens: int) -> Row:
    """Check one sub-request and resolve what the pass needs (paths relative to it)."""
    tokens = prompt_tokens(model, req, max_prompt_tokens)
    if req.loss_fn not in LOSS_FNS:
        raise RequestError("loss_fn", f"unknown loss {req.loss_fn!r}; use one of {LOSS_FNS}")
    if req.top_and_bottom_k < 0:
        raise RequestError("top_and_bottom_k", "must be >= 0")
    for m in req.metrics:
        if m not in METRICS:
            raise RequestError("metrics", f"unknown metric {m!r}; use {METRICS}")
    types = table_node_types(model, req)
    targets: list[int] = []
    distractors: list[int] = []
    for name, given, out in (
        ("target_tokens", req.target_tokens, targets),
        ("distractor_tokens", req.distractor_tokens, distractors),
    ):
        for i, t in enumerate(given):
            with at(name, i):
                out.append(token_id(model, t))
    up, down = req.upstream_node_to_trace, req.downstream_node_to_trace
    through_value = up is not None and up.attention_trace_type == AttentionTraceType.VALUE
    reads_loss = up is None or (through_value and down is None)
    if req.loss_fn != "zero" and reads_loss and not targets:
        raise RequestError("target_tokens", "at least one target token is needed")
    for i, abl in enumerate(req.node_ablations):
        with at("node_ablations", i, "node"):
            validate_node(model, abl.node, len(tokens))
    if down is not None and not through_value:
        raise RequestError(
            "downstream_node_to_trace",
            "a downstream node is only used when tracing an attention head through its value",
        )
    if up is not None:
        with at("upstream_node_to_trace"):
            validate_trace(model, up, len(tokens))
    if down is not None:
        with at("downstream_node_to_trace"):
            validate_trace(model, down, len(tokens), downstream=True)
    cut, cut_hook = trace_cut(model, up)
    limit = len(tokens) if up is None else up.node.token + 1
    if up is not None and down is not None and down.node.write_position <= up.node.write_position:
        raise RequestError(
            "downstream_node_to_trace",
            "the downstream node must be in a later layer than the traced head",
        )
    return Row(req, tokens, targets, distractors, cut, cut_hook, limit, types)


def resolve_api_node_type(
    model: HookedTransformer, api_name: str, layer: int, side: AutoencoderSide | None
) -> NodeType:
    """The node type the API names by `api_name` and, for autoencoder latents (one API name for
    two node types), `side`: when the side is left out, that of the layer's only autoencoder.
    RequestError naming `autoencoder_side` (a side on another node type, or needed to choose),
    `node_type` (no such nodes in the model) or `layer` (none in that layer)."""
    candidates = by_api_name(api_name)
    if not candidates:
        raise RequestError("node_type", f"unknown node type {api_name!r}")
    if side is not None:
        chosen = [t for t in candidates if describe(t).autoencoder_side == side]
        if not chosen:
            raise RequestError("autoencoder_side", "only autoencoder latents have one")
        return chosen[0]
    if len(candidates) == 1:
        return candidates[0]
    present = [t for t in candidates if describe(t).layers(model)]
    if not present:
        raise RequestError("node_type", f"no autoencoder is loaded ({HOW_TO_LOAD})")
    here = [t for t in present if describe(t).width(model, layer) > 0]
    if not here:
        held = sorted(
            (L, describe(t).autoencoder_side) for t in present for L in describe(t).layers(model)
        )
        where = ", ".join(f"{s}-side at layer {L}" for L, s in held)
        raise RequestError("layer", f"layer {layer} holds no autoencoder (loaded: {where})")
    if len(here) > 1:
        raise RequestError(
            "autoencoder_side",
            f"layer {layer} holds an MLP-side and an attention-side autoencoder: say which "
            "('mlp' or 'attention')",
        )
    return here[0]
