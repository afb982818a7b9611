"""Sparse autoencoders over one hook point of a model: their config and their math.

An autoencoder reads the activation `x` [..., d_in] at one hook point (`blocks.5.hook_mlp_out`) and
writes it as a sparse combination of learned directions:

    x_n = normalize(x)                           (identity unless `normalize` says otherwise)
    z   = act(W_enc (x_n - b_pre) + b_enc)       latents [..., n_latents], z >= 0
    x̂   = denormalize(W_dec^T z + b_pre)         reconstruction [..., d_in]

with `act` either ReLU or TopK(k): keep the k largest pre-activations of each token, ReLU them,
zero the rest. `W_enc` and `W_dec` are both stored as [n_latents, d_in]: row j is latent j's
encoder direction and decoder direction (so `x̂ = z @ W_dec + b_pre`). The pre-encoder bias `b_pre`
is subtracted before encoding and added back after decoding (OpenAI's `pre_bias`, SAELens' `b_dec`).

Input normalizations, per token (the OpenAI and SAELens formats define them, see
autoencoder_formats.py; our own training uses none):

- `layer_norm` (OpenAI's TopK autoencoders, SAELens `layer_norm`): `x_n = (x - mu) / (std + eps)`
  with mu the mean and std the *unbiased* standard deviation over the d_in features; decoding
  maps back with `x̂ = recon * std + mu` (eps is not undone, as in both reference implementations).
- `constant_norm_rescale` (SAELens): `x_n = x * sqrt(d_in) / ‖x‖`, `x̂ = recon * ‖x‖ / sqrt(d_in)`.

With a normalization, decoding needs the statistics of the input the latents came from: pass it as
`decode(z, x)`. Latent j then writes `z_j * s(x) * W_dec[j]` into the hooked activation, where
s(x) is std or ‖x‖/sqrt(d_in); without one, s = 1.

Hook names are TransformerLens names, which are ours (hooks.py), so SAELens' `hook_name` is used as
is; `check_compatible(model)` says whether a model has the hook point and the width. Autoencoders of
`blocks.L.hook_mlp_out` or `blocks.L.mlp.hook_post` (`cfg.side == "mlp"`) and of
`blocks.L.hook_attn_out` (`"attention"`) give the debugger's latent nodes once attached with
`model.attach_autoencoder(ae)` (the request engine splices them in).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from neuron_explainer.models.config import ModelConfig, hook_width

LatentActivation = Literal["relu", "topk"]
InputNormalization = Literal["none", "layer_norm", "constant_norm_rescale"]
AutoencoderSide = Literal["mlp", "attention"]

# Where a block's autoencoder latents write: the hook points whose autoencoders are MLP-side or
# attention-side latents in the debugger (docs/engine.md §3). `mlp.hook_post` autoencoders read neurons;
# their decoder rows reach the residual stream through W_out.
SIDE_OF_HOOK: dict[str, AutoencoderSide] = {
    "hook_mlp_out": "mlp",
    "mlp.hook_post": "mlp",
    "hook_attn_out": "attention",
}


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


class HookedModel(Protocol):
    """What `check_compatible` reads of a model (a HookedTransformer is one): its config and the
    names of its hook points."""

    cfg: ModelConfig

    def hook_names(self) -> Collection[str]: ...


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

    def check_compatible(self, model: HookedModel) -> None:
        """Raise ValueError unless `model` has this hook point with width d_in."""
        if self.hook_name not in model.hook_names():
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
