"""Load subject models from local files: Hugging Face folders, GGUF files, and registry names.

One entry point, `load_model(name_or_path)`. Weight conversion lives here, apart from the forward
pass: each architecture has one function from Hugging Face names to ours and one back (used by
`export_hf`, so other tools can run the very same weights).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuron_explainer.models.registry import (
    DEFAULT_MODEL,
    ModelNotFoundError,
    find_in_hf_cache,
    smollm2_gguf_path,
)
from neuron_explainer.models.tokenizer import Tokenizer
from neuron_explainer.models.transformer import HookedTransformer, ModelConfig

log = logging.getLogger(__name__)
StateDict = dict[str, torch.Tensor]

# Registry names that resolve to files shipped in a package (no network, no cache needed).
REGISTRY: dict[str, Callable[[], Path]] = {DEFAULT_MODEL: smollm2_gguf_path}
ALIASES = {"smollm2": DEFAULT_MODEL, "smollm2-135m-instruct": DEFAULT_MODEL}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    name_or_path: str | Path = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> HookedTransformer:
    """Load a model by registry name, local path (HF folder or .gguf file) or HF cache name.

    device: default CUDA when present, else CPU. dtype: default float32 (parameters never require
    grad; the interpretability code differentiates activations only).
    """
    start = time.perf_counter()
    path, name = _resolve(str(name_or_path))
    if path.suffix == ".gguf":
        model = _load_gguf(path)
    else:
        model = _load_hf_folder(path)
    model.cfg.extra["source"] = str(path)
    object.__setattr__(model.cfg, "name", name)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model.to(device=device or default_device(), dtype=torch_dtype or torch.float32)
    model.requires_grad_(False)
    model.eval()
    log.info("loaded %s from %s in %.1fs", name, path, time.perf_counter() - start)
    return model


def load_model_reporting(
    name_or_path: str | Path = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> HookedTransformer:
    """`load_model`, then one line on stderr saying what was loaded, where and how long it took
    (what `tdb` and the server print when they start)."""
    start = time.perf_counter()
    model = load_model(name_or_path, device=device, dtype=dtype)
    print(
        f"loaded {model.cfg.name} ({model.device}, {model.dtype}) "
        f"in {time.perf_counter() - start:.1f}s",
        file=sys.stderr,
    )
    return model


def model_name(name_or_path: str | Path) -> str:
    """The name `load_model(name_or_path)` gives its model (`cfg.name`: the registry name, the
    folder's name or the file's stem), found without loading anything; ModelNotFoundError as
    `load_model` raises it."""
    return _resolve(str(name_or_path))[1]


def _resolve(name: str) -> tuple[Path, str]:
    key = ALIASES.get(name.lower(), name.lower())
    if key in REGISTRY:
        return REGISTRY[key](), key
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a folder without config.json; expected a Hugging Face model folder"
            )
        return path, path.stem if path.is_file() else path.name
    cached = find_in_hf_cache(name)
    if cached is not None:
        return cached, name
    raise ModelNotFoundError(
        f"Cannot find model {name!r}: it is not a registry name ({', '.join(REGISTRY)}), not a "
        f"local path, and not in a local Hugging Face cache. Point at a local folder holding "
        f"config.json + model.safetensors (or pytorch_model.bin) and the tokenizer files, or at a "
        f".gguf file, e.g. load_model('/path/to/gpt2') or `tdb serve --model /path/to/gpt2`."
    )


# ---- Hugging Face folders ------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our config from a Hugging Face config.json (GPT-2 or Llama-style)."""
    model_type = hf.get("model_type", "")
    if model_type == "gpt2":
        return ModelConfig.gpt2(
            n_layers=hf["n_layer"],
            d_model=hf["n_embd"],
            n_heads=hf["n_head"],
            d_mlp=hf.get("n_inner") or 4 * hf["n_embd"],
            vocab_size=hf["vocab_size"],
            n_ctx=hf.get("n_positions", 1024),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation=hf.get("activation_function", "gelu_new"),
            tied_embeddings=hf.get("tie_word_embeddings", True),
        )
    if model_type in ("llama", "mistral", "qwen2"):
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or rope
        if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
            raise ValueError(f"rope scaling {scaling} is not supported yet")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported for {model_type}")
        return ModelConfig(
            n_layers=hf["num_hidden_layers"],
            d_model=hf["hidden_size"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            d_head=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            d_mlp=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            n_ctx=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
            attn_qkv_bias=model_type == "qwen2" or hf.get("attention_bias", False),
            attn_out_bias=model_type != "qwen2" and hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            tied_embeddings=hf.get("tie_word_embeddings", False),
        )
    raise ValueError(
        f"model_type {model_type!r} is not supported; supported: gpt2, llama, mistral, qwen2"
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.architecture == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
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
    qwen_style = cfg.attn_qkv_bias and not cfg.attn_out_bias
    return {
        "architectures": ["Qwen2ForCausalLM" if qwen_style else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen_style else "llama",
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


def _gpt2_from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    d = cfg.d_model
    out: StateDict = {"embed.weight": sd["wte.weight"], "pos_embed.weight": sd["wpe.weight"]}
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"blocks.{i}."
        # GPT-2 uses Conv1D modules: weights are stored (in, out), the transpose of nn.Linear.
        w_qkv, b_qkv = sd[h + "attn.c_attn.weight"].T, sd[h + "attn.c_attn.bias"]
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out[b + f"attn.{proj}.weight"] = w_qkv[j * d : (j + 1) * d]
            out[b + f"attn.{proj}.bias"] = b_qkv[j * d : (j + 1) * d]
        pairs = {
            "ln1": "ln_1",
            "ln2": "ln_2",
            "attn.o_proj": "attn.c_proj",
            "mlp.w_in": "mlp.c_fc",
            "mlp.w_out": "mlp.c_proj",
        }
        for ours, theirs in pairs.items():
            w = sd[h + theirs + ".weight"]
            out[b + ours + ".weight"] = w if ours.startswith("ln") else w.T
            out[b + ours + ".bias"] = sd[h + theirs + ".bias"]
    out["ln_final.weight"], out["ln_final.bias"] = sd["ln_f.weight"], sd["ln_f.bias"]
    out["unembed.weight"] = sd.get("lm_head.weight", sd["wte.weight"])
    return out


def _gpt2_to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out: StateDict = {
        "transformer.wte.weight": sd["embed.weight"],
        "transformer.wpe.weight": sd["pos_embed.weight"],
        "transformer.ln_f.weight": sd["ln_final.weight"],
        "transformer.ln_f.bias": sd["ln_final.bias"],
    }
    for i in range(cfg.n_layers):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        qkv = ("q_proj", "k_proj", "v_proj")
        out[h + "attn.c_attn.weight"] = torch.cat([sd[b + f"attn.{p}.weight"] for p in qkv]).T
        out[h + "attn.c_attn.bias"] = torch.cat([sd[b + f"attn.{p}.bias"] for p in qkv])
        for ours, theirs in (
            ("attn.o_proj", "attn.c_proj"),
            ("mlp.w_in", "mlp.c_fc"),
            ("mlp.w_out", "mlp.c_proj"),
        ):
            out[h + theirs + ".weight"] = sd[b + ours + ".weight"].T
            out[h + theirs + ".bias"] = sd[b + ours + ".bias"]
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[h + theirs + ".weight"] = sd[b + ours + ".weight"]
            out[h + theirs + ".bias"] = sd[b + ours + ".bias"]
    if not cfg.tied_embeddings:
        out["lm_head.weight"] = sd["unembed.weight"]
    return out


# Llama-family names map one to one.
_LLAMA_LAYER_NAMES = {
    "ln1.weight": "input_layernorm.weight",
    "ln2.weight": "post_attention_layernorm.weight",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "mlp.w_in": "mlp.gate_proj",
    "mlp.w_up": "mlp.up_proj",
    "mlp.w_out": "mlp.down_proj",
}


def _llama_name_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    pairs = [
        ("embed.weight", "model.embed_tokens.weight"),
        ("ln_final.weight", "model.norm.weight"),
    ]
    if not cfg.tied_embeddings:
        pairs.append(("unembed.weight", "lm_head.weight"))
    for i in range(cfg.n_layers):
        for ours, theirs in _LLAMA_LAYER_NAMES.items():
            if ours.startswith("ln"):
                pairs.append((f"blocks.{i}.{ours}", f"model.layers.{i}.{theirs}"))
                continue
            pairs.append((f"blocks.{i}.{ours}.weight", f"model.layers.{i}.{theirs}.weight"))
            has_bias = (
                (ours in ("attn.q_proj", "attn.k_proj", "attn.v_proj") and cfg.attn_qkv_bias)
                or (ours == "attn.o_proj" and cfg.attn_out_bias)
                or (ours.startswith("mlp") and cfg.mlp_bias)
            )
            if has_bias:
                pairs.append((f"blocks.{i}.{ours}.bias", f"model.layers.{i}.{theirs}.bias"))
    return pairs


def _llama_from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out = {ours: sd[theirs] for ours, theirs in _llama_name_pairs(cfg)}
    if cfg.tied_embeddings:
        out["unembed.weight"] = out["embed.weight"]
    return out


def _llama_to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    return {theirs: sd[ours] for ours, theirs in _llama_name_pairs(cfg)}


def native_from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    return (_gpt2_from_hf if cfg.architecture == "gpt2" else _llama_from_hf)(sd, cfg)


def hf_from_native(sd: StateDict, cfg: ModelConfig) -> StateDict:
    return (_gpt2_to_hf if cfg.architecture == "gpt2" else _llama_to_hf)(sd, cfg)


def _read_hf_weights(folder: Path) -> StateDict:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: StateDict = {}
        for shard in shards:
            sd.update(load_file(str(folder / shard)))
        return sd
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        loaded = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return dict(loaded)
    raise ModelNotFoundError(
        f"{folder} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def model_from_state_dict(cfg: ModelConfig, sd: StateDict) -> HookedTransformer:
    """Build a model on the meta device and load `sd` (our names) into it without extra copies."""
    with torch.device("meta"):
        model = HookedTransformer(cfg)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [m for m in missing if not (m == "unembed.weight" and cfg.tied_embeddings)]
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the config: missing {missing}, unexpected {unexpected}"
        )
    if cfg.tied_embeddings:
        model.unembed.weight = model.embed.weight
    if cfg.positional == "rotary":
        # Buffers were created on the meta device; rebuild them for real.
        model.rotary.inv_freq = 1.0 / (
            cfg.rope_theta ** (torch.arange(0, cfg.d_head, 2).float() / cfg.d_head)
        )
    return model


def _load_hf_folder(folder: Path) -> HookedTransformer:
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    model = model_from_state_dict(cfg, native_from_hf(_read_hf_weights(folder), cfg))
    try:
        model.tokenizer = Tokenizer.from_hf_folder(folder)
    except FileNotFoundError:
        log.warning("%s has no tokenizer files; the model takes token ids only", folder)
    return model


# ---- GGUF ----------------------------------------------------------------------------------------


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows (interleaved rotary pairs -> rotate-half layout)."""
    d_out = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, d_out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(d_out, *rest)


def _load_gguf(path: Path) -> HookedTransformer:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def meta(key: str, default: Any = None) -> Any:
        f = reader.fields.get(f"{arch}.{key}")
        return default if f is None else f.contents()

    tensors = {t.name: t for t in reader.tensors}
    n_heads, d_model = meta("attention.head_count"), meta("embedding_length")
    n_kv = meta("attention.head_count_kv", n_heads)
    vocab = int(tensors["token_embd.weight"].shape[-1])
    cfg = ModelConfig(
        n_layers=meta("block_count"),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=meta("attention.key_length", d_model // n_heads),
        d_mlp=meta("feed_forward_length"),
        vocab_size=vocab,
        n_ctx=meta("context_length", 2048),
        norm_eps=meta("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta("rope.freq_base", 10000.0),
        attn_qkv_bias="blk.0.attn_q.bias" in tensors,
        attn_out_bias="blk.0.attn_output.bias" in tensors,
        tied_embeddings="output.weight" not in tensors,
    )

    def get(name: str) -> torch.Tensor:
        t = tensors[name]
        arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        # GGUF lists dims innermost first; dequantized arrays are already (out, in) but 1-D tensors
        # may come back as (1, n).
        arr = np.ascontiguousarray(arr.reshape([int(s) for s in reversed(t.shape)]))
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            arr = _unpermute_qk(arr, cfg.n_heads)
        elif name.endswith(("attn_k.weight", "attn_k.bias")):
            arr = _unpermute_qk(arr, cfg.n_kv_heads)
        # F32 tensors come back as read-only views of the memory-mapped file: copy those.
        return torch.from_numpy(arr if arr.flags.writeable else arr.copy())

    names = {
        "attn_norm.weight": "ln1.weight",
        "ffn_norm.weight": "ln2.weight",
        "attn_q": "attn.q_proj",
        "attn_k": "attn.k_proj",
        "attn_v": "attn.v_proj",
        "attn_output": "attn.o_proj",
        "ffn_gate": "mlp.w_in",
        "ffn_up": "mlp.w_up",
        "ffn_down": "mlp.w_out",
    }
    sd: StateDict = {
        "embed.weight": get("token_embd.weight"),
        "ln_final.weight": get("output_norm.weight"),
    }
    if not cfg.tied_embeddings:
        sd["unembed.weight"] = get("output.weight")
    for i in range(cfg.n_layers):
        for theirs, ours in names.items():
            for suffix in ("", ".weight", ".bias"):
                if theirs.endswith(".weight") and suffix:
                    continue
                key = f"blk.{i}.{theirs}{suffix}"
                if key in tensors:
                    sd[f"blocks.{i}.{ours}{suffix}"] = get(key)
    model = model_from_state_dict(cfg, sd)
    model.tokenizer = Tokenizer.from_gguf(reader)
    return model


# ---- export --------------------------------------------------------------------------------------


def export_hf(model: HookedTransformer, out_dir: str | Path) -> Path:
    """Write `model` as a Hugging Face folder (config.json, model.safetensors, tokenizer files)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    hf = hf_from_native(sd, model.cfg)
    # safetensors refuses tensors that share memory; tied weights are written once.
    save_file({k: v.contiguous().clone() for k, v in hf.items()}, str(out / "model.safetensors"))
    config = config_to_hf(model.cfg)
    if model.tokenizer is not None:
        config["bos_token_id"] = model.tokenizer.bos_token_id
        config["eos_token_id"] = model.tokenizer.eos_token_id
        model.tokenizer.save_hf(out)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({k: config.get(k) for k in ("bos_token_id", "eos_token_id")}, indent=2) + "\n"
    )
    return out
