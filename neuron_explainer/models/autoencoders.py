"""Sparse autoencoders over one hook point of a model, and loaders for the field's formats.

An autoencoder reads the activation `x` [..., d_in] at one hook point (`blocks.5.hook_mlp_out`) and
writes it as a sparse combination of learned directions:

    x_n = normalize(x)                           (identity unless `normalize` says otherwise)
    z   = act(W_enc (x_n - b_pre) + b_enc)       latents [..., n_latents], z >= 0
    x̂   = denormalize(W_dec^T z + b_pre)         reconstruction [..., d_in]

with `act` either ReLU or TopK(k): keep the k largest pre-activations of each token, ReLU them,
zero the rest. `W_enc` and `W_dec` are both stored as [n_latents, d_in]: row j is latent j's
encoder direction and decoder direction (so `x̂ = z @ W_dec + b_pre`). The pre-encoder bias `b_pre`
is subtracted before encoding and added back after decoding (OpenAI's `pre_bias`, SAELens' `b_dec`).

Input normalizations, per token (both formats define them; our own training uses none):

- `layer_norm` (OpenAI's TopK autoencoders, SAELens `layer_norm`): `x_n = (x - mu) / (std + eps)`
  with mu the mean and std the *unbiased* standard deviation over the d_in features; decoding
  maps back with `x̂ = recon * std + mu` (eps is not undone, as in both reference implementations).
- `constant_norm_rescale` (SAELens): `x_n = x * sqrt(d_in) / ‖x‖`, `x̂ = recon * ‖x‖ / sqrt(d_in)`.

With a normalization, decoding needs the statistics of the input the latents came from: pass it as
`decode(z, x)`. Latent j then writes `z_j * s(x) * W_dec[j]` into the hooked activation, where
s(x) is std or ‖x‖/sqrt(d_in); without one, s = 1.

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

Hook names are TransformerLens names, which are ours (hooks.py), so SAELens' `hook_name` is used as
is; `check_compatible(model)` says whether a model has the hook point and the width. Autoencoders of
`blocks.L.hook_mlp_out` or `blocks.L.mlp.hook_post` (`cfg.side == "mlp"`) and of
`blocks.L.hook_attn_out` (`"attention"`) give the debugger's latent nodes once attached with
`model.attach_autoencoder(ae)` (the request engine splices them in).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from neuron_explainer.models.hooks import BLOCK_HOOKS, GLOBAL_HOOKS

if TYPE_CHECKING:
    from neuron_explainer.models.transformer import HookedTransformer, ModelConfig

LatentActivation = Literal["relu", "topk"]
InputNormalization = Literal["none", "layer_norm", "constant_norm_rescale"]
AutoencoderSide = Literal["mlp", "attention"]

# Where a block's autoencoder latents write: the hook points whose autoencoders are MLP-side or
# attention-side latents in the debugger (engine.md §3). `mlp.hook_post` autoencoders read neurons;
# their decoder rows reach the residual stream through W_out.
SIDE_OF_HOOK: dict[str, AutoencoderSide] = {
    "hook_mlp_out": "mlp",
    "mlp.hook_post": "mlp",
    "hook_attn_out": "attention",
}

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


@dataclass(frozen=True)
class AutoencoderConfig:
    """What an autoencoder is: where it attaches, its sizes, its activation and normalization.

    hook_name: the hook point it reads and (when spliced) replaces, e.g. `blocks.5.hook_mlp_out`.
    k: the number of latents kept per token for TopK (None for ReLU).
    metadata: free-form provenance (source format and path, model, training settings, metrics).
    """

    hook_name: str
    d_in: int
    n_latents: int
    activation: LatentActivation = "topk"
    k: int | None = None
    normalize: InputNormalization = "none"
    norm_eps: float = 1e-5
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.activation not in ("relu", "topk"):
            raise ValueError(f"activation must be relu or topk, not {self.activation!r}")
        if self.activation == "topk" and not (self.k and 0 < self.k <= self.n_latents):
            raise ValueError(f"TopK needs 0 < k <= n_latents={self.n_latents}, got k={self.k}")
        if self.activation == "relu" and self.k is not None:
            raise ValueError("k is only meaningful for TopK autoencoders")
        if self.normalize not in ("none", "layer_norm", "constant_norm_rescale"):
            raise ValueError(f"unknown input normalization {self.normalize!r}")

    @property
    def layer(self) -> int | None:
        """The block index in the hook name (`blocks.5.hook_mlp_out` -> 5); None for global hooks."""
        match = re.match(r"blocks\.(\d+)\.", self.hook_name)
        return int(match.group(1)) if match else None

    @property
    def side(self) -> AutoencoderSide | None:
        """ "mlp" for autoencoders of a block's MLP output or neurons (`hook_mlp_out`,
        `mlp.hook_post`), "attention" for its attention output (`hook_attn_out`); None elsewhere
        (residual-stream autoencoders, which are not node types of the debugger)."""
        suffix = re.sub(r"^blocks\.\d+\.", "", self.hook_name)
        if suffix == self.hook_name:
            return None
        return SIDE_OF_HOOK.get(suffix)


class SparseAutoencoder(nn.Module):
    """A ReLU or TopK sparse autoencoder with a pre-encoder bias (see the module doc for the math).

    Parameters (as for the subject model, they do not require grad unless a trainer asks):
    W_enc [n_latents, d_in], b_enc [n_latents], W_dec [n_latents, d_in], b_pre [d_in].
    """

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.zeros(cfg.n_latents, cfg.d_in))
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.W_dec = nn.Parameter(torch.zeros(cfg.n_latents, cfg.d_in))
        self.b_pre = nn.Parameter(torch.zeros(cfg.d_in))
        self.requires_grad_(False)

    @property
    def hook_name(self) -> str:
        return self.cfg.hook_name

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    @property
    def k(self) -> int | None:
        return self.cfg.k

    # ---- the math ------------------------------------------------------------------------------

    def normalize(
        self, x: torch.Tensor, scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., d_in] -> (x_n, shift, scale) with x_n the encoder's input and decoding mapping
        a reconstruction r back by `r * scale + shift` (shift, scale [..., 1]; 0 and 1 for none).

        scale: use this per-token scale (std, or ‖x‖/sqrt(d_in)) instead of x's own, e.g. the
        detached one to differentiate with the normalization's scale held fixed (the layer norm
        still centres); ignored without a normalization."""
        kind = self.cfg.normalize
        if kind == "none":
            zero = x.new_zeros(())
            return x, zero, zero + 1
        if kind == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            centered = x - mu
            std = centered.std(-1, keepdim=True) if scale is None else scale
            return centered / (std + self.cfg.norm_eps), mu, std
        if scale is None:
            scale = x.norm(dim=-1, keepdim=True) / math.sqrt(self.cfg.d_in)
        return x / scale, x.new_zeros(()), scale

    def decode_scale(self, x: torch.Tensor) -> torch.Tensor:
        """[..., 1]: the factor s(x) by which decoding scales latent j's W_dec[j] for input x
        (std or ‖x‖/sqrt(d_in); ones without a normalization), so latent j writes z_j s W_dec[j]."""
        if self.cfg.normalize == "none":
            return x.new_ones(*x.shape[:-1], 1, dtype=self.W_dec.dtype)
        return self.normalize(x.to(self.W_dec.dtype))[2]

    def pre_activations(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., d_in] -> W_enc (x_n - b_pre) + b_enc [..., n_latents]; `scale` as in
        `normalize`."""
        x_n, _, _ = self.normalize(x.to(self.W_enc.dtype), scale)
        return F.linear(x_n - self.b_pre, self.W_enc, self.b_enc)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """ReLU, or TopK: the k largest pre-activations of each row, ReLU'd; zeros elsewhere."""
        if self.cfg.activation == "relu":
            return F.relu(pre)
        assert self.cfg.k is not None
        top = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> latents z [..., n_latents]."""
        return self.activate(self.pre_activations(x))

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """z [..., n_latents] -> x̂ = denormalize(z @ W_dec + b_pre) [..., d_in].

        x: the activation z was encoded from; required when the autoencoder normalizes its input
        (its statistics undo the normalization), ignored otherwise.
        """
        recon = z.to(self.W_dec.dtype) @ self.W_dec + self.b_pre
        if self.cfg.normalize == "none":
            return recon
        if x is None:
            raise ValueError(
                f"this autoencoder normalizes its input ({self.cfg.normalize}); pass the input "
                "activation to decode(z, x) to undo it"
            )
        _, shift, scale = self.normalize(x.to(self.W_dec.dtype))
        return recon * scale + shift

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., d_in] -> (z [..., n_latents], x̂ [..., d_in])."""
        z = self.encode(x)
        return z, self.decode(z, x)

    def decoder_directions(self, unit: bool = False) -> torch.Tensor:
        """[n_latents, d_in]: row j is what latent j adds to the reconstruction per unit of z_j
        before denormalization, i.e. W_dec[j] (raw, the default: `z_j * W_dec[j]` is the latent's
        write when there is no input normalization), or W_dec[j] / ‖W_dec[j]‖ with `unit=True`."""
        if not unit:
            return self.W_dec
        return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    # ---- attaching to a model ------------------------------------------------------------------

    def check_compatible(self, model: HookedTransformer) -> None:
        """Raise ValueError unless `model` has this hook point with width d_in."""
        if self.hook_name not in model.hook_points():
            raise ValueError(
                f"the autoencoder reads {self.hook_name!r}, which {model.cfg.name or 'the model'} "
                "does not have; see model.hook_names()"
            )
        width = hook_width(model.cfg, self.hook_name)
        if width is not None and width != self.d_in:
            raise ValueError(
                f"the autoencoder reads {self.d_in} features at {self.hook_name!r}, but the model "
                f"has {width} there"
            )

    def extra_repr(self) -> str:
        c = self.cfg
        act = f"topk(k={c.k})" if c.activation == "topk" else "relu"
        norm = "" if c.normalize == "none" else f", normalize={c.normalize}"
        return f"{c.hook_name!r}, d_in={c.d_in}, n_latents={c.n_latents}, {act}{norm}"


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
