"""Token-space views of nodes (engine.md §6).

- Upvoted output tokens: the node's write vector through the final norm's linear part (centering for
  LayerNorm, gain) and the unembedding, minus the vocabulary mean (a logit lens of the write).
- Input tokens that upvote a node: the gradient of the node's pre-activation with respect to its
  input residual (norm scale fixed) dotted with every token embedding. Heads: query and key sides
  of the attention score.
- Autoencoder latents (the autoencoder's input-normalization scale held fixed as well):
  - output: the write direction w_j (through W_out for autoencoders of the neurons), scaled by
    z_j·s;
  - input, MLP-side: the gradient of the pre-activation with respect to the MLP's input residual
    at the latent's token, through the MLP (a per-token Jacobian, ln2 scale fixed);
  - input, attention-side: through the values, the gradient with respect to one residual vector
    added at every token the latent's token attends to, with the attention pattern and the ln1
    scales held fixed: Σ_h (Σ_k A[t,k,h] / s1[k]) · ln1ᵀ(W_V[h]ᵀ W_O[h] e_j), where e_j is the
    encoder's gradient at the attention output;
  - token-pair attribution (attention-side): per key token k <= t, (e_j · attn_out[t,k])·1[z_j > 0]
    with attn_out[t,k] = Σ_h A[t,k,h] v[k,h] W_O[h] (engine.md §6), top k keys.

Nodes that share a direction up to a scalar (a neuron at different tokens) share one projection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from neuron_explainer.activations.derived_scalars import (
    PassState,
    embedding_vectors,
    head_values,
    latent_acts_name,
    latent_encoder_direction,
    latent_write_directions,
    layer_autoencoder,
    token_pair_attribution,
)
from neuron_explainer.activations.nodes import NodeIndex, NodeType
from neuron_explainer.models.transformer import HookedTransformer, Norm, Rotary

if TYPE_CHECKING:
    from neuron_explainer.activations.engine import NodeTokenViews, ScoredKeyToken, ScoredToken


def _text(model: HookedTransformer, token: int) -> str:
    return model.tokenizer.token_display(token) if model.tokenizer else str(token)


def scored(
    model: HookedTransformer, logits: torch.Tensor, probs: torch.Tensor, k: int, largest: bool
) -> list[ScoredToken]:
    from neuron_explainer.activations.engine import ScoredToken

    top = logits.float().topk(min(k, logits.numel()), largest=largest)
    return [
        ScoredToken(int(i), _text(model, int(i)), float(v), float(probs[i]))
        for v, i in zip(top.values, top.indices, strict=True)
    ]


def scored_ids(
    model: HookedTransformer, logits: torch.Tensor, probs: torch.Tensor, ids: Sequence[int]
) -> list[ScoredToken]:
    from neuron_explainer.activations.engine import ScoredToken

    return [ScoredToken(i, _text(model, i), float(logits[i]), float(probs[i])) for i in ids]


def norm_linear(norm: Norm, vectors: torch.Tensor) -> torch.Tensor:
    """The norm's action on directions with its scale held fixed (up to 1/scale): center, gain."""
    if norm.kind == "layernorm":
        vectors = vectors - vectors.mean(-1, keepdim=True)
    return vectors * norm.weight


def norm_linear_transpose(norm: Norm, grads: torch.Tensor) -> torch.Tensor:
    """Pull a gradient w.r.t. the norm's output back to its input (scale fixed, up to 1/scale)."""
    grads = grads * norm.weight
    if norm.kind == "layernorm":
        grads = grads - grads.mean(-1, keepdim=True)
    return grads


class _Projector:
    """Collects direction vectors to project onto the vocabulary."""

    def __init__(self) -> None:
        self.keys: dict[object, int] = {}
        self.vectors: list[torch.Tensor] = []

    def add(self, key: object, make: object) -> int:
        if key not in self.keys:
            self.keys[key] = len(self.vectors)
            self.vectors.append(make() if callable(make) else make)  # type: ignore[arg-type]
        return self.keys[key]


