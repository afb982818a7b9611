"""The parts of a block: norms, rotary positions, attention, the MLP, and the block itself.

Each architecture choice of a `ModelConfig` (config.py) is a branch here, read top to bottom:
norm kind and placement (pre, sandwich, post), q/k norms, partial and scaled rotary, sliding
windows, soft-capped scores, parallel attention and MLP. Every internal quantity passes through a
named `HookPoint` (hooks.py has the table).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from neuron_explainer.models.config import ModelConfig
from neuron_explainer.models.hooks import HookPoint

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}
Rope = tuple[torch.Tensor, torch.Tensor]


class Norm(nn.Module):
    """LayerNorm or RMSNorm, exposing its denominator at `hook_scale` so it can be held fixed.

    kind "identity" (the pre-norms of post-norm blocks, OLMo-2) passes x through with scale 1 and
    gain 1, so every block has the same hook points and the engine's formulas need no branch.
    Gains are stored as the multiplier itself: Gemma's (1 + w) is folded in when weights load.
    """

    def __init__(self, cfg: ModelConfig, width: int = 0, kind: str = "", hooked: bool = True):
        super().__init__()
        width = width or cfg.d_model
        self.kind = kind or cfg.norm
        self.eps = cfg.norm_eps
        if self.kind == "identity":
            self.register_buffer("weight", torch.ones(width), persistent=False)
        else:
            self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width)) if self.kind == "layernorm" else None
        self.hooked = hooked
        if hooked:
            self.hook_scale = HookPoint()  # [b, n, 1]
            self.hook_normalized = HookPoint()  # [b, n, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "identity":
            if self.hooked and self.hook_scale.has_hooks:
                self.hook_scale(x.new_ones(*x.shape[:-1], 1))
            return self.hook_normalized(x) if self.hooked else x
        dtype = x.dtype
        x = x.float()
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        scale = (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        if self.hooked:
            scale = self.hook_scale(scale)
        x = (x / scale).to(dtype) * self.weight
        if self.bias is not None:
            x = x + self.bias
        return self.hook_normalized(x) if self.hooked else x


def rotary_inv_freq(cfg: ModelConfig, theta: float, scaled: bool = True) -> torch.Tensor:
    """[rotary_dims / 2] inverse frequencies, with "linear" or "llama3" scaling when `scaled`."""
    dims = cfg.rotary_dims
    inv_freq = 1.0 / (theta ** (torch.arange(0, dims, 2, dtype=torch.int64).float() / dims))
    if not scaled or cfg.rope_scaling == "none":
        return inv_freq
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    # "llama3": long wavelengths slowed by the factor, short ones kept, a smooth blend between.
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    context = cfg.rope_original_context
    wavelen = 2 * math.pi / inv_freq
    scaled_freq = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled_freq / factor + smooth * scaled_freq
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, blended, scaled_freq)


class Rotary(nn.Module):
    """Rotary position embedding in the Hugging Face (rotate-half) layout, on the first
    `cfg.rotary_dims` dims of each head (all of them unless the rotary is partial)."""

    inv_freq: torch.Tensor

    def __init__(self, cfg: ModelConfig, local: bool = False) -> None:
        super().__init__()
        self.cfg, self.local = cfg, local
        self.register_buffer("inv_freq", self.make_inv_freq(), persistent=False)

    def make_inv_freq(self) -> torch.Tensor:
        if self.local:  # Gemma 3's sliding-window layers: their own base, never scaled
            return rotary_inv_freq(self.cfg, self.cfg.rope_local_theta, scaled=False)
        return rotary_inv_freq(self.cfg, self.cfg.rope_theta)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """positions [b, n] -> cos, sin [b, n, 1, rotary_dims] to broadcast over heads."""
        freqs = positions[..., None].float() * self.inv_freq  # [b, n, r/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Turn the first cos.shape[-1] dims of x [..., dh]; the rest pass unchanged."""
        r = cos.shape[-1]
        if r < x.shape[-1]:
            return torch.cat([Rotary.rotate(x[..., :r], cos, sin), x[..., r:]], dim=-1)
        half = r // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


def side_by_side(*projections: nn.Linear) -> torch.Tensor | None:
    """The [in, out_1 + out_2 + ...] matrix whose column blocks are these projections' transposed
    weights, when they are stored that way (one contiguous tensor: how the loaders store them,
    `HookedTransformer.weight_layout`), so that one product computes all of them; None when they
    are not (a weight replaced, converted or moved on its own), and they run one by one."""
    first = projections[0].weight  # [out, in]: a transposed view, with strides (1, width)
    width = sum(p.out_features for p in projections)
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for p in projections:
        w = p.weight
        if (
            w.stride() != (1, width)
            or w.storage_offset() != offset
            or w.untyped_storage().data_ptr() != storage
        ):
            return None
        offset += p.out_features
    return first.as_strided((first.shape[1], width), (width, 1))


