"""One readable pre-norm decoder-only transformer covering the GPT-2 and Llama families.

GPT-2: LayerNorm, GELU MLP, learned positions, biases everywhere.
Llama family (Llama, SmolLM2, Mistral, Qwen2): RMSNorm, SwiGLU MLP, rotary positions, grouped-query
attention, optional q/k/v biases (Qwen2), tied or untied embeddings.

Sizes and architecture choices come from a `ModelConfig` (config.py). Every internal quantity passes
through a named `HookPoint` (see hooks.py for the table). Weights live in `nn.Linear` modules in
PyTorch's (out, in) layout; per-head and per-neuron views used by the interpretability code (`W_O`,
`W_out`, `W_U`) are properties.

`forward` can take a `KeyValueCache`: then the tokens are the positions after the cached ones, which
attend to the cached keys and values and are appended to them (generation.py runs a prompt once,
then one position per new token).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from neuron_explainer.models.autoencoders import AutoencoderSide, SparseAutoencoder
from neuron_explainer.models.config import ModelConfig, expected_hook_names
from neuron_explainer.models.hooks import (
    BackwardHookFn,
    ForwardHookFn,
    HookPoint,
    NameFilter,
    matches,
)
from neuron_explainer.models.tokenizer import Tokenizer

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}


class Norm(nn.Module):
    """LayerNorm or RMSNorm, exposing its denominator at `hook_scale` so it can be held fixed."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.norm
        self.eps = cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.norm == "layernorm" else None
        self.hook_scale = HookPoint()  # [b, n, 1]
        self.hook_normalized = HookPoint()  # [b, n, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        x = (x / scale).to(dtype) * self.weight
        if self.bias is not None:
            x = x + self.bias
        return self.hook_normalized(x)


class Rotary(nn.Module):
    """Rotary position embedding in the Hugging Face (rotate-half) layout."""

    inv_freq: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.d_head, 2).float() / cfg.d_head))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [b, n] -> cos, sin [b, n, 1, dh] to broadcast over heads."""
        freqs = positions[..., None].float() * self.inv_freq  # [b, n, dh/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


def causal_mask(n: int, n_k: int, device: torch.device) -> torch.Tensor:
    """[n, n_k] bool: the n queries are the last n of n_k positions (n_k > n after cached ones)."""
    return torch.ones(n, n_k, dtype=torch.bool, device=device).tril(n_k - n)


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
        self.rotary = cfg.positional == "rotary"
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        if self.rotary:
            self.hook_rot_q, self.hook_rot_k = HookPoint(), HookPoint()
        self.hook_attn_scores = HookPoint()  # [b, H, q, k]
        self.hook_pattern = HookPoint()  # [b, H, q, k]
        self.hook_z = HookPoint()  # [b, n, H, dh]

    @property
    def W_O(self) -> torch.Tensor:
        """[H, dh, d]: head h writes z[h] @ W_O[h] into the residual stream."""
        return self.o_proj.weight.T.reshape(self.n_heads, self.d_head, -1)

    def forward(
        self,
        x: torch.Tensor,  # [b, n, d], already normalized
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,  # [b, 1, n, n] bool (True = may attend), None = plain causal
        kv_cache: KeyValueCache | None = None,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.hook_q(self.q_proj(x).view(b, n, self.n_heads, self.d_head))
        k = self.hook_k(self.k_proj(x).view(b, n, self.n_kv_heads, self.d_head))
        v = self.hook_v(self.v_proj(x).view(b, n, self.n_kv_heads, self.d_head))
        if rope is not None:
            q = self.hook_rot_q(Rotary.rotate(q, *rope))
            k = self.hook_rot_k(Rotary.rotate(k, *rope))
        if kv_cache is not None:  # the keys and values of the cached positions, then these
            k, v = kv_cache.extend(self.layer, k, v)
        group = self.n_heads // self.n_kv_heads
        # Queries [b, H, n, dh], keys and values [b, H, n_k, dh] (n_k: cached and new positions);
        # with grouped-query attention, head h reads key/value head h // group.
        qh = q.transpose(1, 2)
        kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
        vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
        n_k = kh.shape[2]
        if self.hook_attn_scores.has_hooks or self.hook_pattern.has_hooks:
            scores = qh @ kh.transpose(-1, -2) / math.sqrt(self.d_head)
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
            z = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal)
        z = self.hook_z(z.transpose(1, 2))  # [b, n, H, dh]
        return self.o_proj(z.reshape(b, n, self.n_heads * self.d_head))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.gated_mlp
        self.act = _ACTIVATIONS[cfg.activation]
        self.w_in = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)  # the gate when gated
        if self.gated:
            self.w_up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
            self.hook_pre_linear = HookPoint()
        self.w_out = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    @property
    def W_out(self) -> torch.Tensor:
        """[m, d]: neuron i writes post[i] * W_out[i] into the residual stream."""
        return self.w_out.weight.T

    def neuron_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] (normalized) -> the neuron activations [..., m] fed to the output projection."""
        pre = self.hook_pre(self.w_in(x))
        if self.gated:
            return self.act(pre) * self.hook_pre_linear(self.w_up(x))
        return self.act(pre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(self.hook_post(self.neuron_activations(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln1 = Norm(cfg)
        self.attn = Attention(cfg, layer)
        self.ln2 = Norm(cfg)
        self.mlp = MLP(cfg)
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = (
            HookPoint(),
            HookPoint(),
            HookPoint(),
        )
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        kv_cache: KeyValueCache | None = None,
    ) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(
            x + self.hook_attn_out(self.attn(self.ln1(x), rope, mask, kv_cache))
        )
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.ln2(x))))


