"""MLP neurons: neuron i of block L at token t, whose activation a[t,i] (`mlp.hook_post`, for
SwiGLU the product fed to the down projection) writes a[t,i]·W_out[i] (docs/engine.md §3).

| metric                 | MLP neuron i at t    |
|------------------------|----------------------|
| activation             | a[t,i]               |
| write_magnitude        | |a|·‖W_out[i]‖       |
| direct_effect          | a·(W_out[i]·g[t])    |
| estimated_total_effect | a·∂D/∂a              |

Ablation sets a[t,i]; tracing makes its pre-activation (`mlp.hook_pre`, the gate for SwiGLU)
the direction of interest, with the ln2 scale of its block held fixed.
"""

from __future__ import annotations

import torch

from neuron_explainer.activations.derived_scalars import (
    PassState,
    act_times_grad,
    derived_scalar,
    nonzero_tokens,
    post_norm_reads,
    weight_derived,
)
from neuron_explainer.activations.nodes import (
    Ablation,
    Live,
    NodeIndex,
    NodeToTrace,
    NodeType,
    NodeTypeDescription,
    Trace,
    register_node_type,
)
from neuron_explainer.activations.token_views import (
    ViewQueue,
    norm_linear,
    norm_linear_transpose,
    token_view,
)
from neuron_explainer.models.transformer import HookedTransformer

T = NodeType.MLP_NEURON
_POST = "blocks.{L}.mlp.hook_post"
_PRE = "blocks.{L}.mlp.hook_pre"


def _set(x: torch.Tensor, row: int, node: NodeIndex, value: float) -> None:
    x[row, node.token, node.component] = value


def _pre_activation(
    model: HookedTransformer, live: Live, row: int, trace: NodeToTrace
) -> torch.Tensor:
    node = trace.node
    return live[_PRE.format(L=node.layer)][row, node.token, node.component]


register_node_type(
    NodeTypeDescription(
        node_type=T,
        label="MLP neuron",
        short_name="mlp",
        key="mlp",
        writes="mlp",
        width=lambda model, layer: model.cfg.d_mlp,
        ablation=Ablation(hooks=lambda model, node: [_POST.format(L=node.layer)], set=_set),
        trace=Trace(
            hooks=lambda model, trace: {_PRE.format(L=trace.node.layer)},
            pre_activation=_pre_activation,
        ),
        view_hooks=lambda model, layer: {_POST.format(L=layer), f"blocks.{layer}.ln2.hook_scale"},
        token_view_lists=4,  # output and input tokens, up and down
        dataset_metric="activation",
        api_name="mlp_neuron",
    )
)


@derived_scalar(T, "activation", acts=(_POST,))
def neuron_activation(state: PassState, layer: int) -> torch.Tensor:
    return state.act(_POST.format(L=layer))


@derived_scalar(T, "write_magnitude", acts=(_POST,), signed=False)
def neuron_write_magnitude(state: PassState, layer: int) -> torch.Tensor:
    """|a|·‖W_out[i]‖; through a post-norm |a|·‖W_out[i] ⊙ w‖ / s (docs/engine.md §3.7), the 1/s
    where the scale was recorded (always by the engine)."""
    weight = state.model.blocks[layer].mlp.w_out.weight  # [d, m]
    post = state.act(_POST.format(L=layer)).abs()
    if not state.model.cfg.post_norms:
        return post * weight_derived("w_out_norms", weight, lambda w: w.norm(dim=0))
    gain = state.model.blocks[layer].ln2_post.weight
    out = post * weight_derived(
        "w_out_gain_norms", weight, lambda w: (w * gain[:, None]).norm(dim=0), gain
    )
    scale = state.acts.get(f"blocks.{layer}.ln2_post.hook_scale")
    return out if scale is None else out / scale


@derived_scalar(T, "direct_effect", acts=post_norm_reads(_POST, writes="mlp"))
def neuron_direct_effect(state: PassState, layer: int) -> torch.Tensor:
    w_out = state.model.blocks[layer].mlp.W_out
    g = state.gradient_at_write(layer, "mlp", 2 * layer + 2)
    post = state.act(_POST.format(L=layer))
    out = torch.zeros_like(post)
    rows = nonzero_tokens(g)  # g is non-zero at a few tokens only
    if rows.numel():
        out[:, rows] = post[:, rows] * (g[:, rows] @ w_out.T)
    return out


derived_scalar(T, "estimated_total_effect", acts=(_POST,), grads=(_POST,))(act_times_grad(_POST))


@token_view(T)
def neuron_views(queue: ViewQueue, node: NodeIndex) -> None:
    """Output: the logit lens of W_out[i], times a. Input: the pre-activation's row of the input
    projection pulled back through ln2 (its scale fixed), over every token embedding."""
    model, L, c = queue.model, node.layer, node.component
    post = queue.act(_POST.format(L=L))
    scale = queue.act(f"blocks.{L}.ln2.hook_scale")
    mlp = model.blocks[L].mlp
    if post is not None:
        w, lnf = mlp.W_out[c], model.ln_final
        factor = float(post[queue.row, node.token, c])
        queue.output.add(node, ("mlp", L, c), lambda: norm_linear(lnf, w), factor)
    if scale is not None:
        w_in, ln2 = mlp.w_in.weight[c], model.blocks[L].ln2
        factor = 1.0 / float(scale[queue.row, node.token, 0])
        queue.input.add(node, ("mlp_in", L, c), lambda: norm_linear_transpose(ln2, w_in), factor)
