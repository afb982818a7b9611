"""Autoencoder latents: latent j of the sparse autoencoder a block holds for its MLP (at
`hook_mlp_out` or `mlp.hook_post`) or for its attention output (`hook_attn_out`); (side, layer)
names the autoencoder (`model.attach_autoencoder`). Two node types, one per side; on the wire both
are "autoencoder_latent" with an `autoencoderSide` (docs/engine.md §3, §4, §6).

Latents take part in the forward pass through a splice that keeps the model's output unchanged:
the hooked activation x is replaced by x + decode(z) - decode(z_clean) = decode(z) + (x -
decode(z_clean)), with z_clean = encode(x) and z a leaf copy of it carrying the row's latent
ablations. Without ablations the difference is exactly zero; ablating latent j removes exactly its
write z_j·s·W_dec[j]; the gradient reaches z through the decoder only (z is a leaf), so every
other node's gradient is the unspliced model's.

| metric                 | latent j at t      |
|------------------------|--------------------|
| activation             | z[t,j]             |
| write_magnitude        | |z|·s·‖w_j‖        |
| direct_effect          | z·s·(w_j·g[t])     |
| estimated_total_effect | z·∂D/∂z            |

`w_j` is latent j's write in the residual basis: W_dec[j] (through W_out for autoencoders of
`mlp.hook_post`); s = s(x) the decoder's per-token scale when the autoencoder normalizes its input
(1 otherwise). Tracing a latent makes its encoder pre-activation D, recomputed with graph from the
hooked activation, with its block's norm scale and the input-normalization scale held fixed.

Token views (the input-normalization scale held fixed as well):
- output: the logit lens of w_j, times z_j·s;
- input, MLP side: the gradient of the pre-activation with respect to the MLP's input residual at
  the latent's token, through the MLP (a per-token Jacobian, ln2 scale fixed);
- input, attention side: through the values, the gradient with respect to one residual vector
  added at every token the latent's token attends to, the pattern and ln1 scales fixed:
  Σ_h (Σ_k A[t,k,h] / s1[k]) · ln1ᵀ(W_V[h]ᵀ W_O[h] e_j), e_j the encoder's gradient at attn_out;
- token-pair attribution (attention side): per key token k <= t, (e_j · attn_out[t,k])·1[z_j > 0]
  with attn_out[t,k] = Σ_h A[t,k,h] v[k,h] W_O[h], top k keys.
"""

from __future__ import annotations

from functools import partial

import torch

from neuron_explainer.activations.derived_scalars import (
    PassState,
    derived_scalar,
    nonzero_tokens,
    weight_derived,
)
from neuron_explainer.activations.node_types.attention_head import (
    pattern_row,
    qk_hooks,
    token_pair_attribution,
)
from neuron_explainer.activations.nodes import (
    Live,
    NodeAblation,
    NodeIndex,
    NodeToTrace,
    NodeType,
    NodeTypeDescription,
    Recorded,
    Splice,
    Trace,
    register_node_type,
)
from neuron_explainer.activations.token_views import (
    ScoredKeyToken,
    ViewQueue,
    norm_linear,
    norm_linear_transpose,
    token_text,
    token_view,
)
from neuron_explainer.models.autoencoders import AutoencoderSide, SparseAutoencoder
from neuron_explainer.models.hooks import ForwardHookFn, HookPoint
from neuron_explainer.models.transformer import HookedTransformer

HOW_TO_LOAD = (
    "start the server with --autoencoder PATH, or attach one with model.attach_autoencoder"
)
LATENT_TYPES: dict[AutoencoderSide, NodeType] = {
    "mlp": NodeType.MLP_AUTOENCODER_LATENT,
    "attention": NodeType.ATTENTION_AUTOENCODER_LATENT,
}


def latent_acts_name(hook_name: str) -> str:
    """Where the splice records an autoencoder's latents (SAELens' name for them)."""
    return f"{hook_name}.hook_sae_acts_post"


def layer_autoencoder(
    model: HookedTransformer, node_type: NodeType, layer: int
) -> SparseAutoencoder:
    """The autoencoder whose latents are `node_type` nodes in `layer` (KeyError if none)."""
    ae = model.autoencoder(node_type.autoencoder_side, layer)
    if ae is None:
        raise KeyError(f"no {node_type.autoencoder_side}-side autoencoder for layer {layer}")
    return ae


