"""Attention heads, one node per (query token q, key token k <= q) pair: head h of block L moves
A[q,k,h]·(v[k,h] W_O[h]) into the residual stream at q (docs/engine.md §3). With grouped-query
attention v[k,h] is the value of the key/value head h reads; an output-projection bias is a bias
term, not part of any head's write.

| metric                 | head h at (q, k)            |
|------------------------|-----------------------------|
| activation             | A[q,k,h]                    |
| write_magnitude        | A·‖v[k,h] W_O[h]‖           |
| direct_effect          | A·((v[k,h] W_O[h])·g[q])    |
| estimated_total_effect | A·∂D/∂A                     |

Head metrics never build the n²·H·d tensor of per-pair write vectors: ‖v W_O‖ comes from a
per-head dh×dh factor of W_O and the direct effect from v · (W_O[h] g[q]). Nor does a pass keep
an n²·H pattern per layer: it records the queries and keys (and, for ∂D/∂A, the gradient at z,
since z = A v gives ∂D/∂A[q,k,h] = ∂D/∂z[q,h]·v[k,h]), so the forward runs the fused attention
kernel, and each layer's pattern and its gradient are recomputed when its metrics are ranked, one
layer alive at a time: the extra memory is n·H·dh per layer plus n²·H for one layer. A layer whose
pattern a hook must see (an ablation sets it, a value trace reads it) records it instead.
Ablation sets A[q,k,h] (for one key, or every key of the query row); tracing goes through the
query, the key, both (the pre-softmax score, the ln1 scale fixed), or the value.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuron_explainer.activations.derived_scalars import (
    PassState,
    Reads,
    derived_scalar,
    nonzero_tokens,
    weight_derived,
)
from neuron_explainer.activations.nodes import (
    Ablation,
    AttentionTraceType,
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
from neuron_explainer.models.transformer import HookedTransformer, Rotary

T = NodeType.ATTENTION_HEAD
_PATTERN = "blocks.{L}.attn.hook_pattern"
_V = "blocks.{L}.attn.hook_v"
_Z = "blocks.{L}.attn.hook_z"


def qk_hooks(model: HookedTransformer, layer: int) -> tuple[str, str]:
    """The hook names of the queries and keys that the scores read (after rotary, if any)."""
    prefix = "hook_rot_" if model.cfg.positional == "rotary" else "hook_"
    return f"blocks.{layer}.attn.{prefix}q", f"blocks.{layer}.attn.{prefix}k"


def head_values(state: PassState, layer: int) -> torch.Tensor:
    """[b, n, H, dh] the value each head reads (key/value heads repeated for grouped-query)."""
    v = state.act(_V.format(L=layer))
    cfg = state.model.cfg
    return v.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=2)


def pattern_reads(*names: str, post_norm: bool = False) -> Reads:
    """What a head scalar reads to have a layer's pattern (the queries and keys the scores read),
    plus `names` and, with `post_norm` on a model with post-norms, ln1_post's scale."""

    def reads(model: HookedTransformer, layer: int) -> Sequence[str]:
        post = ("blocks.{L}.ln1_post.hook_scale",) if post_norm and model.cfg.post_norms else ()
        return (*qk_hooks(model, layer), *names, *post)

    return reads


def pattern(state: PassState, layer: int) -> torch.Tensor:
    """[b, H, n_q, n_k] attention probabilities: as recorded where the pass recorded them (a
    layer whose pattern an ablation set), else recomputed from the recorded queries and keys."""
    recorded = state.acts.get(_PATTERN.format(L=layer))
    if recorded is not None:
        return recorded
    q_name, k_name = qk_hooks(state.model, layer)
    attn = state.model.blocks[layer].attn
    return state.per_layer(
        "pattern", layer, lambda: attn.probabilities(state.act(q_name), state.act(k_name))
    )


def pattern_row(state: PassState, layer: int, query: int) -> torch.Tensor:
    """[b, H, n_k] the attention probabilities of one query token (zero after it), without a
    layer's whole pattern."""
    recorded = state.acts.get(_PATTERN.format(L=layer))
    if recorded is not None:
        return recorded[:, :, query]
    q_name, k_name = qk_hooks(state.model, layer)
    q, k = state.act(q_name), state.act(k_name)
    probs = state.model.blocks[layer].attn.probabilities(
        q[:, query : query + 1], k[:, : query + 1]
    )[:, :, 0]
    return torch.nn.functional.pad(probs, (0, k.shape[1] - query - 1))


def pattern_gradient(state: PassState, layer: int) -> torch.Tensor:
    """[b, H, n_q, n_k] ∂D/∂A: z = A v per head, so ∂D/∂A[q,k,h] = ∂D/∂z[q,h]·v[k,h], from the
    gradient recorded at z (zero without a backward pass)."""
    g_z = state.grads.get(_Z.format(L=layer))
    if g_z is None:
        return torch.zeros_like(pattern(state, layer))
    return state.per_layer(
        "pattern_gradient",
        layer,
        lambda: torch.einsum("bqhe,bkhe->bhqk", g_z, head_values(state, layer)),
    )


