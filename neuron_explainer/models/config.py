"""What a model is: its sizes and architecture choices (`ModelConfig`), and the hook points and
per-token widths those imply, read from the table in hooks.py.

The hook table lists each hook point's dimensions in letters (`b n d`, `b n H dh`, ...); a config
gives the letters their sizes, so one table serves the model (which hook points exist), the
autoencoders (how wide the value they read is) and their training.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from neuron_explainer.models.hooks import BLOCK_HOOKS, GLOBAL_HOOKS

Activation = Literal["gelu_new", "gelu", "silu", "relu"]


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    vocab_size: int
    n_ctx: int
    d_head: int = 0  # 0: d_model // n_heads
    n_kv_heads: int = 0  # 0: n_heads (no grouped-query attention)
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    positional: Literal["learned", "rotary"] = "rotary"
    rope_theta: float = 10000.0
    gated_mlp: bool = True  # SwiGLU: act(gate(x)) * up(x)
    activation: Activation = "silu"
    attn_qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    tied_embeddings: bool = True
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.d_head == 0:
            object.__setattr__(self, "d_head", self.d_model // self.n_heads)
        if self.n_kv_heads == 0:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )

    @property
    def architecture(self) -> str:
        return "gpt2" if self.positional == "learned" else "llama"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def gpt2(cls, **kw: Any) -> ModelConfig:
        """A GPT-2 family config; pass sizes as keyword arguments."""
        defaults: dict[str, Any] = dict(
            norm="layernorm",
            positional="learned",
            gated_mlp=False,
            activation="gelu_new",
            attn_qkv_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            tied_embeddings=True,
        )
        return cls(**(defaults | kw))


def expected_hook_names(cfg: ModelConfig) -> list[str]:
    """The hook names a model with this config has, in forward order, from the table in hooks.py."""
    names = ["hook_embed"] + (["hook_pos_embed"] if cfg.positional == "learned" else [])
    for layer in range(cfg.n_layers):
        for suffix in BLOCK_HOOKS:
            if "rot_" in suffix and cfg.positional != "rotary":
                continue
            if suffix == "mlp.hook_pre_linear" and not cfg.gated_mlp:
                continue
            names.append(f"blocks.{layer}.{suffix}")
    names += [n for n in GLOBAL_HOOKS if n.startswith("ln_final")] + ["hook_logits"]
    return names


def hook_width(cfg: ModelConfig, hook_name: str) -> int | None:
    """The size of the last dimensions of a per-token hook point's value (d_model, d_mlp, or
    n_heads * d_head for per-head values flattened); None for hooks that are not per token."""
    suffix = re.sub(r"^blocks\.\d+\.", "", hook_name)
    table = BLOCK_HOOKS if suffix != hook_name else GLOBAL_HOOKS
    if suffix not in table:
        return None
    dims = table[suffix][0].split()
    if dims[:2] != ["b", "n"]:
        return None
    sizes = {
        "d": cfg.d_model,
        "m": cfg.d_mlp,
        "H": cfg.n_heads,
        "Hkv": cfg.n_kv_heads,
        "dh": cfg.d_head,
        "V": cfg.vocab_size,
        "1": 1,
    }
    return math.prod(sizes[d] for d in dims[2:])
