"""Derived scalars: small pure functions of cached activations, gradients and weights.

Each is registered by (node type, metric) with the hook values it reads, so the engine caches only
what the requested scalars need. Formulas (engine.md §3), per layer:

| metric                 | embedding at t        | MLP neuron i at t   | head h at (q, k)            | latent j at t    |
|------------------------|-----------------------|---------------------|-----------------------------|------------------|
| activation             | 1                     | a[t,i]              | A[q,k,h]                    | z[t,j]           |
| write_magnitude        | ‖e[t]‖                | |a|·‖W_out[i]‖      | A·‖v[k,h] W_O[h]‖           | |z|·‖w_j‖        |
| direct_effect          | e[t]·g[t]             | a·(W_out[i]·g[t])   | A·((v[k,h] W_O[h])·g[q])    | z·(w_j·g[t])     |
| estimated_total_effect | e[t]·∂D/∂e[t]         | a·∂D/∂a             | A·∂D/∂A                     | z·∂D/∂z          |

Per-token node types return [b, n, C]; attention head pairs return [b, H, n_q, n_k]. Head metrics
never build the n²·H·d tensor of per-pair write vectors: ‖v W_O‖ comes from the per-head Gram matrix
W_O[h] W_O[h]ᵀ and the direct effect from v · (W_O[h] g[q]), so extra memory is n·H·dh + n²·H.

Autoencoder latents (MLP-side and attention-side) read the latents the engine's splice recorded
(`{hook}.hook_sae_acts_post`, after ablations) and their gradients. `w_j` is latent j's write in
the residual basis: its decoder row W_dec[j] (through W_out for autoencoders of `mlp.hook_post`),
times the decoder's per-token scale s(x) when the autoencoder normalizes its input (1 otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from neuron_explainer.activations.nodes import LATENT_TYPES, NodeType
from neuron_explainer.models.autoencoders import SparseAutoencoder
from neuron_explainer.models.transformer import HookedTransformer

METRICS = ("activation", "write_magnitude", "direct_effect", "estimated_total_effect")


@dataclass
class PassState:
    """What one forward (+ backward) pass left behind, read by derived scalars.

    acts/grads are keyed by full hook name; `g` [b, n, d] is each row's gradient of its direction
    of interest with respect to the residual stream at that row's cut (the point D reads), with the
    norm scale there held fixed; nodes writing after `cut[row]` have no direct effect.
    """

    model: HookedTransformer
    acts: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    g: torch.Tensor | None = None
    cut: list[int] = field(default_factory=list)
    tokens: torch.Tensor | None = None  # [b, n] the batch's token ids (right-padded)

    def act(self, name: str) -> torch.Tensor:
        return self.acts[name]

    def grad(self, name: str) -> torch.Tensor:
        if name not in self.grads:
            # No backward pass (loss "zero"): the effect of every node on D is zero.
            return torch.zeros_like(self.acts[name])
        return self.grads[name]

    def gradient_at_cut(self) -> torch.Tensor:
        if self.g is None:
            b, n = self.acts["hook_embed"].shape[:2]
            return torch.zeros(
                b, n, self.model.cfg.d_model, device=self.model.device, dtype=self.model.dtype
            )
        return self.g

    def cut_mask(self, write_position: int) -> torch.Tensor:
        """[b, 1, 1] (broadcastable) 1.0 where a node writing at `write_position` is before the cut."""
        keep = [1.0 if write_position <= c else 0.0 for c in self.cut]
        return torch.tensor(keep, device=self.model.device, dtype=self.model.dtype)[:, None, None]


ScalarFn = Callable[[PassState, int], torch.Tensor]


_WEIGHT_CACHE: dict[tuple[str, int], tuple[int, int, torch.Tensor]] = {}


def weight_derived(
    key: str, weight: torch.Tensor, make: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """`make(weight)` for a quantity that depends on one weight only (norms, Gram matrices),
    cached across requests. Keyed by the tensor's identity and version counter, so in-place
    edits to the weights (`w_out.weight[:, 7] = 0`) recompute it."""
    entry = _WEIGHT_CACHE.get((key, id(weight)))
    if entry is None or entry[0] != weight._version or entry[1] != weight.data_ptr():
        entry = (weight._version, weight.data_ptr(), make(weight))
        _WEIGHT_CACHE[(key, id(weight))] = entry
    return entry[2]


@dataclass(frozen=True)
class DerivedScalar:
    node_type: NodeType
    metric: str
    fn: ScalarFn
    acts: tuple[str, ...]  # hook names; "{L}" is replaced by the layer
    grads: tuple[str, ...] = ()
    signed: bool = True  # signed metrics get a bottom-k too
    ranked: bool = True  # False where every node has the same value (embedding activation)


REGISTRY: dict[tuple[NodeType, str], DerivedScalar] = {}


def derived_scalar(
    node_type: NodeType,
    metric: str,
    acts: tuple[str, ...],
    grads: tuple[str, ...] = (),
    signed: bool = True,
    ranked: bool = True,
) -> Callable[[ScalarFn], ScalarFn]:
    def register(fn: ScalarFn) -> ScalarFn:
        REGISTRY[(node_type, metric)] = DerivedScalar(
            node_type, metric, fn, acts, grads, signed, ranked
        )
        return fn

    return register


def hook_names_for(scalar: DerivedScalar, n_layers: int) -> tuple[set[str], set[str]]:
    """(activation hook names, gradient hook names) that `scalar` reads, over all layers."""

    def expand(names: tuple[str, ...]) -> set[str]:
        out: set[str] = set()
        for n in names:
            out.update(n.format(L=layer) for layer in range(n_layers)) if "{L}" in n else out.add(n)
        return out

    return expand(scalar.acts), expand(scalar.grads)


def nonzero_tokens(g: torch.Tensor) -> torch.Tensor:
    """Token positions where any row's gradient [b, n, d] is non-zero."""
    return g.abs().sum(dim=(0, 2)).nonzero().flatten()