class HookedTransformer(nn.Module):
    """The subject model. `tokenizer` is attached by the loaders (None for bare random models)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.hook_embed = HookPoint()
        if cfg.positional == "learned":
            self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model)
            self.hook_pos_embed = HookPoint()
        else:
            self.rotary = Rotary(cfg)
        # A ModuleList, typed as what it holds so `model.blocks[L].attn.W_O` type-checks.
        self.blocks = cast(
            Sequence[Block], nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        )
        self.ln_final = Norm(cfg)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tied_embeddings:
            self.unembed.weight = self.embed.weight
        self.hook_logits = HookPoint()
        self.tokenizer: Tokenizer | None = None
        # Sparse autoencoders by hook name (attach_autoencoder). Held, not spliced: the engine
        # splices one in only for requests about its latents. Not submodules, so the model's
        # state dict and module tree are those of the plain model.
        self.autoencoders: dict[str, SparseAutoencoder] = {}
        found = {n: m for n, m in self.named_modules() if isinstance(m, HookPoint)}
        order = expected_hook_names(cfg)
        assert set(found) == set(order), set(found) ^ set(order)
        self._hook_points: dict[str, HookPoint] = {n: found[n] for n in order}
        for name, hp in self._hook_points.items():
            hp.name = name

    # ---- views used by interpretability code -------------------------------------------------

    @property
    def W_E(self) -> torch.Tensor:
        """[V, d] token embeddings."""
        return self.embed.weight

    @property
    def W_U(self) -> torch.Tensor:
        """[d, V] unembedding (logits = ln_final(x) @ W_U)."""
        return self.unembed.weight.T

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    # ---- the forward pass ----------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        logits_positions: torch.Tensor | None = None,
        kv_cache: KeyValueCache | None = None,
    ) -> torch.Tensor:
        """tokens [b, n] (or [n]); attention_mask [b, n], 1 for real tokens (right or left padding).

        Returns logits [b, n, V], or [b, V] at `logits_positions` [b] (one position per row), which
        skips the unembedding everywhere else. With a `kv_cache` (no padding), the tokens are the
        positions after the cached ones; hooks then see only these positions (`[b, n, ...]`;
        `hook_pattern` `[b, H, n, n_cached + n]`).
        """
        if tokens.ndim == 1:
            tokens = tokens[None]
            attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
        b, n = tokens.shape
        start = 0 if kv_cache is None else kv_cache.length
        if start + n > self.cfg.n_ctx:
            raise ValueError(
                f"{start + n} tokens exceed the model's context length of {self.cfg.n_ctx}"
            )
        mask: torch.Tensor | None = None
        if attention_mask is None or bool(attention_mask.all()):
            positions = torch.arange(start, start + n, device=tokens.device).expand(b, n)
        elif kv_cache is not None:
            raise ValueError("a key/value cache takes unpadded sequences (no attention_mask)")
        else:
            real = attention_mask.to(device=tokens.device, dtype=torch.bool)
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)
            causal = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril()
            # A query sees real earlier keys, and always itself, so padded rows stay finite.
            eye = torch.eye(n, dtype=torch.bool, device=tokens.device)
            mask = ((causal & real[:, None, :]) | eye)[:, None]
        x = self.hook_embed(self.embed(tokens))
        rope = None
        if self.cfg.positional == "learned":
            x = x + self.hook_pos_embed(self.pos_embed(positions))
        else:
            rope = self.rotary.cos_sin(positions, x.dtype)
        for block in self.blocks:
            x = block(x, rope, mask, kv_cache)
        if logits_positions is not None:
            x = x[torch.arange(b, device=x.device), logits_positions.to(x.device)][:, None]
            return self.hook_logits(self.unembed(self.ln_final(x)))[:, 0]
        return self.hook_logits(self.unembed(self.ln_final(x)))

    # ---- hooks ---------------------------------------------------------------------------------

    def hook_points(self) -> dict[str, HookPoint]:
        """All hook points by name, in forward order."""
        return dict(self._hook_points)

    def hook_names(self, name_filter: NameFilter | None = None) -> list[str]:
        names = list(self._hook_points)
        return names if name_filter is None else [n for n in names if matches(n, name_filter)]

    def _resolve(self, name_filter: NameFilter) -> list[HookPoint]:
        if isinstance(name_filter, str):
            if name_filter not in self._hook_points:
                raise KeyError(f"no hook point named {name_filter!r}; see model.hook_names()")
            return [self._hook_points[name_filter]]
        found = [self._hook_points[n] for n in self.hook_names(name_filter)]
        if not found:
            raise KeyError(f"no hook point matches {name_filter!r}; see model.hook_names()")
        return found

    @contextmanager
    def hooks(
        self,
        fwd: Sequence[tuple[NameFilter, ForwardHookFn]] = (),
        bwd: Sequence[tuple[NameFilter, BackwardHookFn]] = (),
    ) -> Iterator[HookedTransformer]:
        """Attach hooks for the duration of a `with` block; they are removed on exit, even on error."""
        added: list[tuple[list[Any], Any]] = []
        try:
            for name_filter, fn in fwd:
                for hp in self._resolve(name_filter):
                    hp.forward_fns.append(fn)
                    added.append((hp.forward_fns, fn))
            for name_filter, bfn in bwd:
                for hp in self._resolve(name_filter):
                    hp.backward_fns.append(bfn)
                    added.append((hp.backward_fns, bfn))
            yield self
        finally:
            for fns, fn in reversed(added):
                fns.remove(fn)

    def reset_hooks(self) -> None:
        for hp in self._hook_points.values():
            hp.clear()

    def run_with_cache(
        self,
        tokens: torch.Tensor,
        names: NameFilter | Sequence[str] | None = None,
        attention_mask: torch.Tensor | None = None,
        detach: bool = True,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run forward and return (logits, cache) with the values at the requested hook points."""
        if names is None:
            selected = self.hook_names()
        elif isinstance(names, str) or callable(names):
            selected = self.hook_names(names)
        else:
            unknown = [n for n in names if n not in self._hook_points]
            if unknown:
                raise KeyError(f"unknown hook point(s) {unknown}; see model.hook_names()")
            selected = list(names)
        cache: dict[str, torch.Tensor] = {}

        def save(x: torch.Tensor, hook: HookPoint) -> None:
            cache[hook.name] = x.detach() if detach else x

        with self.hooks(fwd=[(n, save) for n in selected]):
            logits = self(tokens, attention_mask)
        return logits, cache

    # ---- autoencoders --------------------------------------------------------------------------

    def attach_autoencoder(self, ae: SparseAutoencoder) -> SparseAutoencoder:
        """Hold `ae` at its hook point so the engine can offer its latents as nodes; returns it,
        moved to the model's device (its weights stay float32).

        Only block-level MLP-side (`hook_mlp_out`, `mlp.hook_post`) and attention-side
        (`hook_attn_out`) autoencoders are latents of the debugger; each block holds at most one
        of each side, so (side, layer) names an autoencoder. Raises ValueError otherwise, or when
        the hook point or its width does not fit this model. An autoencoder at the same hook point
        replaces the one held there."""
        ae.check_compatible(self)
        side, layer = ae.cfg.side, ae.cfg.layer
        if side is None or layer is None:
            raise ValueError(
                f"the autoencoder reads {ae.hook_name!r}; only autoencoders of a block's MLP "
                "(blocks.L.hook_mlp_out, blocks.L.mlp.hook_post) or attention output "
                "(blocks.L.hook_attn_out) give debugger nodes"
            )
        other = self.autoencoder(side, layer)
        if other is not None and other.hook_name != ae.hook_name:
            raise ValueError(
                f"layer {layer} already has an {side}-side autoencoder at {other.hook_name!r}; "
                f"one per side and layer (detach_autoencoder first)"
            )
        ae = ae.to(self.device)
        ae.requires_grad_(False)
        ae.eval()
        self.autoencoders[ae.hook_name] = ae
        return ae

    def detach_autoencoder(self, hook_name: str) -> SparseAutoencoder:
        """Stop holding the autoencoder at `hook_name` and return it (KeyError if none)."""
        return self.autoencoders.pop(hook_name)

    def autoencoder(self, side: AutoencoderSide, layer: int) -> SparseAutoencoder | None:
        """The `side` ("mlp" or "attention") autoencoder held for block `layer`, if any."""
        for ae in self.autoencoders.values():
            if ae.cfg.side == side and ae.cfg.layer == layer:
                return ae
        return None

    # ---- text helpers --------------------------------------------------------------------------

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer attached; pass token ids instead")
        return self.tokenizer

    def to_tokens(
        self, texts: str | Sequence[str], prepend_bos: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize and right-pad: (tokens [b, n], attention_mask [b, n])."""
        tok = self._require_tokenizer()
        if isinstance(texts, str):
            texts = [texts]
        rows = [tok.encode(t) for t in texts]
        if prepend_bos:
            if tok.bos_token_id is None:
                raise ValueError("this tokenizer has no BOS token")
            rows = [[tok.bos_token_id, *r] for r in rows]
        return pad_right(rows, pad_id=0, device=self.device)


def pad_right(
    rows: Sequence[Sequence[int]], pad_id: int = 0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows into (tokens [b, n], attention_mask [b, n])."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt must have at least one token")
    n = max(len(r) for r in rows)
    tokens = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return tokens.to(device), mask.to(device)
