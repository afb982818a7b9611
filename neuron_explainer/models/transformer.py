"""One readable decoder-only transformer for every supported family (architectures.py lists them).

GPT-2: LayerNorm, GELU MLP, learned positions, biases everywhere. The Llama family (Llama 2/3,
SmolLM2, Mistral, Qwen2/3, Phi-3): RMSNorm, SwiGLU, rotary, grouped-query attention. Gemma 2/3 and
OLMo-2 add norms after attention and MLP; GPT-NeoX runs attention and MLP in parallel. The parts of
a block, and each of these choices, are in layers.py.

Sizes and architecture choices come from a `ModelConfig` (config.py). Every internal quantity passes
through a named `HookPoint` (see hooks.py for the table). Weights live in `nn.Linear` modules in
PyTorch's (out, in) layout; per-head and per-neuron views used by the interpretability code (`W_O`,
`W_out`, `W_U`) are properties.

`forward` can take a `KeyValueCache`: then the tokens are the positions after the cached ones, which
attend to the cached keys and values and are appended to them (generation.py runs a prompt once,
then one position per new token).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
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
from neuron_explainer.models.layers import (
    Attention,
    Block,
    KeyValueCache,
    Norm,
    Rope,
    Rotary,
    causal_mask,
)
from neuron_explainer.models.tokenizer import Tokenizer

__all__ = [
    "Attention",
    "Block",
    "HookedTransformer",
    "KeyValueCache",
    "ModelConfig",
    "Norm",
    "Rotary",
    "causal_mask",
    "pad_right",
]


class SoftCap(nn.Module):
    """Final logit soft-cap (Gemma 2): capped = c·tanh(raw/c), written as raw / scale with
    scale = raw / capped at `hook_scale`, so the engine can hold it fixed like a norm's scale
    (docs/engine.md): then logits are linear in the residual stream and D decomposes exactly."""

    def __init__(self, cap: float) -> None:
        super().__init__()
        self.cap = cap
        self.hook_scale = HookPoint()  # [b, n, V]

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        capped = torch.tanh(raw / self.cap) * self.cap
        if not self.hook_scale.has_hooks:
            return capped
        scale = torch.where(raw == 0, torch.ones_like(raw), raw / capped)
        return raw / self.hook_scale(scale)


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
            if cfg.rope_local_theta and cfg.sliding_layers:
                self.rotary_local = Rotary(cfg, local=True)
        # A ModuleList, typed as what it holds so `model.blocks[L].attn.W_O` type-checks.
        self.blocks = cast(
            Sequence[Block], nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        )
        self.ln_final = Norm(cfg)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tied_embeddings:
            self.unembed.weight = self.embed.weight
        if cfg.final_softcap:
            self.logit_softcap = SoftCap(cfg.final_softcap)
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

    def weight_layout(self) -> list[list[str]]:
        """How the loaders store the projection matrices in memory (same values and shapes either
        way): each group's `weight`s are the transposed column blocks of one contiguous
        [in, out_1 + out_2 + ...] tensor. Groups: a block's query, key and value projections; its
        MLP gate and up projections (the input projection alone without a gate); and on their own
        the attention output projection and the unembedding (the embedding's storage when tied).
        The MLP output projection keeps the usual [out, in] layout.

        Why: a forward over many positions runs its matrix products at the same speed in either
        layout, but a generation step multiplies one vector by every matrix, which is bound by
        memory bandwidth; on CPU it reads a widening matrix in this layout about twice as fast (the
        unembedding: 10 → 5 ms) and a group as one product faster than its parts one by one
        (`side_by_side` in layers.py). bench/generate.py measures the whole step."""
        groups: list[list[str]] = []
        for i, block in enumerate(self.blocks):
            attn, mlp = f"blocks.{i}.attn", f"blocks.{i}.mlp"
            groups.append([f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"])
            groups.append([f"{mlp}.w_in", f"{mlp}.w_up"] if block.mlp.gated else [f"{mlp}.w_in"])
            groups.append([f"{attn}.o_proj"])
        groups.append(["embed" if self.cfg.tied_embeddings else "unembed"])
        return groups

    def rotary_for(self, layer: int) -> Rotary:
        """The rotary embedding block `layer` uses (Gemma 3's sliding layers have their own)."""
        if hasattr(self, "rotary_local") and layer in self.cfg.sliding_layers:
            return cast(Rotary, self.rotary_local)
        return cast(Rotary, self.rotary)

    def init_buffers(self) -> None:
        """Recompute the buffers that are not weights (rotary frequencies, the unit gains of
        identity norms), as after building the model on the meta device."""
        for module in self.modules():
            if isinstance(module, Rotary):
                module.inv_freq = module.make_inv_freq().to(self.device)
            elif isinstance(module, Norm) and module.kind == "identity":
                module.register_buffer("weight", torch.ones(module.weight.shape), persistent=False)

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
        x = self.embed(tokens)
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        x = self.hook_embed(x)
        ropes: dict[bool, Rope] = {}
        if self.cfg.positional == "learned":
            x = x + self.hook_pos_embed(self.pos_embed(positions))
        else:
            ropes[False] = self.rotary.cos_sin(positions, x.dtype)
            if hasattr(self, "rotary_local"):
                ropes[True] = self.rotary_local.cos_sin(positions, x.dtype)
        for i, block in enumerate(self.blocks):
            rope = ropes.get(i in self.cfg.sliding_layers and True in ropes)
            x = block(x, rope, mask, kv_cache)
        if logits_positions is not None:
            x = x[torch.arange(b, device=x.device), logits_positions.to(x.device)][:, None]
            return self.logits(x)[:, 0]
        return self.logits(x)

    def logits(self, resid: torch.Tensor) -> torch.Tensor:
        """The last residual stream [b, n, d] -> logits [b, n, V] (final norm, unembedding, and
        the soft-cap where the model has one)."""
        raw = self.unembed(self.ln_final(resid))
        if self.cfg.final_softcap:
            raw = self.logit_softcap(raw)
        return self.hook_logits(raw)

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
