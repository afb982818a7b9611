"""The supported architectures, one declarative entry each: what differs in the block, and how
Hugging Face names the weights.

An `Architecture` fixes the `ModelConfig` fields that define the family (norm kind and placement,
activation, q/k norms, biases, parallel blocks, embedding scale) and maps its weight names onto
ours; `config_from_hf` reads what varies per checkpoint (sizes, rotary base and scaling, sliding
windows, soft-caps) from config.json with the key names `transformers` uses for every family.
Adding a family is one entry in `ARCHITECTURES` (README, "Adding an architecture").

Our weight names (`HookedTransformer.state_dict()`): `embed`, `pos_embed`, `ln_final`, `unembed`,
and per block `ln1`, `attn.{q,k,v,o}_proj`, `attn.{q,k}_norm`, `ln1_post`, `ln2`,
`mlp.w_in` (the gate when gated), `mlp.w_up`, `mlp.w_out`, `ln2_post`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from neuron_explainer.models.config import Activation, ModelConfig

StateDict = dict[str, torch.Tensor]


class UnsupportedArchitectureError(ValueError):
    """A checkpoint whose architecture has no entry in `ARCHITECTURES` (or a variant of one, such
    as a rope scaling, that the model does not implement)."""


@dataclass(frozen=True)
class Fused:
    """One Hugging Face matrix holding several of ours, stacked by rows: in order (`[q; k; v]`,
    `[gate; up]`), or per head (`[q_h; k_h; v_h]` for each head h, GPT-NeoX)."""

    theirs: str
    ours: tuple[str, ...]
    per_head: bool = False


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json's model_type
    hf_class: str  # the transformers class that reads the same checkpoint
    structure: dict[str, Any]  # ModelConfig fields fixed for the family
    layers: str  # the prefix of block i's weights, with {i}
    modules: dict[str, str]  # our module name (in a block) -> theirs (weight and bias alike)
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    unembed: str = "lm_head"
    pos_embed: str = ""
    fused: tuple[Fused, ...] = ()
    conv1d: bool = False  # GPT-2 stores linear weights (in, out)
    norm_offset: float = 0.0  # Gemma's norms multiply by (offset + w); we store the sum
    embed_scale_sqrt_d: bool = False  # Gemma multiplies token embeddings by sqrt(d_model)
    qkv_bias_key: str = "attention_bias"  # config.json key saying q/k/v have biases, "" if fixed
    out_bias_key: str = "attention_bias"
    ignored: tuple[str, ...] = field(default=())  # buffers some checkpoints carry (suffixes)


LLAMA_MODULES = {
    "ln1": "input_layernorm",
    "ln2": "post_attention_layernorm",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "mlp.w_in": "mlp.gate_proj",
    "mlp.w_up": "mlp.up_proj",
    "mlp.w_out": "mlp.down_proj",
}
QK_NORMS = {"attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"}
GEMMA_MODULES = (
    LLAMA_MODULES
    | QK_NORMS
    | {
        "ln1_post": "post_attention_layernorm",
        "ln2": "pre_feedforward_layernorm",
        "ln2_post": "post_feedforward_layernorm",
    }
)
LLAMA = dict(norm="rmsnorm", positional="rotary", gated_mlp=True)
GEMMA = LLAMA | dict(norm_placement="sandwich")
LLAMA_LAYERS = "model.layers.{i}."

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in [
        Architecture(
            "gpt2",
            "GPT2LMHeadModel",
            dict(norm="layernorm", positional="learned", gated_mlp=False)
            | dict(attn_qkv_bias=True, attn_out_bias=True, mlp_bias=True),
            layers="transformer.h.{i}.",
            modules={
                "ln1": "ln_1",
                "ln2": "ln_2",
                "attn.o_proj": "attn.c_proj",
                "mlp.w_in": "mlp.c_fc",
                "mlp.w_out": "mlp.c_proj",
            },
            embed="transformer.wte",
            pos_embed="transformer.wpe",
            final_norm="transformer.ln_f",
            fused=(Fused("attn.c_attn", ("attn.q_proj", "attn.k_proj", "attn.v_proj")),),
            conv1d=True,
            qkv_bias_key="",
            out_bias_key="",
            ignored=(".attn.bias", ".attn.masked_bias"),
        ),
        Architecture("llama", "LlamaForCausalLM", LLAMA, LLAMA_LAYERS, LLAMA_MODULES),
        Architecture("mistral", "MistralForCausalLM", LLAMA, LLAMA_LAYERS, LLAMA_MODULES),
        Architecture(
            "qwen2",
            "Qwen2ForCausalLM",
            LLAMA | dict(attn_qkv_bias=True, attn_out_bias=False),
            LLAMA_LAYERS,
            LLAMA_MODULES,
            qkv_bias_key="",
            out_bias_key="",
        ),
        Architecture(
            "qwen3",
            "Qwen3ForCausalLM",
            LLAMA | dict(qk_norm="head"),
            LLAMA_LAYERS,
            LLAMA_MODULES | QK_NORMS,
        ),
        Architecture(
            "gemma2",
            "Gemma2ForCausalLM",
            GEMMA,
            LLAMA_LAYERS,
            GEMMA_MODULES,
            norm_offset=1.0,
            embed_scale_sqrt_d=True,
        ),
        Architecture(
            "gemma3_text",
            "Gemma3ForCausalLM",
            GEMMA | dict(qk_norm="head"),
            LLAMA_LAYERS,
            GEMMA_MODULES,
            norm_offset=1.0,
            embed_scale_sqrt_d=True,
        ),
        Architecture(
            "olmo2",
            "Olmo2ForCausalLM",
            LLAMA | dict(norm_placement="post", qk_norm="all_heads"),
            LLAMA_LAYERS,
            {k: v for k, v in LLAMA_MODULES.items() if k not in ("ln1", "ln2")}
            | QK_NORMS
            | {"ln1_post": "post_attention_layernorm", "ln2_post": "post_feedforward_layernorm"},
        ),
        Architecture(
            "phi3",
            "Phi3ForCausalLM",
            LLAMA,
            LLAMA_LAYERS,
            {k: v for k, v in LLAMA_MODULES.items() if k not in ("mlp.w_in", "mlp.w_up")},
            fused=(
                Fused("self_attn.qkv_proj", ("attn.q_proj", "attn.k_proj", "attn.v_proj")),
                Fused("mlp.gate_up_proj", ("mlp.w_in", "mlp.w_up")),
            ),
        ),
        Architecture(
            "gpt_neox",
            "GPTNeoXForCausalLM",
            dict(norm="layernorm", positional="rotary", gated_mlp=False, mlp_bias=True),
            layers="gpt_neox.layers.{i}.",
            modules={
                "ln1": "input_layernorm",
                "ln2": "post_attention_layernorm",
                "attn.o_proj": "attention.dense",
                "mlp.w_in": "mlp.dense_h_to_4h",
                "mlp.w_out": "mlp.dense_4h_to_h",
            },
            embed="gpt_neox.embed_in",
            final_norm="gpt_neox.final_layer_norm",
            unembed="embed_out",
            fused=(
                Fused(
                    "attention.query_key_value",
                    ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
                    per_head=True,
                ),
            ),
            ignored=(".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq"),
        ),
    ]
}
# transformers names the text-only Gemma 3 model "gemma3_text"; a GGUF file says "gemma3".
ALIASES = {"gemma3": "gemma3_text"}
NORMS = ("ln1", "ln2", "ln1_post", "ln2_post", "attn.q_norm", "attn.k_norm", "ln_final")
ACTIVATIONS: dict[str, Activation] = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_new",
    "relu": "relu",
}


def architecture(model_type: str) -> Architecture:
    """The entry for a config.json model_type; UnsupportedArchitectureError naming it and the
    supported ones otherwise."""
    arch = ARCHITECTURES.get(ALIASES.get(model_type, model_type))
    if arch is None:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return arch


# ---- config.json ---------------------------------------------------------------------------------


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Rotary base, fraction and scaling; per layer type where the config splits them (Gemma 3)."""
    params = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling"):  # configs written before transformers 5
        params = {**params, **hf["rope_scaling"]}
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    local: dict[str, Any] = {}
    if "full_attention" in params:
        local, params = params.get("sliding_attention") or {}, params["full_attention"]
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    out: dict[str, Any] = {"rope_theta": params["rope_theta"], "rotary_fraction": fraction}
    if local:
        if local.get("rope_type", "default") != "default":
            raise UnsupportedArchitectureError(f"rope scaling {local} on sliding layers")
        out["rope_local_theta"] = local["rope_theta"]
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "linear":
        out |= dict(rope_scaling="linear", rope_factor=params["factor"])
    elif kind == "llama3":
        out |= dict(
            rope_scaling="llama3",
            rope_factor=params["factor"],
            rope_low_freq_factor=params["low_freq_factor"],
            rope_high_freq_factor=params["high_freq_factor"],
            rope_original_context=params["original_max_position_embeddings"],
        )
    elif kind != "default":
        raise UnsupportedArchitectureError(
            f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)"
        )
    return out


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our config from a Hugging Face config.json of any family in `ARCHITECTURES`."""
    arch = architecture(hf.get("model_type", ""))
    if arch.model_type == "gpt2":
        return ModelConfig(
            **arch.structure,
            family="gpt2",
            n_layers=hf["n_layer"],
            d_model=hf["n_embd"],
            n_heads=hf["n_head"],
            d_mlp=hf.get("n_inner") or 4 * hf["n_embd"],
            vocab_size=hf["vocab_size"],
            n_ctx=hf.get("n_positions", 1024),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation=ACTIVATIONS[hf.get("activation_function", "gelu_new")],
            tied_embeddings=hf.get("tie_word_embeddings", True),
        )
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
        raise UnsupportedArchitectureError(f"activation {act!r} of {arch.model_type}")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    n_layers = hf["num_hidden_layers"]
    window = hf.get("sliding_window") or 0
    if hf.get("layer_types"):
        sliding = [i for i, t in enumerate(hf["layer_types"]) if t == "sliding_attention"]
    else:
        sliding = list(range(n_layers)) if window else []
    fields: dict[str, Any] = dict(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_head=hf.get("head_dim") or d_model // n_heads,
        d_mlp=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        n_ctx=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get(
            "layer_norm_eps" if arch.structure["norm"] == "layernorm" else "rms_norm_eps"
        )
        or 1e-6,
        activation=ACTIVATIONS[act],
        mlp_bias=hf.get("mlp_bias", False),
        tied_embeddings=hf.get("tie_word_embeddings", False),
        sliding_window=window if sliding else 0,
        sliding_layers=tuple(sliding) if window else (),
        attn_softcap=hf.get("attn_logit_softcapping") or 0.0,
        final_softcap=hf.get("final_logit_softcapping") or 0.0,
        parallel_blocks=hf.get("use_parallel_residual", False),
        **_rope_fields(hf),
    )
    if arch.qkv_bias_key:
        fields["attn_qkv_bias"] = hf.get(arch.qkv_bias_key, False)
    if arch.out_bias_key:
        fields["attn_out_bias"] = hf.get(arch.out_bias_key, False)
    if hf.get("query_pre_attn_scalar"):
        fields["attn_scale"] = hf["query_pre_attn_scalar"] ** -0.5
    if arch.embed_scale_sqrt_d:
        fields["embed_scale"] = math.sqrt(d_model)
    return ModelConfig(**(fields | arch.structure), family=arch.model_type)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for `cfg`'s family, read back by `transformers` (and `config_from_hf`)."""
    arch = architecture(cfg.architecture)
    if arch.model_type == "gpt2":
        return {
            "architectures": [arch.hf_class],
            "model_type": "gpt2",
            "n_layer": cfg.n_layers,
            "n_embd": cfg.d_model,
            "n_head": cfg.n_heads,
            "n_inner": cfg.d_mlp,
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.n_ctx,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": cfg.activation,
            "tie_word_embeddings": cfg.tied_embeddings,
            "torch_dtype": "float32",
        }
    if arch.model_type != "llama" and arch.model_type != "qwen2":
        raise UnsupportedArchitectureError(f"export of {arch.model_type} is not written yet")
    return {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "num_hidden_layers": cfg.n_layers,
        "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.d_head,
        "intermediate_size": cfg.d_mlp,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.n_ctx,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "attention_bias": cfg.attn_qkv_bias,
        "mlp_bias": cfg.mlp_bias,
        "tie_word_embeddings": cfg.tied_embeddings,
        "torch_dtype": "float32",
    }