# Per unique vector: (top scores, top ids, bottom scores, bottom ids) as Python lists.
Ranked = list[tuple[list[float], list[int], list[float], list[int]]]


def _rank_all(jobs: list[tuple[_Projector, torch.Tensor, bool]], k: int) -> list[Ranked]:
    """Project every projector's vectors onto its vocabulary matrix and rank them. Projectors
    sharing a matrix (W_E and W_U are one tensor with tied embeddings) share one matmul."""
    results: list[Ranked] = [[] for _ in jobs]
    by_matrix: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for j, (proj, matrix, _) in enumerate(jobs):
        if proj.vectors:
            key = (matrix.untyped_storage().data_ptr(), tuple(matrix.stride()))
            by_matrix.setdefault(key, []).append(j)
    for members in by_matrix.values():
        matrix = jobs[members[0]][1]
        stacked = torch.cat([torch.stack(jobs[j][0].vectors) for j in members])
        scores = stacked @ matrix  # [U, V]
        start = 0
        for j in members:
            proj, _, center = jobs[j]
            part = scores[start : start + len(proj.vectors)]
            start += len(proj.vectors)
            if center:
                part = part - part.mean(-1, keepdim=True)
            kk = min(k, part.shape[-1])
            top, bottom = part.topk(kk), part.topk(kk, largest=False)
            results[j] = list(
                zip(
                    top.values.tolist(),
                    top.indices.tolist(),
                    bottom.values.tolist(),
                    bottom.indices.tolist(),
                    strict=True,
                )
            )
    return results


def _lists(
    model: HookedTransformer, ranked: Ranked, u: int, factor: float
) -> tuple[list[ScoredToken], list[ScoredToken]]:
    """(up, down) lists for unique vector u scaled by `factor` (a negative factor swaps them)."""
    from neuron_explainer.activations.engine import ScoredToken

    tv, ti, bv, bi = ranked[u]
    up = [ScoredToken(i, _text(model, i), v * factor) for v, i in zip(tv, ti, strict=True)]
    down = [ScoredToken(i, _text(model, i), v * factor) for v, i in zip(bv, bi, strict=True)]
    return (up, down) if factor >= 0 else (down, up)