def head_write_norms(state: PassState, layer: int) -> torch.Tensor:
    """[b, n_k, H] ‖v[k,h] W_O[h]‖ without an n·H·d tensor: with the QR factorization
    W_O[h]ᵀ = Q R (Q [d, dh] with orthonormal columns), ‖v W_O[h]‖ = ‖v Rᵀ Qᵀ‖ = ‖v Rᵀ‖, a dh×dh
    product per head (half the time of the Gram form v G vᵀ on CPU). With a post-norm, W_O[h] ⊙ w
    (its gain; the 1/s at the query is the caller's)."""
    attn = state.model.blocks[layer].attn
    gain = state.model.blocks[layer].ln1_post.weight if state.model.cfg.post_norms else None

    def r_factor(_: torch.Tensor) -> torch.Tensor:
        w_o = attn.W_O.detach().double()
        if gain is not None:
            w_o = w_o * gain.detach().double()
        return torch.linalg.qr(w_o.transpose(1, 2)).R.transpose(1, 2).to(attn.W_O.dtype)

    key = "w_o_qr" if gain is None else "w_o_gain_qr"
    gains = () if gain is None else (gain,)
    r_t = weight_derived(key, attn.o_proj.weight, r_factor, *gains)  # [H, dh, dh]
    v = head_values(state, layer)  # [b, n, H, dh]
    b, n, h, dh = v.shape
    per_head = torch.bmm(v.reshape(b * n, h, dh).transpose(0, 1), r_t)  # [H, b·n, dh]
    return torch.linalg.vector_norm(per_head, dim=-1).T.reshape(b, n, h)


def token_pair_attribution(
    state: PassState, layer: int, direction: torch.Tensor, query_token: int
) -> torch.Tensor:
    """[b, n_k]: how much each key token's contribution to attn_out[q] points along `direction`.

    Σ_h A[q,k,h] · (v[k,h] W_O[h]) · direction (for attention-side latents, `direction` is the
    latent's encoder direction); summed over k it gives (attn_out[q] - b_O)·direction.
    """
    w_o = state.model.blocks[layer].attn.W_O
    proj = torch.einsum("hed,d->he", w_o, direction.to(w_o.dtype))  # [H, dh]
    vproj = torch.einsum("bkhe,he->bkh", head_values(state, layer), proj)
    return torch.einsum("bhk,bkh->bk", pattern_row(state, layer, query_token), vproj)


# ---- ablation and tracing --------------------------------------------------------------------------


def _set(x: torch.Tensor, row: int, node: NodeIndex, value: float) -> None:
    """x: the pattern [b, H, q, k]; every key of the query row when no key is given."""
    keys = slice(0, node.token + 1) if node.attended_token is None else node.attended_token
    x[row, node.component, node.token, keys] = value


def _trace_hooks(model: HookedTransformer, trace: NodeToTrace) -> set[str]:
    L = trace.node.layer
    if trace.attention_trace_type == AttentionTraceType.VALUE:
        return {_V.format(L=L), _PATTERN.format(L=L)}
    return set(qk_hooks(model, L))