# ---- weights -------------------------------------------------------------------------------------


def _split(w: torch.Tensor, fused: Fused, cfg: ModelConfig) -> list[torch.Tensor]:
    """A fused matrix or bias (rows first) -> ours, in `fused.ours` order."""
    if fused.per_head:  # [H, 3, dh, ...] rows
        parts = w.reshape(cfg.n_heads, len(fused.ours), cfg.d_head, *w.shape[1:]).unbind(1)
        return [p.reshape(-1, *w.shape[1:]) for p in parts]
    q, kv = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
    sizes = [q, kv, kv] if fused.ours[0] == "attn.q_proj" else [cfg.d_mlp, cfg.d_mlp]
    return list(w.split(sizes))


def _join(parts: list[torch.Tensor], fused: Fused, cfg: ModelConfig) -> torch.Tensor:
    if fused.per_head:
        stacked = torch.stack([p.reshape(cfg.n_heads, cfg.d_head, *p.shape[1:]) for p in parts], 1)
        return stacked.reshape(-1, *parts[0].shape[1:])
    return torch.cat(parts)


def _name_pairs(arch: Architecture, cfg: ModelConfig) -> list[tuple[str, str]]:
    """(ours, theirs) module names, global and per block (fused matrices aside)."""
    pairs = [("embed", arch.embed), ("ln_final", arch.final_norm)]
    if arch.pos_embed:
        pairs.append(("pos_embed", arch.pos_embed))
    if not cfg.tied_embeddings:
        pairs.append(("unembed", arch.unembed))
    for i in range(cfg.n_layers):
        prefix = arch.layers.format(i=i)
        pairs += [(f"blocks.{i}.{o}", prefix + t) for o, t in arch.modules.items()]
    return pairs