# ---- embeddings ------------------------------------------------------------------------------------


def embedding_vectors(state: PassState) -> torch.Tensor:
    """[b, n, d] the embedding node's write: token embedding (+ learned position embedding)."""
    e = state.act("hook_embed")
    if "hook_pos_embed" in state.acts:
        e = e + state.act("hook_pos_embed")
    return e


_EMB = ("hook_embed", "hook_pos_embed")


@derived_scalar(NodeType.EMBEDDING, "activation", acts=("hook_embed",), signed=False, ranked=False)
def embedding_activation(state: PassState, layer: int) -> torch.Tensor:
    return torch.ones_like(state.act("hook_embed")[..., :1])


@derived_scalar(NodeType.EMBEDDING, "write_magnitude", acts=_EMB, signed=False)
def embedding_write_magnitude(state: PassState, layer: int) -> torch.Tensor:
    return embedding_vectors(state).norm(dim=-1, keepdim=True)


@derived_scalar(NodeType.EMBEDDING, "direct_effect", acts=_EMB)
def embedding_direct_effect(state: PassState, layer: int) -> torch.Tensor:
    return (embedding_vectors(state) * state.gradient_at_cut()).sum(-1, keepdim=True)


@derived_scalar(NodeType.EMBEDDING, "estimated_total_effect", acts=_EMB, grads=("hook_embed",))
def embedding_total_effect(state: PassState, layer: int) -> torch.Tensor:
    # Token and position embeddings are summed into the residual stream, so both see the gradient
    # taken at hook_embed.
    return (embedding_vectors(state) * state.grad("hook_embed")).sum(-1, keepdim=True)


# ---- MLP neurons -----------------------------------------------------------------------------------

_POST = "blocks.{L}.mlp.hook_post"


@derived_scalar(NodeType.MLP_NEURON, "activation", acts=(_POST,))
def neuron_activation(state: PassState, layer: int) -> torch.Tensor:
    return state.act(_POST.format(L=layer))


@derived_scalar(NodeType.MLP_NEURON, "write_magnitude", acts=(_POST,), signed=False)
def neuron_write_magnitude(state: PassState, layer: int) -> torch.Tensor:
    weight = state.model.blocks[layer].mlp.w_out.weight  # [d, m]
    norms = weight_derived("w_out_norms", weight, lambda w: w.norm(dim=0))
    return state.act(_POST.format(L=layer)).abs() * norms


@derived_scalar(NodeType.MLP_NEURON, "direct_effect", acts=(_POST,))
def neuron_direct_effect(state: PassState, layer: int) -> torch.Tensor:
    w_out = state.model.blocks[layer].mlp.W_out
    g = state.gradient_at_cut() * state.cut_mask(2 * layer + 2)
    post = state.act(_POST.format(L=layer))
    out = torch.zeros_like(post)
    rows = nonzero_tokens(g)  # g is non-zero at a few tokens only
    if rows.numel():
        out[:, rows] = post[:, rows] * (g[:, rows] @ w_out.T)
    return out


@derived_scalar(NodeType.MLP_NEURON, "estimated_total_effect", acts=(_POST,), grads=(_POST,))
def neuron_total_effect(state: PassState, layer: int) -> torch.Tensor:
    name = _POST.format(L=layer)
    return state.act(name) * state.grad(name)


# ---- attention heads (per query/key pair) ----------------------------------------------------------

_PATTERN = "blocks.{L}.attn.hook_pattern"
_V = "blocks.{L}.attn.hook_v"


def head_values(state: PassState, layer: int) -> torch.Tensor:
    """[b, n, H, dh] the value each head reads (key/value heads repeated for grouped-query)."""
    v = state.act(_V.format(L=layer))
    cfg = state.model.cfg
    return v.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=2)


def pattern(state: PassState, layer: int) -> torch.Tensor:
    """[b, H, n_q, n_k] attention probabilities."""
    return state.act(_PATTERN.format(L=layer))