def _score(model: HookedTransformer, live: Live, row: int, trace: NodeToTrace) -> torch.Tensor:
    """The pair's pre-softmax score q·k/√dh, with the key side detached when tracing through the
    query and the query side when tracing through the key."""
    node = trace.node
    attn = model.blocks[node.layer].attn
    q_name, k_name = qk_hooks(model, node.layer)
    q = live[q_name][row, node.token, node.component]
    k = live[k_name][row, node.attended_token, node.component // (attn.n_heads // attn.n_kv_heads)]
    if trace.attention_trace_type == AttentionTraceType.QUERY:
        k = k.detach()
    elif trace.attention_trace_type == AttentionTraceType.KEY:
        q = q.detach()
    return attn.scores(q @ k)


def _through_value(
    model: HookedTransformer, live: Live, row: int, node: NodeIndex, g: torch.Tensor
) -> torch.Tensor:
    """The pair's direct effect on a downstream gradient g [d] with the pattern held fixed:
    A[q,k,h]·((v[k,h] W_O[h])·g), differentiable through the value only."""
    attn = model.blocks[node.layer].attn
    kv_head = node.component // (attn.n_heads // attn.n_kv_heads)
    v = live[_V.format(L=node.layer)][row, node.attended_token, kv_head]  # [dh]
    write = v @ attn.W_O[node.component]  # [d]
    a = live[_PATTERN.format(L=node.layer)][row, node.component, node.token, node.attended_token]
    return a.detach() * (write @ g.detach())


def _view_hooks(model: HookedTransformer, layer: int) -> set[str]:
    names = {_V.format(L=layer), f"blocks.{layer}.ln1.hook_scale"}
    return names | set(qk_hooks(model, layer))


register_node_type(
    NodeTypeDescription(
        node_type=T,
        label="attention head",
        short_name="attn",
        key="attn",
        writes="attention",
        width=lambda model, layer: model.cfg.n_heads,
        per_token_pair=True,
        ablation=Ablation(hooks=lambda model, node: [_PATTERN.format(L=node.layer)], set=_set),
        trace=Trace(hooks=_trace_hooks, pre_activation=_score, value=_through_value),
        view_hooks=_view_hooks,
        token_view_lists=6,  # output, query-side and key-side tokens, up and down
        dataset_metric="write_magnitude",
        api_name="attention_head",
    )
)


# ---- derived scalars -------------------------------------------------------------------------------


@derived_scalar(T, "activation", acts=pattern_reads(), signed=False)
def head_activation(state: PassState, layer: int) -> torch.Tensor:
    return pattern(state, layer)


@derived_scalar(
    T, "write_magnitude", acts=pattern_reads(_V), signed=False, fixed_acts=(_PATTERN, _V)
)
def head_write_magnitude(state: PassState, layer: int) -> torch.Tensor:
    """A·‖v W_O‖; through a post-norm A·‖v W_O ⊙ w‖ / s[q] where its scale was recorded (the
    engine always records it; a dataset, whose hooks do not depend on the model, gets the
    magnitude before the post-norm's 1/s)."""
    out = pattern(state, layer) * head_write_norms(state, layer).transpose(1, 2)[:, :, None, :]
    scale = state.acts.get(f"blocks.{layer}.ln1_post.hook_scale")
    if scale is not None:
        out = out / scale[:, None, :, :]
    return out


@derived_scalar(T, "direct_effect", acts=pattern_reads(_V, post_norm=True))
def head_direct_effect(state: PassState, layer: int) -> torch.Tensor:
    w_o = state.model.blocks[layer].attn.W_O  # [H, dh, d]
    g = state.gradient_at_write(layer, "attention", 2 * layer + 1)  # [b, n, d]
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


@derived_scalar(T, "estimated_total_effect", acts=pattern_reads(_V), grads=(_Z,))
def head_total_effect(state: PassState, layer: int) -> torch.Tensor:
    """A·∂D/∂A (act × grad), ∂D/∂A from the gradient at z (`pattern_gradient`)."""
    return pattern(state, layer) * pattern_gradient(state, layer)


# ---- token views -----------------------------------------------------------------------------------


@token_view(T)
def head_views(queue: ViewQueue, node: NodeIndex) -> None:
    """Output: the logit lens of v[k,h] W_O[h], times A. Query side (the input view) and key side:
    the gradient of the score with respect to the query (key) token's residual, ln1 scale fixed,
    over every token embedding; with rotary positions the gradient is rotated back by -θ."""
    model, row, L = queue.model, queue.row, node.layer
    t, h, kt = node.token, node.component, node.attended_token
    assert kt is not None
    attn = model.blocks[L].attn
    q_name, k_name = qk_hooks(model, L)
    q_all, k_all = queue.act(q_name), queue.act(k_name)
    if q_all is not None and k_all is not None and queue.act(_V.format(L=L)) is not None:
        a = float(pattern_row(queue.state, L, t)[row, h, kt])
        vo = head_values(queue.state, L)[row, kt, h] @ attn.W_O[h]
        lnf = model.ln_final
        queue.output.add(node, ("head", L, row, kt, h), lambda: norm_linear(lnf, vo), a)
    s1 = queue.act(f"blocks.{L}.ln1.hook_scale")
    if q_all is None or k_all is None or s1 is None:
        return
    kvh = h // (attn.n_heads // attn.n_kv_heads)
    q_vec, k_vec = q_all[row, t, h], k_all[row, kt, kvh]
    # d score / d q_raw = R(pos_q)^T k_rot / sqrt(dh); R^T rotates by -θ.
    g_q, g_k = k_vec * attn.scale, q_vec * attn.scale
    if model.cfg.positional == "rotary":
        cos, sin = queue.rope(L)
        g_q = Rotary.rotate(g_q[None, None, None], cos[:, t : t + 1], -sin[:, t : t + 1]).flatten()
        g_k = Rotary.rotate(
            g_k[None, None, None], cos[:, kt : kt + 1], -sin[:, kt : kt + 1]
        ).flatten()
    dh = attn.d_head
    w_q = attn.q_proj.weight[h * dh : (h + 1) * dh]  # [dh, d]
    w_k = attn.k_proj.weight[kvh * dh : (kvh + 1) * dh]
    ln1 = model.blocks[L].ln1
    queue.input.add(
        node,
        ("q", L, row, t, kt, h),
        norm_linear_transpose(ln1, g_q @ w_q),
        1.0 / float(s1[row, t, 0]),
    )
    queue.key_side.add(
        node,
        ("k", L, row, t, kt, h),
        norm_linear_transpose(ln1, g_k @ w_k),
        1.0 / float(s1[row, kt, 0]),
    )