def native_from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """Hugging Face weights -> ours (fused matrices split, GPT-2's transposed, Gemma's norm gains
    offset); ValueError naming any weight that has no place."""
    arch = architecture(cfg.architecture)
    sd = {k: v for k, v in sd.items() if not k.endswith(arch.ignored)}
    if arch.model_type == "gpt2":  # some checkpoints omit the "transformer." prefix
        sd = {
            (k if k.startswith(("transformer.", "lm_head")) else "transformer." + k): v
            for k, v in sd.items()
        }
    out: StateDict = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return sd[key]

    for ours, theirs in _name_pairs(arch, cfg):
        for param in ("weight", "bias"):
            if f"{theirs}.{param}" not in sd:
                continue
            w = take(f"{theirs}.{param}")
            if arch.conv1d and param == "weight" and w.ndim == 2 and ".attn." in f".{ours}":
                w = w.T
            if arch.conv1d and param == "weight" and w.ndim == 2 and ".mlp." in f".{ours}":
                w = w.T
            if param == "weight" and arch.norm_offset and ours.endswith(NORMS):
                w = w + arch.norm_offset
            out[f"{ours}.{param}"] = w
    for i in range(cfg.n_layers):
        prefix = arch.layers.format(i=i)
        for fused in arch.fused:
            for param in ("weight", "bias"):
                key = f"{prefix}{fused.theirs}.{param}"
                if key not in sd:
                    continue
                w = take(key)
                w = w.T if arch.conv1d and param == "weight" else w
                for name, part in zip(fused.ours, _split(w, fused, cfg), strict=True):
                    out[f"blocks.{i}.{name}.{param}"] = part
    if cfg.tied_embeddings:
        used |= {f"{arch.unembed}.weight"}
        out["unembed.weight"] = out["embed.weight"]
    unknown = sorted(set(sd) - used)
    if unknown:
        raise ValueError(f"weights with no place in a {arch.model_type} model: {unknown[:8]}")
    return out


def hf_from_native(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """Ours -> Hugging Face names (the inverse of `native_from_hf`)."""
    arch = architecture(cfg.architecture)
    out: StateDict = {}
    for ours, theirs in _name_pairs(arch, cfg):
        for param in ("weight", "bias"):
            if f"{ours}.{param}" not in sd:
                continue
            w = sd[f"{ours}.{param}"]
            if arch.conv1d and param == "weight" and w.ndim == 2 and ".attn." in f".{ours}":
                w = w.T
            if arch.conv1d and param == "weight" and w.ndim == 2 and ".mlp." in f".{ours}":
                w = w.T
            if param == "weight" and arch.norm_offset and ours.endswith(NORMS):
                w = w - arch.norm_offset
            out[f"{theirs}.{param}"] = w
    for i in range(cfg.n_layers):
        prefix = arch.layers.format(i=i)
        for fused in arch.fused:
            for param in ("weight", "bias"):
                names = [f"blocks.{i}.{o}.{param}" for o in fused.ours]
                if names[0] not in sd:
                    continue
                w = _join([sd[n] for n in names], fused, cfg)
                out[f"{prefix}{fused.theirs}.{param}"] = (
                    w.T if arch.conv1d and param == "weight" else w
                )
    return out
