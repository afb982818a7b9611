"""Held-out evaluation of sparse autoencoders on the model whose activations they read.

Metrics on the held-out windows, per layer: normalized MSE Σ‖x̂−x‖² / Σ‖x−x̄‖² (x̄ the
held-out mean; the fraction of variance explained is 1 − that), L0 (mean number of active latents
per token), the fraction of dead latents (no activation in the last min(dead_after_tokens, tokens
trained) training tokens), and the model's next-token loss (mean cross-entropy over every
predicted position) with the hooked activation replaced by x̂ at positions >= skip_positions,
against the clean loss.

training/autoencoders.py evaluates each autoencoder it trains this way, on the windows it held out.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from neuron_explainer.models.autoencoders import SparseAutoencoder
from neuron_explainer.models.hooks import HookPoint
from neuron_explainer.models.transformer import HookedTransformer


@dataclass
class LayerMetrics:
    """What training reports for one autoencoder: its held-out metrics (`evaluate`), its dead
    latents by the trainer's counters, and its training loss curve (definitions in the module doc)."""

    hook_name: str
    nmse: float
    fraction_variance_explained: float
    l0: float
    dead_fraction: float
    dead_window_tokens: int
    loss_clean: float
    loss_spliced: float
    loss_increase: float
    train_nmse_first: float
    train_nmse_last: float
    train_nmse: list[float] = field(repr=False)


def per_token(value: torch.Tensor, skip: int) -> torch.Tensor:
    """A hook value [b, n, ...] -> [b * (n - skip), features] (trailing dimensions flattened)."""
    return value[:, skip:].reshape(-1, math.prod(value.shape[2:]))


def next_token_loss_sum(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[float, int]:
    """(Σ cross-entropy of each next token, number of predictions) for logits [b, n, V]."""
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        tokens[:, 1:].flatten().to(logits.device),
        reduction="sum",
    )
    return float(loss), tokens[:, 1:].numel()


@torch.no_grad()
def evaluate(
    model: HookedTransformer,
    autoencoders: dict[str, SparseAutoencoder],
    tokens: np.ndarray,
    skip_positions: int = 1,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Held-out metrics of autoencoders (by hook name) on windows `tokens` [w, n] (module doc):
    {"loss_clean", "layers": {hook name: {"nmse", "l0", "loss_spliced"}}}."""
    names = list(autoencoders)
    sums = {name: _EvalSums() for name in names}
    clean_loss, predictions = 0.0, 0
    batches = [
        torch.from_numpy(tokens[i : i + batch_size].astype(np.int64))
        for i in range(0, len(tokens), batch_size)
    ]
    cache: dict[str, torch.Tensor] = {}

    def save(x: torch.Tensor, hook: HookPoint) -> None:
        cache[hook.name] = x

    for b, batch in enumerate(batches):
        batch = batch.to(model.device)
        with model.hooks(fwd=[(n, save) for n in names]):
            loss, count = next_token_loss_sum(model(batch), batch)
        clean_loss, predictions = clean_loss + loss, predictions + count
        for name, ae in autoencoders.items():
            x = per_token(cache[name], skip_positions).double()
            z, recon = ae(x.float())
            s = sums[name]
            s.squared_error += float((recon.double() - x).pow(2).sum())
            s.squared_norm += float(x.pow(2).sum())
            s.total = x.sum(0) if s.total is None else s.total + x.sum(0)
            s.count += len(x)
            s.active += int((z > 0).sum())
            with model.hooks(fwd=[(name, _splice_hook(ae, skip_positions))]):
                s.loss += next_token_loss_sum(model(batch), batch)[0]
        if progress:
            print(f"train-sae: evaluated batch {b + 1}/{len(batches)}", file=sys.stderr)
    layers = {}
    for name, s in sums.items():
        assert s.total is not None
        mean = s.total / s.count
        total_variance = s.squared_norm - s.count * float(mean.pow(2).sum())
        layers[name] = {
            "nmse": s.squared_error / max(total_variance, 1e-30),
            "l0": s.active / s.count,
            "loss_spliced": s.loss / predictions,
        }
    return {"loss_clean": clean_loss / predictions, "layers": layers}


@dataclass
class _EvalSums:
    """Running sums over held-out tokens for one autoencoder (float64 where it matters)."""

    squared_error: float = 0.0  # Σ ‖x̂ − x‖²
    squared_norm: float = 0.0  # Σ ‖x‖²
    total: torch.Tensor | None = None  # Σ x
    count: int = 0
    active: int = 0  # Σ number of nonzero latents
    loss: float = 0.0  # Σ next-token cross-entropy with the splice


def _splice_hook(
    ae: SparseAutoencoder, skip: int
) -> Callable[[torch.Tensor, HookPoint], torch.Tensor]:
    """A forward hook replacing the value at positions >= skip by its reconstruction."""

    def replace(value: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        x = value[:, skip:]
        _, recon = ae(x.reshape(*x.shape[:2], -1).float())
        out = value.clone()
        out[:, skip:] = recon.reshape(x.shape).to(value.dtype)
        return out

    return replace
