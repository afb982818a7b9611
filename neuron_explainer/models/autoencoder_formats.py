"""Sparse autoencoder files: the native format, OpenAI's and SAELens', and `[HOOK=]PATH` specs.

Every reader returns a `SparseAutoencoder` (autoencoders.py has the math and the weight layout:
`W_enc`, `W_dec` [n_latents, d_in], `b_enc`, `b_pre`).

Formats (`load_autoencoder` dispatches on what the path holds):

- native: a folder with `autoencoder.json` (the config) and `autoencoder.safetensors` (`W_enc`,
  `b_enc`, `W_dec`, `b_pre` in the layout above). Written by `save_autoencoder` and `tdb train-sae`.
- OpenAI `sparse_autoencoder` state dicts (`.pt`, as published for GPT-2 small): `encoder.weight`
  [n, d], `latent_bias`, `decoder.weight` [d, n] (absent when tied), `pre_bias`, `activation`
  ("ReLU" or "TopK") and `activation_state_dict` ({"k", "postact_fn"}). Their loader enables the
  layer norm exactly when the activation is TopK; we do the same.
- SAELens folders: `cfg.json` + `sae_weights.safetensors` with `W_enc` [d_in, d_sae], `b_enc`,
  `W_dec` [d_sae, d_in], `b_dec`; config fields as written by SAELens before and after 6.0
  (`hook_name`/`hook_point`, or `metadata.hook_name`; `activation_fn_str`/`activation_fn` with
  `activation_fn_kwargs.k`, or `architecture: "topk"` with `k`). With `apply_b_dec_to_input: false`
  the encoder does not subtract `b_dec`; we fold that into `b_enc' = b_enc + W_enc b_dec`, which
  gives the same pre-activations up to float rounding.

A spec `[HOOK=]PATH` (the `--autoencoder` option) names a file or a folder; `find_autoencoders`
finds every autoencoder below a folder, so one spec can load a whole `tdb train-sae` output.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from neuron_explainer.models.autoencoders import (
    AutoencoderConfig,
    InputNormalization,
    LatentActivation,
    SparseAutoencoder,
)

NATIVE_FORMAT = "tdb-sparse-autoencoder"
NATIVE_VERSION = 1
NATIVE_CONFIG = "autoencoder.json"
NATIVE_WEIGHTS = "autoencoder.safetensors"
SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"

# OpenAI's GPT-2 small autoencoders live under `<location>[_v4|_v5_32k|...]/autoencoders/<layer>.pt`;
# their README maps each location to a TransformerLens hook name.
OPENAI_LOCATIONS = {
    "mlp_post_act": "mlp.hook_post",
    "resid_delta_attn": "hook_attn_out",
    "resid_post_attn": "hook_resid_mid",
    "resid_delta_mlp": "hook_mlp_out",
    "resid_post_mlp": "hook_resid_post",
}


class AutoencoderFormatError(ValueError):
    """A file or folder that is not an autoencoder in a format we read, or uses an unsupported
    feature of one."""


# ---- the native format ---------------------------------------------------------------------------


def save_autoencoder(ae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write `ae` as a native folder (autoencoder.json + autoencoder.safetensors); returns it.

    Both files are written to temporary names and renamed, so a reader never sees half a file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": NATIVE_FORMAT, "version": NATIVE_VERSION} | asdict(ae.cfg)
    tensors = {
        name: getattr(ae, name).detach().to("cpu").contiguous()
        for name in ("W_enc", "b_enc", "W_dec", "b_pre")
    }
    with atomic_path(folder / NATIVE_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": NATIVE_FORMAT})
    with atomic_path(folder / NATIVE_CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_native(folder: str | Path) -> SparseAutoencoder:
    folder = Path(folder)
    config = json.loads((folder / NATIVE_CONFIG).read_text())
    if config.pop("format", None) != NATIVE_FORMAT:
        raise AutoencoderFormatError(f"{folder / NATIVE_CONFIG} is not a {NATIVE_FORMAT} config")
    version = config.pop("version", None)
    if version != NATIVE_VERSION:
        raise AutoencoderFormatError(
            f"{folder} has format version {version}; this code reads version {NATIVE_VERSION}"
        )
    cfg = AutoencoderConfig(**config)
    return _from_tensors(cfg, load_file(str(folder / NATIVE_WEIGHTS)), str(folder))


# ---- OpenAI's sparse_autoencoder -----------------------------------------------------------------


def from_openai_state_dict(
    state_dict: dict[str, Any], hook_name: str, source: str = ""
) -> SparseAutoencoder:
    """An autoencoder from an OpenAI `sparse_autoencoder.Autoencoder` state dict (see the module
    doc). Their TopK autoencoders normalize the input with a layer norm; their ReLU ones do not."""
    for key in ("encoder.weight", "latent_bias", "pre_bias"):
        if key not in state_dict:
            raise AutoencoderFormatError(f"{source or 'the state dict'} has no {key!r}")
    W_enc = state_dict["encoder.weight"]  # [n, d]
    n_latents, d_in = W_enc.shape
    # Tied autoencoders decode with the encoder's transpose: decoder.weight = encoder.weight.T.
    W_dec = state_dict["decoder.weight"].T if "decoder.weight" in state_dict else W_enc
    activation_name = state_dict.get("activation", "ReLU")
    activation_state = state_dict.get("activation_state_dict", {}) or {}
    if activation_name == "TopK":
        postact = activation_state.get("postact_fn", "ReLU")
        if postact != "ReLU":
            raise AutoencoderFormatError(f"TopK with postact_fn {postact!r} is not supported")
        activation: LatentActivation = "topk"
        k: int | None = int(activation_state["k"])
    elif activation_name == "ReLU":
        activation, k = "relu", None
    else:
        raise AutoencoderFormatError(
            f"activation {activation_name!r} is not supported (ReLU or TopK)"
        )
    cfg = AutoencoderConfig(
        hook_name=hook_name,
        d_in=int(d_in),
        n_latents=int(n_latents),
        activation=activation,
        k=k,
        normalize="layer_norm" if activation == "topk" else "none",
        metadata={"format": "openai", "source": source},
    )
    tensors = {
        "W_enc": W_enc,
        "b_enc": state_dict["latent_bias"],
        "W_dec": W_dec,
        "b_pre": state_dict["pre_bias"],
    }
    return _from_tensors(cfg, tensors, source)


def openai_hook_name(path: str | Path) -> str | None:
    """The hook name an OpenAI autoencoder file's path implies (`.../resid_delta_mlp_v5_32k/
    autoencoders/6.pt` -> `blocks.6.hook_mlp_out`), or None when the path does not say."""
    path = Path(path)
    if not path.stem.isdigit():
        return None
    for part in reversed(path.parent.parts):
        # Longest first: resid_post_attn must not be read as a shorter location's prefix.
        for location in sorted(OPENAI_LOCATIONS, key=len, reverse=True):
            if part == location or part.startswith(location + "_"):
                return f"blocks.{int(path.stem)}.{OPENAI_LOCATIONS[location]}"
    return None


def load_openai(path: str | Path, hook_name: str | None = None) -> SparseAutoencoder:
    """An OpenAI autoencoder from a torch-saved state dict (read with weights_only=True)."""
    path = Path(path)
    hook_name = hook_name or openai_hook_name(path)
    if hook_name is None:
        raise AutoencoderFormatError(
            f"cannot tell which hook point {path} reads: OpenAI state dicts do not say; pass "
            f"hook_name (e.g. 'blocks.6.hook_mlp_out'), or keep their layout "
            f"<location>/autoencoders/<layer>.pt with a location in {sorted(OPENAI_LOCATIONS)}"
        )
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise AutoencoderFormatError(f"{path} does not hold a state dict")
    return from_openai_state_dict(state_dict, hook_name, str(path))


# ---- SAELens -------------------------------------------------------------------------------------


def load_saelens(folder: str | Path, hook_name: str | None = None) -> SparseAutoencoder:
    """An autoencoder from a SAELens folder (cfg.json + sae_weights.safetensors); ReLU
    ("standard") and TopK architectures. `hook_name` overrides the config's."""
    folder = Path(folder)
    cfg_dict: dict[str, Any] = json.loads((folder / SAELENS_CONFIG).read_text())
    meta = cfg_dict.get("metadata") or cfg_dict.get("meta") or {}
    hook = hook_name or cfg_dict.get("hook_name") or cfg_dict.get("hook_point")
    hook = hook or meta.get("hook_name")
    if not hook:
        raise AutoencoderFormatError(f"{folder / SAELENS_CONFIG} names no hook_name")
    head = cfg_dict.get("hook_head_index", cfg_dict.get("hook_point_head_index"))
    if head is None:
        head = meta.get("hook_head_index")
    if head is not None:
        raise AutoencoderFormatError(
            f"{folder}: per-head autoencoders (hook_head_index) unsupported"
        )

    architecture = cfg_dict.get("architecture", "standard")
    activation_fn = cfg_dict.get("activation_fn_str", cfg_dict.get("activation_fn")) or "relu"
    kwargs = cfg_dict.get("activation_fn_kwargs") or {}
    if architecture == "topk" or activation_fn == "topk":
        activation: LatentActivation = "topk"
        k = cfg_dict.get("k", kwargs.get("k"))
        if k is None:
            raise AutoencoderFormatError(f"{folder}: a TopK autoencoder without k")
        k = int(k)
    elif architecture == "standard" and activation_fn == "relu":
        activation, k = "relu", None
    else:
        raise AutoencoderFormatError(
            f"{folder}: architecture {architecture!r} with activation {activation_fn!r} is not "
            "supported (standard ReLU or TopK)"
        )
    if cfg_dict.get("rescale_acts_by_decoder_norm"):
        raise AutoencoderFormatError(f"{folder}: rescale_acts_by_decoder_norm is not supported")

    normalize_activations = cfg_dict.get("normalize_activations")
    normalize: InputNormalization
    if normalize_activations in (None, False, "none"):
        normalize = "none"
    elif normalize_activations == "layer_norm":
        normalize = "layer_norm"
    elif normalize_activations == "constant_norm_rescale":
        normalize = "constant_norm_rescale"
    else:
        raise AutoencoderFormatError(
            f"{folder}: normalize_activations={normalize_activations!r} is not supported (its scaling factor "
            "is not in the folder; fold it into the weights first)"
        )

    weights = load_file(str(folder / SAELENS_WEIGHTS))
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if key not in weights:
            raise AutoencoderFormatError(f"{folder / SAELENS_WEIGHTS} has no {key!r}")
    scaling = weights.get("scaling_factor", weights.get("finetuning_scaling_factor"))
    if scaling is not None and not torch.all(scaling == 1):
        raise AutoencoderFormatError(f"{folder}: a finetuning scaling factor is not supported")
    W_enc = weights["W_enc"].float().T  # [d_sae, d_in]
    b_dec = weights["b_dec"].float()
    b_enc = weights["b_enc"].float()
    if not cfg_dict.get("apply_b_dec_to_input", True):
        # pre = W_enc x + b_enc = W_enc (x - b_dec) + (b_enc + W_enc b_dec).
        b_enc = b_enc + W_enc @ b_dec
    d_sae, d_in = W_enc.shape
    cfg = AutoencoderConfig(
        hook_name=str(hook),
        d_in=int(d_in),
        n_latents=int(d_sae),
        activation=activation,
        k=k,
        normalize=normalize,
        metadata={
            "format": "saelens",
            "source": str(folder),
            "model_name": cfg_dict.get("model_name", meta.get("model_name")),
        },
    )
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": weights["W_dec"], "b_pre": b_dec}
    return _from_tensors(cfg, tensors, str(folder))


# ---- dispatch ------------------------------------------------------------------------------------


def load_autoencoder(
    path: str | Path,
    hook_name: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> SparseAutoencoder:
    """Load an autoencoder from a native folder, a SAELens folder, or an OpenAI `.pt` state dict.

    hook_name: where it attaches; required for OpenAI files outside their published layout,
    overrides the config otherwise. device/dtype: default CPU, float32.
    """
    path = Path(path).expanduser()
    if path.is_file() and path.name in (NATIVE_CONFIG, SAELENS_CONFIG):
        path = path.parent
    if path.is_dir():
        if (path / NATIVE_CONFIG).is_file():
            ae = load_native(path)
            if hook_name:
                ae.cfg = _with_hook(ae.cfg, hook_name)
        elif (path / SAELENS_CONFIG).is_file():
            ae = load_saelens(path, hook_name)
        else:
            raise AutoencoderFormatError(
                f"{path} holds neither {NATIVE_CONFIG} (native) nor {SAELENS_CONFIG} (SAELens)"
            )
    elif path.is_file():
        if path.suffix not in (".pt", ".pth", ".bin"):
            raise AutoencoderFormatError(
                f"{path}: expected a folder (native or SAELens) or an OpenAI .pt state dict"
            )
        ae = load_openai(path, hook_name)
    else:
        raise AutoencoderFormatError(f"{path} does not exist")
    return ae.to(device=device or "cpu", dtype=dtype or torch.float32)


def find_autoencoders(path: str | Path) -> list[Path]:
    """The autoencoders `path` holds: itself when it is one (a native or SAELens folder, an OpenAI
    `.pt` file), else every one below it (e.g. the `<out>/<hook name>/` folders of `tdb
    train-sae`, OpenAI's `<location>/autoencoders/<layer>.pt`), sorted by path. Raises
    AutoencoderFormatError when there is none."""
    path = Path(path).expanduser()
    if path.is_file() or (path / NATIVE_CONFIG).is_file() or (path / SAELENS_CONFIG).is_file():
        return [path]
    if not path.is_dir():
        raise AutoencoderFormatError(f"{path} does not exist")
    found = {p.parent for name in (NATIVE_CONFIG, SAELENS_CONFIG) for p in path.rglob(name)}
    found |= {p for p in path.rglob("*.pt") if openai_hook_name(p) is not None}
    if not found:
        raise AutoencoderFormatError(
            f"no autoencoder under {path} (looked for {NATIVE_CONFIG}, {SAELENS_CONFIG} and "
            "OpenAI <location>/autoencoders/<layer>.pt files)"
        )
    return sorted(found)


def parse_autoencoder_spec(spec: str) -> tuple[str | None, Path]:
    """`[HOOK=]PATH` -> (hook name or None, path), e.g. `blocks.6.hook_mlp_out=ae.pt`. Only a
    hook-like name before the first `=` is a hook (paths may contain `=`)."""
    hook, sep, rest = spec.partition("=")
    if sep and re.fullmatch(r"blocks\.\d+\.[\w.]+|hook_\w+", hook):
        return hook, Path(rest)
    return None, Path(spec)


def load_autoencoder_specs(
    specs: list[str], device: str | torch.device | None = None
) -> list[SparseAutoencoder]:
    """Every autoencoder named by `[HOOK=]PATH` specs (see `find_autoencoders`; HOOK overrides
    the hook point a file or config gives, and is required for OpenAI files outside their
    published layout). Each remembers its path in `cfg.metadata["source"]`."""
    out = []
    for spec in specs:
        hook, path = parse_autoencoder_spec(spec)
        paths = find_autoencoders(path)
        if hook is not None and len(paths) > 1:
            raise AutoencoderFormatError(
                f"{spec}: {hook}= names one hook point, but {path} holds {len(paths)} autoencoders"
            )
        for found in paths:
            ae = load_autoencoder(found, hook_name=hook, device=device)
            ae.cfg.metadata.setdefault("source", str(found))
            out.append(ae)
    return out


def _with_hook(cfg: AutoencoderConfig, hook_name: str) -> AutoencoderConfig:
    return AutoencoderConfig(**(asdict(cfg) | {"hook_name": hook_name}))


def _from_tensors(
    cfg: AutoencoderConfig, tensors: dict[str, torch.Tensor], source: str
) -> SparseAutoencoder:
    ae = SparseAutoencoder(cfg)
    expected = {
        "W_enc": (cfg.n_latents, cfg.d_in),
        "b_enc": (cfg.n_latents,),
        "W_dec": (cfg.n_latents, cfg.d_in),
        "b_pre": (cfg.d_in,),
    }
    for name, shape in expected.items():
        value = tensors[name]
        if tuple(value.shape) != shape:
            raise AutoencoderFormatError(
                f"{source}: {name} has shape {tuple(value.shape)}, expected {shape}"
            )
        getattr(ae, name).data = value.detach().to(torch.float32).contiguous()
    return ae


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """`with atomic_path(final) as tmp:` write to tmp (same folder); on success tmp is renamed to
    final in one step, so readers see the old file or the new one, never half of one."""
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