def head_write_norms(state: PassState, layer: int) -> torch.Tensor:
    """[b, n_k, H] ‖v[k,h] W_O[h]‖ without an n·H·d tensor: with the QR factorization
    W_O[h]ᵀ = Q R (Q [d, dh] with orthonormal columns), ‖v W_O[h]‖ = ‖v Rᵀ Qᵀ‖ = ‖v Rᵀ‖, a dh×dh
    product per head (half the time of the Gram form v G vᵀ on CPU)."""
    attn = state.model.blocks[layer].attn
    r_t = weight_derived(
        "w_o_qr",
        attn.o_proj.weight,
        lambda _: (
            torch.linalg.qr(attn.W_O.detach().double().transpose(1, 2))
            .R.transpose(1, 2)
            .to(attn.W_O.dtype)
        ),
    )  # [H, dh, dh]
    v = head_values(state, layer)  # [b, n, H, dh]
    b, n, h, dh = v.shape
    per_head = torch.bmm(v.reshape(b * n, h, dh).transpose(0, 1), r_t)  # [H, b·n, dh]
    return torch.linalg.vector_norm(per_head, dim=-1).T.reshape(b, n, h)


@derived_scalar(NodeType.ATTENTION_HEAD, "activation", acts=(_PATTERN,), signed=False)
def head_activation(state: PassState, layer: int) -> torch.Tensor:
    return pattern(state, layer)


@derived_scalar(NodeType.ATTENTION_HEAD, "write_magnitude", acts=(_PATTERN, _V), signed=False)
def head_write_magnitude(state: PassState, layer: int) -> torch.Tensor:
    return pattern(state, layer) * head_write_norms(state, layer).transpose(1, 2)[:, :, None, :]


@derived_scalar(NodeType.ATTENTION_HEAD, "direct_effect", acts=(_PATTERN, _V))
def head_direct_effect(state: PassState, layer: int) -> torch.Tensor:
    w_o = state.model.blocks[layer].attn.W_O  # [H, dh, d]
    g = state.gradient_at_cut() * state.cut_mask(2 * layer + 1)  # [b, n, d]
    probs = pattern(state, layer)
    out = torch.zeros_like(probs)
    # g is non-zero at a few tokens only (the read position, or the traced pair's tokens): project
    # just those query rows into each head's value space.
    rows = nonzero_tokens(g)
    if rows.numel():
        g_o = torch.einsum("bqd,hed->bqhe", g[:, rows], w_o)  # [b, r, H, dh]
        vg = torch.einsum("bkhe,bqhe->bhqk", head_values(state, layer), g_o)  # [b, H, r, n]
        out[:, :, rows] = probs[:, :, rows] * vg
    return out


@derived_scalar(
    NodeType.ATTENTION_HEAD, "estimated_total_effect", acts=(_PATTERN,), grads=(_PATTERN,)
)
def head_total_effect(state: PassState, layer: int) -> torch.Tensor:
    name = _PATTERN.format(L=layer)
    return state.act(name) * state.grad(name)


def token_pair_attribution(
    state: PassState, layer: int, direction: torch.Tensor, query_token: int
) -> torch.Tensor:
    """[b, n_k]: how much each key token's contribution to attn_out[q] points along `direction`.

    Σ_h A[q,k,h] · (v[k,h] W_O[h]) · direction, the hook used by attention-side autoencoder latents
    (with `direction` the latent's encoder row); summed over k it gives (attn_out[q] - b_O)·direction.
    """
    w_o = state.model.blocks[layer].attn.W_O
    proj = torch.einsum("hed,d->he", w_o, direction.to(w_o.dtype))  # [H, dh]
    vproj = torch.einsum("bkhe,he->bkh", head_values(state, layer), proj)
    return torch.einsum("bhk,bkh->bk", pattern(state, layer)[:, :, query_token], vproj)


# ---- autoencoder latents (MLP-side and attention-side) ---------------------------------------------


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
    """[b, n, N] the latents z of `layer`'s autoencoder (after any ablation), float32."""
    return state.act(latent_acts_name(layer_autoencoder(state.model, node_type, layer).hook_name))


def latent_scales(state: PassState, ae: SparseAutoencoder) -> torch.Tensor:
    """[b, n, 1] the decoder's scale s(x) of the hooked activation (ones without normalization)."""
    return ae.decode_scale(state.act(ae.hook_name))


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


for _latent_type in LATENT_TYPES.values():
    derived_scalar(_latent_type, "activation", acts=(), signed=False)(
        partial(latent_activation, node_type=_latent_type)
    )
    derived_scalar(_latent_type, "write_magnitude", acts=(), signed=False)(
        partial(latent_write_magnitude, node_type=_latent_type)
    )
    derived_scalar(_latent_type, "direct_effect", acts=())(
        partial(latent_direct_effect, node_type=_latent_type)
    )
    derived_scalar(_latent_type, "estimated_total_effect", acts=())(
        partial(latent_total_effect, node_type=_latent_type)
    )


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