def node_token_views(
    model: HookedTransformer, state: PassState, row: int, nodes: Sequence[NodeIndex], k: int
) -> dict[NodeIndex, NodeTokenViews]:
    from neuron_explainer.activations.engine import NodeTokenViews

    cfg = model.cfg
    out_proj, in_proj, key_proj = _Projector(), _Projector(), _Projector()
    # node -> (unique index, factor) per view
    out_ref: dict[NodeIndex, tuple[int, float]] = {}
    in_ref: dict[NodeIndex, tuple[int, float]] = {}
    key_ref: dict[NodeIndex, tuple[int, float]] = {}
    lnf = model.ln_final
    n = state.acts["hook_embed"].shape[1]
    rope = None
    if cfg.positional == "rotary":
        rope = model.rotary.cos_sin(torch.arange(n, device=model.device)[None], model.dtype)

    pair_views: dict[NodeIndex, list[ScoredKeyToken]] = {}
    for node in nodes:
        L, t = node.layer, node.token
        if node.node_type.is_latent:
            _latent_views(
                model, state, row, node, k, out_proj, in_proj, out_ref, in_ref, pair_views
            )
            continue
        if node.node_type == NodeType.EMBEDDING:
            if "hook_embed" in state.acts:
                e = embedding_vectors(state)[row, t]
                out_ref[node] = (
                    out_proj.add(("emb", row, t), lambda e=e: norm_linear(lnf, e)),
                    1.0,
                )
            continue
        if node.node_type == NodeType.MLP_NEURON:
            post = state.acts.get(f"blocks.{L}.mlp.hook_post")
            scale = state.acts.get(f"blocks.{L}.ln2.hook_scale")
            mlp = model.blocks[L].mlp
            if post is not None:
                w = mlp.W_out[node.component]
                u = out_proj.add(("mlp", L, node.component), lambda w=w: norm_linear(lnf, w))
                out_ref[node] = (u, float(post[row, t, node.component]))
            if scale is not None:
                w_in = mlp.w_in.weight[node.component]
                ln2 = model.blocks[L].ln2
                u = in_proj.add(
                    ("mlp_in", L, node.component),
                    lambda w=w_in, ln=ln2: norm_linear_transpose(ln, w),
                )
                in_ref[node] = (u, 1.0 / float(scale[row, t, 0]))
            continue
        # Attention head pair (q = t, k = attended token).
        assert node.attended_token is not None
        h, kt = node.component, node.attended_token
        attn = model.blocks[L].attn
        pattern = state.acts.get(f"blocks.{L}.attn.hook_pattern")
        if pattern is not None and f"blocks.{L}.attn.hook_v" in state.acts:
            vo = head_values(state, L)[row, kt, h] @ attn.W_O[h]
            u = out_proj.add(("head", L, row, kt, h), lambda vo=vo: norm_linear(lnf, vo))
            out_ref[node] = (u, float(pattern[row, h, t, kt]))
        qname, kname = ("hook_rot_q", "hook_rot_k") if rope is not None else ("hook_q", "hook_k")
        q_all = state.acts.get(f"blocks.{L}.attn.{qname}")
        k_all = state.acts.get(f"blocks.{L}.attn.{kname}")
        s1 = state.acts.get(f"blocks.{L}.ln1.hook_scale")
        if q_all is None or k_all is None or s1 is None:
            continue
        kvh = h // (attn.n_heads // attn.n_kv_heads)
        q_vec, k_vec = q_all[row, t, h], k_all[row, kt, kvh]
        # d score / d q_raw = R(pos_q)^T k_rot / sqrt(dh); R^T rotates by -θ.
        g_q, g_k = k_vec / math.sqrt(attn.d_head), q_vec / math.sqrt(attn.d_head)
        if rope is not None:
            cos, sin = rope
            g_q = Rotary.rotate(
                g_q[None, None, None], cos[:, t : t + 1], -sin[:, t : t + 1]
            ).flatten()
            g_k = Rotary.rotate(
                g_k[None, None, None], cos[:, kt : kt + 1], -sin[:, kt : kt + 1]
            ).flatten()
        dh = attn.d_head
        w_q = attn.q_proj.weight[h * dh : (h + 1) * dh]  # [dh, d]
        w_k = attn.k_proj.weight[kvh * dh : (kvh + 1) * dh]
        ln1 = model.blocks[L].ln1
        u = in_proj.add(("q", L, row, t, kt, h), norm_linear_transpose(ln1, g_q @ w_q))
        in_ref[node] = (u, 1.0 / float(s1[row, t, 0]))
        u = key_proj.add(("k", L, row, t, kt, h), norm_linear_transpose(ln1, g_k @ w_k))
        key_ref[node] = (u, 1.0 / float(s1[row, kt, 0]))

    ranked_out, ranked_in, ranked_key = _rank_all(
        [
            (out_proj, model.W_U, True),
            (in_proj, model.W_E.T, False),
            (key_proj, model.W_E.T, False),
        ],
        k,
    )
    views: dict[NodeIndex, NodeTokenViews] = {}
    for node in nodes:
        v = NodeTokenViews()
        if node in out_ref:
            v.upvoted_output_tokens, v.downvoted_output_tokens = _lists(
                model, ranked_out, *out_ref[node]
            )
        if node in in_ref:
            v.upvoting_input_tokens, v.downvoting_input_tokens = _lists(
                model, ranked_in, *in_ref[node]
            )
        if node in key_ref:
            v.upvoting_key_tokens, v.downvoting_key_tokens = _lists(
                model, ranked_key, *key_ref[node]
            )
        v.token_pair_attributions = pair_views.get(node, [])
        views[node] = v
    return views


