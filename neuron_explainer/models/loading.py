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
    UnsupportedArchitectureError,
    config_from_hf,
    config_to_hf,
    hf_from_native,
    native_from_hf,
)
from neuron_explainer.models.gguf_file import GGUFFile
from neuron_explainer.models.registry import (
    DEFAULT_MODEL,
    GEMMA3_MODEL,
    ModelNotFoundError,
    find_in_hf_cache,
    gemma3_gguf_path,
    smollm2_gguf_path,
)
from neuron_explainer.models.tokenizer import Tokenizer
from neuron_explainer.models.tokenizer_spm import SentencePieceTokenizer
from neuron_explainer.models.transformer import HookedTransformer, ModelConfig

log = logging.getLogger(__name__)
StateDict = dict[str, torch.Tensor]

# Registry names that resolve to files shipped in a package (no network, no cache needed).
REGISTRY: dict[str, Callable[[], Path]] = {
    DEFAULT_MODEL: smollm2_gguf_path,
    GEMMA3_MODEL: gemma3_gguf_path,
}
ALIASES = {
    "smollm2": DEFAULT_MODEL,
    "smollm2-135m-instruct": DEFAULT_MODEL,
    "gemma-3-270m": GEMMA3_MODEL,
}


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
    """Build a model on the meta device and load `sd` (our names) into it, taking its tensors:
    `sd` is consumed (its entries are replaced as they are converted, so each original tensor is
    freed as soon as its copy exists, and loading holds at most one group of matrices twice).

    Projection matrices are laid out as `HookedTransformer.weight_layout` says, which makes a
    generation step faster."""
    with torch.device("meta"):
        model = HookedTransformer(cfg)
    for key, value in sd.items():
        if value.is_floating_point():
            sd[key] = value.float()
    for group in model.weight_layout():
        keys = [f"{name}.weight" for name in group]
        if all(key in sd and sd[key].ndim == 2 for key in keys):
            stored = torch.cat([sd[key] for key in keys]).T.contiguous()  # [in, sum of outs]
            start = 0
            for key in keys:
                end = start + sd[key].shape[0]
                sd[key] = stored[:, start:end].T
                start = end
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

# llama.cpp's block tensor names -> ours. Gemma's "ffn_norm" is its pre-feedforward norm.
GGUF_BLOCK_NAMES = {
    "attn_norm": "ln1",
    "ffn_norm": "ln2",
    "post_attention_norm": "ln1_post",
    "post_ffw_norm": "ln2_post",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm",
    "ffn_gate": "mlp.w_in",
    "ffn_up": "mlp.w_up",
    "ffn_down": "mlp.w_out",
}
GGUF_ARCHITECTURES = ("gemma3", "llama")
GEMMA3_SLIDING_PATTERN = 6  # every 6th layer global, the rest sliding (not stored in the GGUF)
GEMMA3_LOCAL_ROPE_THETA = 10000.0


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows (interleaved rotary pairs -> rotate-half layout)."""
    d_out = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, d_out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(d_out, *rest)


def hf_config_from_gguf(gguf: GGUFFile) -> dict[str, Any]:
    """The Hugging Face style config.json a GGUF's metadata describes (for `config_from_hf`)."""
    meta, tensors = gguf.metadata, gguf.tensors
    arch = meta["general.architecture"]
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    if "rope_freqs.weight" in tensors or f"{arch}.rope.scaling.type" in meta:
        raise UnsupportedArchitectureError(f"rope scaling in a {arch} GGUF is not supported")

    def m(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    d_model, n_heads = m("embedding_length"), m("attention.head_count")
    d_head = m("attention.key_length", d_model // n_heads)
    n_layers = m("block_count")
    theta = m("rope.freq_base", 10000.0)
    hf: dict[str, Any] = dict(
        model_type=arch,
        num_hidden_layers=n_layers,
        hidden_size=d_model,
        intermediate_size=m("feed_forward_length"),
        num_attention_heads=n_heads,
        num_key_value_heads=m("attention.head_count_kv", n_heads),
        head_dim=d_head,
        vocab_size=tensors["token_embd.weight"].shape[0],
        max_position_embeddings=m("context_length", 2048),
        rms_norm_eps=m("attention.layer_norm_rms_epsilon", 1e-5),
        rope_parameters=dict(rope_type="default", rope_theta=theta),
        attention_bias="blk.0.attn_q.bias" in tensors,
        tie_word_embeddings="output.weight" not in tensors,
        hidden_act="silu",
    )
    if arch == "gemma3":
        # What the file leaves out is Gemma 3's own (transformers' Gemma3TextConfig defaults):
        # GELU-tanh, scores scaled by head_dim^-1/2, 5 sliding layers to 1 global, local base 1e4.
        hf |= dict(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=d_head,
            sliding_window=m("attention.sliding_window"),
            layer_types=[
                "full_attention" if (i + 1) % GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention"
                for i in range(n_layers)
            ],
            rope_parameters=dict(
                sliding_attention=dict(rope_type="default", rope_theta=GEMMA3_LOCAL_ROPE_THETA),
                full_attention=dict(rope_type="default", rope_theta=theta),
            ),
        )
    return hf


def _load_gguf(path: Path) -> HookedTransformer:
    gguf = GGUFFile(path)
    hf = hf_config_from_gguf(gguf)
    cfg = config_from_hf(hf)
    permuted = hf["model_type"] == "llama"  # llama.cpp reorders Q/K rows for llama only

    def get(name: str) -> torch.Tensor:
        arr = gguf.tensor(name)
        if permuted and name.endswith(("attn_q.weight", "attn_q.bias")):
            arr = _unpermute_qk(arr, cfg.n_heads)
        elif permuted and name.endswith(("attn_k.weight", "attn_k.bias")):
            arr = _unpermute_qk(arr, cfg.n_kv_heads)
        # Norm gains are stored as multipliers (llama.cpp already added Gemma's 1), as ours are.
        return torch.from_numpy(np.ascontiguousarray(arr))

    sd: StateDict = {
        "embed.weight": get("token_embd.weight"),
        "ln_final.weight": get("output_norm.weight"),
    }
    if not cfg.tied_embeddings:
        sd["unembed.weight"] = get("output.weight")
    for i in range(cfg.n_layers):
        for theirs, ours in GGUF_BLOCK_NAMES.items():
            for suffix in (".weight", ".bias"):
                if f"blk.{i}.{theirs}{suffix}" in gguf.tensors:
                    sd[f"blocks.{i}.{ours}{suffix}"] = get(f"blk.{i}.{theirs}{suffix}")
    model = model_from_state_dict(cfg, sd)
    if gguf.metadata.get("tokenizer.ggml.model") == "llama":
        model.tokenizer = SentencePieceTokenizer.from_metadata(gguf.metadata)
    else:
        model.tokenizer = Tokenizer.from_gguf(path)
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
