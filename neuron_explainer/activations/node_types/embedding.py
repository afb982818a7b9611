"""The embedding node: at token t, the token embedding (+ the learned position embedding, GPT-2),
one node per token with activation 1 (docs/engine.md §3).

| metric                 | embedding at t       |
|------------------------|----------------------|
| activation             | 1                    |
| write_magnitude        | ‖e[t]‖               |
| direct_effect          | e[t]·g[t]            |
| estimated_total_effect | e[t]·∂D/∂e[t]        |

Ablating it scales the embedding by the value (0 removes it); it has no pre-activation to trace.
"""

from __future__ import annotations

import torch

from neuron_explainer.activations.derived_scalars import PassState, derived_scalar
from neuron_explainer.activations.nodes import (
    Ablation,
    NodeIndex,
    NodeType,
    NodeTypeDescription,
    register_node_type,
)
from neuron_explainer.activations.token_views import ViewQueue, norm_linear, token_view
from neuron_explainer.models.transformer import HookedTransformer

T = NodeType.EMBEDDING
_EMB = ("hook_embed", "hook_pos_embed")


def embedding_vectors(state: PassState) -> torch.Tensor:
    """[b, n, d] the embedding node's write: token embedding (+ learned position embedding)."""
    e = state.act("hook_embed")
    if "hook_pos_embed" in state.acts:
        e = e + state.act("hook_pos_embed")
    return e


def _ablation_hooks(model: HookedTransformer, node: NodeIndex) -> list[str]:
    return ["hook_embed", "hook_pos_embed"] if model.cfg.positional == "learned" else ["hook_embed"]


def _scale(x: torch.Tensor, row: int, node: NodeIndex, value: float) -> None:
    x[row, node.token] = x[row, node.token] * value  # the activation is 1: the value scales it


register_node_type(
    NodeTypeDescription(
        node_type=T,
        label="embedding",
        short_name="embedding",
        key="emb",
        writes="embedding",
        width=lambda model, layer: 1 if layer == 0 else 0,
        ablation=Ablation(hooks=_ablation_hooks, set=_scale),
        view_hooks=lambda model, layer: set(_EMB),
        token_view_lists=2,  # output tokens up and down
        api_name="embedding",
    )
)


@derived_scalar(T, "activation", acts=("hook_embed",), signed=False, ranked=False)
def embedding_activation(state: PassState, layer: int) -> torch.Tensor:
    return torch.ones_like(state.act("hook_embed")[..., :1])


@derived_scalar(T, "write_magnitude", acts=_EMB, signed=False)
def embedding_write_magnitude(state: PassState, layer: int) -> torch.Tensor:
    return embedding_vectors(state).norm(dim=-1, keepdim=True)


@derived_scalar(T, "direct_effect", acts=_EMB)
def embedding_direct_effect(state: PassState, layer: int) -> torch.Tensor:
    return (embedding_vectors(state) * state.gradient_at_cut()).sum(-1, keepdim=True)


@derived_scalar(T, "estimated_total_effect", acts=_EMB, grads=("hook_embed",))
def embedding_total_effect(state: PassState, layer: int) -> torch.Tensor:
    # Token and position embeddings are summed into the residual stream, so both see the gradient
    # taken at hook_embed.
    return (embedding_vectors(state) * state.grad("hook_embed")).sum(-1, keepdim=True)


@token_view(T)
def embedding_views(queue: ViewQueue, node: NodeIndex) -> None:
    """Output: the logit lens of e[t]. (No input view: nothing computes the embedding.)"""
    if queue.act("hook_embed") is None:
        return
    e = embedding_vectors(queue.state)[queue.row, node.token]
    lnf = queue.model.ln_final
    queue.output.add(node, ("emb", queue.row, node.token), lambda: norm_linear(lnf, e), 1.0)