def _latent_views(
    model: HookedTransformer,
    state: PassState,
    row: int,
    node: NodeIndex,
    k: int,
    out_proj: _Projector,
    in_proj: _Projector,
    out_ref: dict[NodeIndex, tuple[int, float]],
    in_ref: dict[NodeIndex, tuple[int, float]],
    pair_views: dict[NodeIndex, list[ScoredKeyToken]],
) -> None:
    """Queue a latent's output and input projections and compute its token-pair attribution
    (see the module doc); views whose activations were not recorded are left empty."""
    from neuron_explainer.activations.engine import ScoredKeyToken

    L, t, j = node.layer, node.token, node.component
    ae = layer_autoencoder(model, node.node_type, L)
    x_all = state.acts.get(ae.hook_name)
    z_all = state.acts.get(latent_acts_name(ae.hook_name))
    if x_all is None or z_all is None:
        return
    x = x_all[row, t]
    scale = ae.decode_scale(x)  # [1]
    z = float(z_all[row, t, j])
    w = latent_write_directions(model, ae)[j].to(model.dtype)  # float32 weights, like the rest
    u = out_proj.add(("latent", ae.hook_name, j), lambda w=w: norm_linear(model.ln_final, w))
    out_ref[node] = (u, z * float(scale))
    e = latent_encoder_direction(ae, x, j)  # ∂pre/∂x at the hooked activation, scale fixed
    block = model.blocks[L]
    if ae.cfg.side == "mlp":
        mlp_in = state.acts.get(f"blocks.{L}.ln2.hook_normalized")
        s2 = state.acts.get(f"blocks.{L}.ln2.hook_scale")
        if mlp_in is None or s2 is None:
            return
        with torch.enable_grad():
            h = mlp_in[row, t].detach().clone().requires_grad_(True)
            post = block.mlp.neuron_activations(h)
            hooked = post if ae.hook_name.endswith("mlp.hook_post") else block.mlp.w_out(post)
            (grad_h,) = torch.autograd.grad(hooked @ e.to(hooked.dtype), h)
        vec = norm_linear_transpose(block.ln2, grad_h)
        in_ref[node] = (
            in_proj.add(("latent_in", ae.hook_name, row, t, j), vec),
            1 / float(s2[row, t, 0]),
        )
        return
    # Attention side: through the values with the pattern and the ln1 scales fixed.
    pattern = state.acts.get(f"blocks.{L}.attn.hook_pattern")
    s1 = state.acts.get(f"blocks.{L}.ln1.hook_scale")
    if pattern is None or s1 is None or f"blocks.{L}.attn.hook_v" not in state.acts:
        return
    attn = block.attn
    dh, group = attn.d_head, attn.n_heads // attn.n_kv_heads
    e_model = e.to(attn.W_O.dtype)
    weights = (pattern[row, :, t, : t + 1] / s1[row, : t + 1, 0]).sum(-1).to(e_model.dtype)  # [H]
    o_e = attn.W_O @ e_model  # [H, dh]
    w_v = attn.v_proj.weight.view(attn.n_kv_heads, dh, -1).repeat_interleave(group, dim=0)
    vec = torch.einsum("h,he,hed->d", weights, o_e, w_v)
    in_ref[node] = (
        in_proj.add(("latent_in", ae.hook_name, row, t, j), norm_linear_transpose(block.ln1, vec)),
        1.0,
    )
    # Token-pair attribution: which key tokens the latent's input came from.
    if z > 0:
        per_key = token_pair_attribution(state, L, e_model, t)[row, : t + 1].float()
        top = per_key.topk(min(k, t + 1))
        ids = state.tokens[row].tolist() if state.tokens is not None else None
        pair_views[node] = [
            ScoredKeyToken(
                key,
                ids[key] if ids else -1,
                _text(model, ids[key]) if ids else str(key),
                float(score),
            )
            for score, key in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]
    else:
        pair_views[node] = []