def project(x: torch.Tensor, *projections: nn.Linear) -> list[torch.Tensor]:
    """Each projection of one position x [..., d] (a generation step), through one product when
    their weights are stored side by side: a single pass over the weights, which is what a step
    costs on CPU (memory-bound)."""
    stored = side_by_side(*projections) if x.numel() == x.shape[-1] else None
    if stored is None:
        return [p(x) for p in projections]
    out = x @ stored
    if projections[0].bias is not None:
        out = out + torch.cat([p.bias for p in projections if p.bias is not None])
    return list(out.split([p.out_features for p in projections], dim=-1))


def causal_mask(n: int, n_k: int, device: torch.device, window: int = 0) -> torch.Tensor:
    """[n, n_k] bool: the n queries are the last n of n_k positions (n_k > n after cached ones);
    with a window, a query sees only the last `window` positions (itself included)."""
    mask = torch.ones(n, n_k, dtype=torch.bool, device=device).tril(n_k - n)
    return mask.triu(n_k - n - window + 1) if window else mask


class KeyValueCache(Protocol):
    """What the forward pass needs of a key/value cache (generation.py's `KVCache` is one)."""

    @property
    def length(self) -> int:
        """Positions cached so far (read before the first layer extends the cache)."""
        ...

    def extend(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' keys (after rotary) and values [b, n, Hkv, dh] to the layer's
        and return all of them [b, n_cached + n, Hkv, dh]."""
        ...


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # names this layer's entry in a key/value cache
        self.n_heads, self.n_kv_heads, self.d_head = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.d_head, bias=cfg.attn_qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.d_head, bias=cfg.attn_qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.d_head, bias=cfg.attn_qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.d_head, cfg.d_model, bias=cfg.attn_out_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":  # RMSNorm over each head (dh) or over all heads at once
            q_width, k_width = (cfg.d_head, cfg.d_head)
            if cfg.qk_norm == "all_heads":
                q_width, k_width = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
            self.q_norm = Norm(cfg, q_width, kind="rmsnorm", hooked=False)
            self.k_norm = Norm(cfg, k_width, kind="rmsnorm", hooked=False)
        self.scale = cfg.attn_scale or 1 / math.sqrt(cfg.d_head)
        self.softcap = cfg.attn_softcap
        self.window = cfg.sliding_window if layer in cfg.sliding_layers else 0
        self.rotary = cfg.positional == "rotary"
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        if self.rotary:
            self.hook_rot_q, self.hook_rot_k = HookPoint(), HookPoint()
        self.hook_attn_scores = HookPoint()  # [b, H, q, k]
        self.hook_pattern = HookPoint()  # [b, H, q, k]
        self.hook_z = HookPoint()  # [b, n, H, dh]

    @property
    def W_O(self) -> torch.Tensor:
        """[H, dh, d]: head h writes z[h] @ W_O[h] into the residual stream (pre-norm blocks;
        through the frozen ln1_post where there is one, docs/engine.md)."""
        return self.o_proj.weight.T.reshape(self.n_heads, self.d_head, -1)

    def scores(self, qk: torch.Tensor) -> torch.Tensor:
        """Pre-softmax scores from dot products q·k (queries and keys after rotary), before
        masking: times the scale, soft-capped c·tanh(s/c) where the model caps them."""
        s = qk * self.scale
        return torch.tanh(s / self.softcap) * self.softcap if self.softcap else s

    def forward(
        self,
        x: torch.Tensor,  # [b, n, d], already normalized
        rope: Rope | None,
        mask: torch.Tensor | None,  # [b, 1, n, n_k] bool (True = may attend), None = plain causal
        kv_cache: KeyValueCache | None = None,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        if self.qk_norm == "all_heads":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(b, n, self.n_heads, self.d_head), k.view(b, n, self.n_kv_heads, self.d_head)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.hook_q(q), self.hook_k(k)
        v = self.hook_v(v.view(b, n, self.n_kv_heads, self.d_head))
        if rope is not None:
            q = self.hook_rot_q(Rotary.rotate(q, *rope))
            k = self.hook_rot_k(Rotary.rotate(k, *rope))
        if kv_cache is not None:  # the keys and values of the cached positions, then these
            k, v = kv_cache.extend(self.layer, k, v)
        group = self.n_heads // self.n_kv_heads
        observed = self.hook_attn_scores.has_hooks or self.hook_pattern.has_hooks
        if n == 1 and mask is None and not observed:
            return self.o_proj(self._one_query(q, k, v).reshape(b, 1, self.n_heads * self.d_head))
        # Queries [b, H, n, dh], keys and values [b, H, n_k, dh] (n_k: cached and new positions);
        # with grouped-query attention, head h reads key/value head h // group.
        qh = q.transpose(1, 2)
        kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
        vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
        n_k = kh.shape[2]
        if self.window and n_k > self.window:
            band = causal_mask(n, n_k, x.device, self.window)
            mask = band if mask is None else mask & band
        if self.hook_attn_scores.has_hooks or self.hook_pattern.has_hooks or self.softcap:
            scores = self.scores(qh @ kh.transpose(-1, -2))
            if mask is None:
                mask = causal_mask(n, n_k, x.device)
            scores = self.hook_attn_scores(scores.masked_fill(~mask, float("-inf")))
            pattern = self.hook_pattern(scores.softmax(dim=-1))
            z = pattern @ vh
        else:
            # Nothing observes the pattern: the fused kernel is faster and never stores it. Causal
            # needs no mask when n == n_k (is_causal), nor for one new position (it sees every key).
            if mask is None and 1 < n < n_k:
                mask = causal_mask(n, n_k, x.device)
            causal = mask is None and n > 1
            z = F.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=mask, is_causal=causal, scale=self.scale
            )
        z = self.hook_z(z.transpose(1, 2))  # [b, n, H, dh]
        return self.o_proj(z.reshape(b, n, self.n_heads * self.d_head))

    def probabilities(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Attention probabilities [b, H, n_q, n_k] of queries [b, n_q, H, dh], the last n_q of
        n_k positions, against keys [b, n_k, Hkv, dh] (both as the scores read them: after rotary
        and q/k norms): causal, within the sliding window. The forward's own computation where a
        hook observes the pattern (the same operations, so the same values), for unpadded rows and
        the real tokens of right-padded ones; a pass that let the fused kernel run recomputes a
        layer's pattern with it."""
        group = self.n_heads // self.n_kv_heads
        qh = q.transpose(1, 2)
        kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
        n, n_k = qh.shape[2], kh.shape[2]
        window = self.window if self.window and n_k > self.window else 0
        scores = self.scores(qh @ kh.transpose(-1, -2))
        mask = causal_mask(n, n_k, q.device, window)
        return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)

    def _one_query(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """z [b, 1, H, dh] for one new position (a generation step), which sees every key (the last
        `window` with a sliding window). Grouped-query heads read their key/value head in place:
        the queries of the `group` heads sharing one are a [group, dh] matrix against its keys, so
        nothing is copied per head (the fused kernel is slow for one query on CPU)."""
        b, _, _, dh = q.shape
        if self.window and k.shape[1] > self.window:
            k, v = k[:, -self.window :], v[:, -self.window :]
        qg = q.reshape(b, self.n_kv_heads, self.n_heads // self.n_kv_heads, dh)
        scores = self.scores(qg @ k.permute(0, 2, 3, 1))  # [b, Hkv, group, n_k]
        z = scores.softmax(dim=-1) @ v.transpose(1, 2)  # [b, Hkv, group, dh]
        return self.hook_z(z.reshape(b, 1, self.n_heads, dh))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.gated_mlp
        self.act = ACTIVATIONS[cfg.activation]
        self.w_in = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)  # the gate when gated
        if self.gated:
            self.w_up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
            self.hook_pre_linear = HookPoint()
        self.w_out = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    @property
    def W_out(self) -> torch.Tensor:
        """[m, d]: neuron i writes post[i] * W_out[i] into the residual stream (pre-norm blocks;
        through the frozen ln2_post where there is one)."""
        return self.w_out.weight.T

    def neuron_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] (normalized) -> the neuron activations [..., m] fed to the output projection."""
        if not self.gated:
            return self.act(self.hook_pre(self.w_in(x)))
        gate, up = project(x, self.w_in, self.w_up)
        return self.act(self.hook_pre(gate)) * self.hook_pre_linear(up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(self.hook_post(self.neuron_activations(x)))


class Block(nn.Module):
    """resid_mid = resid_pre + attn_out, resid_post = resid_mid + mlp_out, where
    attn_out = [ln1_post](attn(ln1(resid_pre))) and mlp_out = [ln2_post](mlp(ln2(resid_mid)));
    parallel blocks (GPT-NeoX) feed the MLP ln2(resid_pre) instead."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        pre_kind = "identity" if cfg.norm_placement == "post" else ""
        self.ln1 = Norm(cfg, kind=pre_kind)
        self.attn = Attention(cfg, layer)
        self.ln2 = Norm(cfg, kind=pre_kind)
        self.mlp = MLP(cfg)
        self.post_norms = cfg.post_norms
        if self.post_norms:
            self.ln1_post, self.ln2_post = Norm(cfg), Norm(cfg)
        self.parallel = cfg.parallel_blocks
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = (
            HookPoint(),
            HookPoint(),
            HookPoint(),
        )
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None,
        mask: torch.Tensor | None,
        kv_cache: KeyValueCache | None = None,
    ) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        attn_out = self.attn(self.ln1(x), rope, mask, kv_cache)
        if self.post_norms:
            attn_out = self.ln1_post(attn_out)
        mid = self.hook_resid_mid(x + self.hook_attn_out(attn_out))
        mlp_out = self.mlp(self.ln2(x if self.parallel else mid))
        if self.post_norms:
            mlp_out = self.ln2_post(mlp_out)
        return self.hook_resid_post(mid + self.hook_mlp_out(mlp_out))