def latent_layers(model: HookedTransformer, node_type: NodeType) -> list[int]:
    """The layers holding an autoencoder of `node_type`'s side, in order."""
    side = node_type.autoencoder_side
    return sorted(
        ae.cfg.layer
        for ae in model.autoencoders.values()
        if ae.cfg.side == side and ae.cfg.layer is not None
    )


def availability(model: HookedTransformer, side: AutoencoderSide) -> str:
    """Which layers hold an autoencoder of `side`, for error messages."""
    layers = latent_layers(model, LATENT_TYPES[side])
    if layers:
        return f"{side}-side autoencoders are loaded for layers {layers}"
    return f"no {side}-side autoencoder is loaded ({HOW_TO_LOAD})"


# ---- the splice ------------------------------------------------------------------------------------


def splice_hook(
    ae: SparseAutoencoder,
    ablations: list[tuple[int, NodeAblation]],
    acts: Recorded | None,
    grads: Recorded | None,
) -> ForwardHookFn:
    """x -> x + decode(z) - decode(z_clean): z_clean = encode(x) without graph, z a leaf copy
    with the ablations applied. decode(z) - decode(z_clean) = ((z - z_clean) W_dec)·s(x) (the
    biases and the normalization's shift cancel), exactly zero where nothing is ablated."""
    name = latent_acts_name(ae.hook_name)

    def splice(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        with torch.no_grad():
            clean = ae.encode(x)  # [b, n, N]
        z = clean.clone()
        for row, abl in ablations:
            z[row, abl.node.token, abl.node.component] = abl.value
        if grads is not None and torch.is_grad_enabled():
            z.requires_grad_(True)
            z.register_hook(lambda g: grads.__setitem__(name, g.detach()))
        if acts is not None:
            acts[name] = z.detach()
        delta = ((z - clean) @ ae.W_dec) * ae.decode_scale(x)
        return x + delta.to(x.dtype)

    return splice


def _pre_activation(
    model: HookedTransformer, live: Live, row: int, trace: NodeToTrace
) -> torch.Tensor:
    """The encoder's pre-activation of the hooked activation (MLP output, neurons or attention
    output), with graph back to the residual stream; the input-normalization scale held fixed."""
    node = trace.node
    ae = layer_autoencoder(model, node.node_type, node.layer)
    x = live[ae.hook_name][row, node.token]
    scale = ae.decode_scale(x.detach()) if ae.cfg.normalize != "none" else None
    return ae.pre_activations(x, scale=scale)[node.component]


def _view_hooks(model: HookedTransformer, layer: int, side: AutoencoderSide) -> set[str]:
    ae = model.autoencoder(side, layer)
    if ae is None:
        return set()
    if side == "mlp":
        return {
            ae.hook_name,
            f"blocks.{layer}.ln2.hook_normalized",
            f"blocks.{layer}.ln2.hook_scale",
        }
    return {
        ae.hook_name,
        *qk_hooks(model, layer),  # the pattern, recomputed from them (attention_head.pattern)
        f"blocks.{layer}.attn.hook_v",
        f"blocks.{layer}.ln1.hook_scale",
    }


def _width(model: HookedTransformer, layer: int, side: AutoencoderSide) -> int:
    ae = model.autoencoder(side, layer)
    return 0 if ae is None else ae.n_latents


def _module(
    model: HookedTransformer, layer: int, side: AutoencoderSide
) -> SparseAutoencoder | None:
    return model.autoencoder(side, layer)


def _trace_hooks(model: HookedTransformer, trace: NodeToTrace) -> set[str]:
    return {layer_autoencoder(model, trace.node.node_type, trace.node.layer).hook_name}


def _describe(side: AutoencoderSide, label: str, replaces: NodeType) -> NodeTypeDescription:
    short = "attn" if side == "attention" else "mlp"
    return NodeTypeDescription(
        node_type=LATENT_TYPES[side],
        label=label,
        short_name=f"{short} latent",
        key=f"{short}-latent",
        writes=side,
        width=partial(_width, side=side),
        trace=Trace(hooks=_trace_hooks, pre_activation=_pre_activation),
        splice=Splice(
            module=partial(_module, side=side),
            hook=splice_hook,
            acts_name=lambda ae: latent_acts_name(ae.hook_name),
        ),
        view_hooks=partial(_view_hooks, side=side),
        # Output and input tokens, up and down; attention-side latents add token-pair attributions.
        token_view_lists=5 if side == "attention" else 4,
        replaces=replaces,
        dataset_metric="activation",
        api_name="autoencoder_latent",
        autoencoder_side=side,
        availability=partial(availability, side=side),
    )


register_node_type(_describe("attention", "attention latent", NodeType.ATTENTION_HEAD))
register_node_type(_describe("mlp", "MLP latent", NodeType.MLP_NEURON))


# ---- derived scalars -------------------------------------------------------------------------------


def latent_write_directions(model: HookedTransformer, ae: SparseAutoencoder) -> torch.Tensor:
    """[N, d] latent j's write per unit of z_j·s in the residual basis: W_dec[j], or W_dec[j] W_out
    for an autoencoder of the neurons (mlp.hook_post). Cached per weight version."""
    if not ae.hook_name.endswith("mlp.hook_post"):
        return ae.W_dec
    assert ae.cfg.layer is not None
    w_out = model.blocks[ae.cfg.layer].mlp.W_out  # [m, d]
    weight = model.blocks[ae.cfg.layer].mlp.w_out.weight
    key = f"latent_dirs:{id(weight)}:{weight._version}"
    return weight_derived(key, ae.W_dec, lambda w_dec: w_dec @ w_out.to(w_dec.dtype))


def latent_write_norms(model: HookedTransformer, ae: SparseAutoencoder) -> torch.Tensor:
    """[N] ‖w_j‖ per unit of z_j·s."""
    dirs = latent_write_directions(model, ae)
    return weight_derived(f"latent_norms:{dirs.data_ptr()}", dirs, lambda w: w.norm(dim=-1))


def latents(state: PassState, node_type: NodeType, layer: int) -> torch.Tensor:
    """[b, n, N] the latents z of `layer`'s autoencoder, float32: as the splice recorded them
    (after any ablation), or, in a pass without the splice (collation), encode(x)."""
    ae = layer_autoencoder(state.model, node_type, layer)
    name = latent_acts_name(ae.hook_name)
    if name in state.acts:
        return state.act(name)
    return ae.encode(state.act(ae.hook_name))


def latent_scales(state: PassState, ae: SparseAutoencoder) -> torch.Tensor:
    """[b, n, 1] the decoder's scale s(x) of the hooked activation (ones without normalization)."""
    return ae.decode_scale(state.act(ae.hook_name))


def _reads(model: HookedTransformer, layer: int, node_type: NodeType) -> list[str]:
    """The hooked activation x (the latents themselves come from the splice)."""
    ae = model.autoencoder(node_type.autoencoder_side, layer)
    return [] if ae is None else [ae.hook_name]


def latent_activation(state: PassState, layer: int, node_type: NodeType) -> torch.Tensor:
    return latents(state, node_type, layer)


def latent_write_magnitude(state: PassState, layer: int, node_type: NodeType) -> torch.Tensor:
    ae = layer_autoencoder(state.model, node_type, layer)
    norms = latent_write_norms(state.model, ae)
    return latents(state, node_type, layer).abs() * latent_scales(state, ae) * norms


def latent_direct_effect(state: PassState, layer: int, node_type: NodeType) -> torch.Tensor:
    ae = layer_autoencoder(state.model, node_type, layer)
    z = latents(state, node_type, layer)
    position = 2 * layer + (1 if node_type.writes_after_attention else 2)
    g = state.gradient_at_cut() * state.cut_mask(position)
    out = torch.zeros_like(z)
    rows = nonzero_tokens(g)  # g is non-zero at a few tokens only
    if rows.numel():
        dirs = latent_write_directions(state.model, ae)
        scale = latent_scales(state, ae)[:, rows]
        out[:, rows] = z[:, rows] * scale * (g[:, rows].to(dirs.dtype) @ dirs.T)
    return out


def latent_total_effect(state: PassState, layer: int, node_type: NodeType) -> torch.Tensor:
    name = latent_acts_name(layer_autoencoder(state.model, node_type, layer).hook_name)
    return state.act(name) * state.grad(name)


for _type in LATENT_TYPES.values():
    _r = partial(_reads, node_type=_type)
    derived_scalar(_type, "activation", acts=_r, signed=False)(
        partial(latent_activation, node_type=_type)
    )
    derived_scalar(_type, "write_magnitude", acts=_r, signed=False)(
        partial(latent_write_magnitude, node_type=_type)
    )
    derived_scalar(_type, "direct_effect", acts=_r)(partial(latent_direct_effect, node_type=_type))
    derived_scalar(_type, "estimated_total_effect", acts=_r)(
        partial(latent_total_effect, node_type=_type)
    )


# ---- token views -----------------------------------------------------------------------------------


def latent_encoder_direction(
    ae: SparseAutoencoder, x: torch.Tensor, component: int
) -> torch.Tensor:
    """[d_in] ∂(pre-activation of latent j)/∂x at one token's hooked activation x [d_in], with
    the autoencoder's input normalization scale held fixed: W_enc[j] without normalization,
    centred and divided by (std + eps) for a layer norm, divided by ‖x‖/sqrt(d_in) for the
    constant-norm rescaling. Exact: with the scale fixed the pre-activation is affine in x."""
    x = x.detach().to(ae.W_enc.dtype)
    if ae.cfg.normalize == "none":
        return ae.W_enc[component]
    scale = ae.decode_scale(x).detach()
    with torch.enable_grad():
        x = x.clone().requires_grad_(True)
        pre = ae.pre_activations(x, scale=scale)[component]
        (direction,) = torch.autograd.grad(pre, x)
    return direction


def latent_views(queue: ViewQueue, node: NodeIndex) -> None:
    """Queue a latent's output and input projections and compute its token-pair attribution
    (see the module doc); views whose activations were not recorded are left empty."""
    model, state, row = queue.model, queue.state, queue.row
    L, t, j = node.layer, node.token, node.component
    ae = layer_autoencoder(model, node.node_type, L)
    x_all, z_all = queue.act(ae.hook_name), queue.act(latent_acts_name(ae.hook_name))
    if x_all is None or z_all is None:
        return
    x = x_all[row, t]
    scale = ae.decode_scale(x)  # [1]
    z = float(z_all[row, t, j])
    w = latent_write_directions(model, ae)[j].to(model.dtype)  # float32 weights, like the rest
    lnf = model.ln_final
    queue.output.add(
        node, ("latent", ae.hook_name, j), lambda: norm_linear(lnf, w), z * float(scale)
    )
    e = latent_encoder_direction(ae, x, j)  # ∂pre/∂x at the hooked activation, scale fixed
    block = model.blocks[L]
    if ae.cfg.side == "mlp":
        mlp_in = queue.act(f"blocks.{L}.ln2.hook_normalized")
        s2 = queue.act(f"blocks.{L}.ln2.hook_scale")
        if mlp_in is None or s2 is None:
            return
        with torch.enable_grad():
            h = mlp_in[row, t].detach().clone().requires_grad_(True)
            post = block.mlp.neuron_activations(h)
            hooked = post if ae.hook_name.endswith("mlp.hook_post") else block.mlp.w_out(post)
            (grad_h,) = torch.autograd.grad(hooked @ e.to(hooked.dtype), h)
        vec = norm_linear_transpose(block.ln2, grad_h)
        queue.input.add(node, ("latent_in", ae.hook_name, row, t, j), vec, 1 / float(s2[row, t, 0]))
        return
    # Attention side: through the values with the pattern and the ln1 scales fixed.
    q_name, k_name = qk_hooks(model, L)
    s1 = queue.act(f"blocks.{L}.ln1.hook_scale")
    if s1 is None or any(queue.act(n) is None for n in (q_name, k_name, f"blocks.{L}.attn.hook_v")):
        return
    attn = block.attn
    dh, group = attn.d_head, attn.n_heads // attn.n_kv_heads
    e_model = e.to(attn.W_O.dtype)
    probs = pattern_row(state, L, t)[row, :, : t + 1]  # [H, t + 1]
    weights = (probs / s1[row, : t + 1, 0]).sum(-1).to(e_model.dtype)  # [H]
    o_e = attn.W_O @ e_model  # [H, dh]
    w_v = attn.v_proj.weight.reshape(attn.n_kv_heads, dh, -1).repeat_interleave(group, dim=0)
    vec = torch.einsum("h,he,hed->d", weights, o_e, w_v)
    queue.input.add(
        node, ("latent_in", ae.hook_name, row, t, j), norm_linear_transpose(block.ln1, vec), 1.0
    )
    # Token-pair attribution: which key tokens the latent's input came from.
    queue.pairs[node] = []
    if z > 0:
        per_key = token_pair_attribution(state, L, e_model, t)[row, : t + 1].float()
        top = per_key.topk(min(queue.k, t + 1))
        ids = state.tokens[row].tolist() if state.tokens is not None else None
        queue.pairs[node] = [
            ScoredKeyToken(
                key,
                ids[key] if ids else -1,
                token_text(model, ids[key]) if ids else str(key),
                float(score),
            )
            for score, key in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]


for _type in LATENT_TYPES.values():
    token_view(_type)(latent_views)
