"""Load subject models from local files: Hugging Face folders, GGUF files, and registry names.

One entry point, `load_model(name_or_path)`. Weight conversion lives apart from the forward pass:
architectures.py maps each family's Hugging Face names onto ours and back (used by `export_hf`, so
other tools can run the very same weights); the GGUF reader here maps llama.cpp's names.
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

from neuron_explainer.models.architectures import (
    config_from_hf,
    config_to_hf,
    hf_from_native,
    native_from_hf,
)
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
    model.init_buffers()  # buffers were created on the meta device; rebuild them for real
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
