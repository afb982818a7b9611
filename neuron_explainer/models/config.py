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
# Where a block normalizes: "pre" (x + f(norm(x)), GPT-2, Llama), "sandwich" (x + norm_post(f(norm(x))),
# Gemma 2/3) or "post" (x + norm_post(f(x)), OLMo-2: ln1 and ln2 are then the identity).
NormPlacement = Literal["pre", "sandwich", "post"]
# Norms on queries and keys before rotary: none, per head over dh (Qwen3, Gemma 3), or over all
# heads at once (OLMo-2).
QKNorm = Literal["none", "head", "all_heads"]
RopeScaling = Literal["none", "linear", "llama3"]


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
    # Architecture choices beyond GPT-2 and Llama; the defaults are the plain pre-norm block.
    family: str = ""  # the Hugging Face model_type this config was read as (architectures.py)
    norm_placement: NormPlacement = "pre"
    qk_norm: QKNorm = "none"
    rotary_fraction: float = 1.0  # the leading part of each head's dims that rotary turns
    rope_scaling: RopeScaling = "none"
    rope_factor: float = 1.0  # "linear" and "llama3": positions stretched by this factor
    rope_low_freq_factor: float = 1.0  # "llama3" only
    rope_high_freq_factor: float = 4.0  # "llama3" only
    rope_original_context: int = 8192  # "llama3" only
    rope_local_theta: float = 0.0  # sliding-window layers' rotary base (Gemma 3); 0: rope_theta
    sliding_window: int = 0  # keys within this many positions (the query included); 0: none
    sliding_layers: tuple[int, ...] = ()  # the layers that use the sliding window
    attn_scale: float = 0.0  # scores = q·k · attn_scale; 0: 1/sqrt(d_head)
    attn_softcap: float = 0.0  # scores -> c·tanh(scores/c) when c > 0 (Gemma 2)
    final_softcap: float = 0.0  # logits -> c·tanh(logits/c) when c > 0 (Gemma 2)
    embed_scale: float = 1.0  # token embeddings are multiplied by this (Gemma: sqrt(d_model))
    parallel_blocks: bool = False  # attention and MLP both read resid_pre (GPT-NeoX)
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.d_head == 0:
            object.__setattr__(self, "d_head", self.d_model // self.n_heads)
        if self.n_kv_heads == 0:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        object.__setattr__(self, "sliding_layers", tuple(self.sliding_layers))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )

    @property
    def architecture(self) -> str:
        """The Hugging Face model_type of the family (architectures.py's table)."""
        if self.family:
            return self.family
        return "gpt2" if self.positional == "learned" else "llama"

    @property
    def rotary_dims(self) -> int:
        """How many leading dims of each query and key head rotary turns (even)."""
        return int(self.d_head * self.rotary_fraction) // 2 * 2

    @property
    def post_norms(self) -> bool:
        """Whether attention and MLP outputs pass a norm (ln1_post, ln2_post) before the residual."""
        return self.norm_placement != "pre"

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (what a JSON round trip gives back)."""
        d = asdict(self)
        d.pop("extra")
        d["sliding_layers"] = list(self.sliding_layers)
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
            if "_post." in suffix and not cfg.post_norms:
                continue
            names.append(f"blocks.{layer}.{suffix}")
    names += [n for n in GLOBAL_HOOKS if n.startswith("ln_final")]
    names += ["logit_softcap.hook_scale"] if cfg.final_softcap else []
    names += ["hook_logits"]
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
