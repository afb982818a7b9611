"""Training TopK sparse autoencoders on activations streamed off a model, several layers at once.

    config = TrainingConfig(hook="blocks.{L}.hook_mlp_out", layers=(0, 5), n_latents=4096, k=32,
                            n_tokens=500_000)
    metrics = train_autoencoders(model, load_corpus("default"), config, "saes/")

**Data.** The corpus is cut into windows of `window_length` tokens (datasets/corpus.py). A seeded
permutation of the windows fixes their order: its first `eval_windows` windows are held out for
evaluation, the following ones are read once each (one pass), `batch_size` windows per step. Every
batch goes through the model once with hooks at all requested layers, and the forward stops after
the last of them. The first `skip_positions` positions of each window are left out of training,
evaluation and splicing: position 0 is the attention sink, whose activations at some layers are
10-100× larger than anywhere else (SmolLM2-135M: ‖hook_mlp_out‖ ≈ 460 vs ≈ 40 at layer 9) and
would dominate a squared error.

**Autoencoder and loss** (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):
TopK(k), no input normalization (autoencoders.py has the math). Initialization: decoder rows are
random unit vectors, the encoder is the decoder's transpose (the same rows in our layout),
b_enc = 0, and b_pre is the geometric median of the first batch. The loss is

    L = mean_t ‖x̂_t − x_t‖² / σ²  +  auxk_coef · ‖ê − e‖² / ‖e − mean(e)‖²

with σ² = mean_t ‖x_t − mean(x)‖² over the first batch (so predicting the mean scores 1), and
AuxK: e = x − x̂ is the residual (held fixed) and ê its reconstruction by the top `k_aux`
pre-activations among dead latents (no activation in the last `dead_after_tokens` training
tokens), which gives dead latents a gradient. Each step is one Adam step; before it the decoder
gradient's component along each decoder row is removed, and after it the rows are renormalized to
unit norm.

**Cost** on a CPU: per token and layer, three dense (n_latents × d_in) matrix products (the encoder,
its weight gradient, and the decoder's weight gradient inside `embedding_bag`'s backward), a top-k
over n_latents, and O(k · d_in) for the sparse decode; the rest is the model's own forward.

**Checkpoints.** Every `checkpoint_seconds` (or `checkpoint_every_steps`) and when training ends,
the whole state (weights, Adam moments, dead-latent counters, loss history, next step) is written
to `<out>/checkpoint.pt` through a temporary file and a rename. Started again with the same
arguments, training loads it and goes on from the next step; as batches are a function of the
seed and the step, the result equals an uninterrupted run's.

**Evaluation** on the held-out windows once training ends: evaluation.py (normalized MSE, L0, dead
latents, the model's loss with each autoencoder spliced in).

**Output.** `<out>/<hook name>/` per autoencoder in the native format (autoencoder_formats.py), with
the training settings and metrics in its metadata, and `<out>/metrics.json` for the whole run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from neuron_explainer.datasets.corpus import DEFAULT_WINDOW_LENGTH, Corpus, TokenWindows, tokenize
from neuron_explainer.models.autoencoder_formats import atomic_path, save_autoencoder
from neuron_explainer.models.autoencoders import AutoencoderConfig, SparseAutoencoder
from neuron_explainer.models.config import hook_width
from neuron_explainer.models.hooks import HookPoint
from neuron_explainer.models.transformer import HookedTransformer
from neuron_explainer.progress import Progress
from neuron_explainer.training.evaluation import LayerMetrics, evaluate, per_token

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class TrainingConfig:
    """What to train. `hook` is a hook name with `{L}` for the layer (`blocks.{L}.hook_mlp_out`);
    `n_tokens` is the budget of corpus tokens read for training (whole windows, one pass)."""

    hook: str
    layers: tuple[int, ...]
    n_latents: int
    k: int
    n_tokens: int
    batch_size: int = 32  # windows per step
    lr: float = 3e-3
    window_length: int = DEFAULT_WINDOW_LENGTH
    skip_positions: int = 1
    eval_windows: int = 32
    auxk_coef: float = 1 / 32
    k_aux: int = 0  # 0: d_in // 2, as in the paper
    dead_after_tokens: int = 50_000
    seed: int = 0

    def __post_init__(self) -> None:
        if "{L}" not in self.hook:
            raise ValueError(f"hook {self.hook!r} needs a {{L}} for the layer")
        if not self.layers:
            raise ValueError("no layers to train")
        for name in ("n_latents", "k", "n_tokens", "batch_size", "window_length", "eval_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.k > self.n_latents:
            raise ValueError(f"k={self.k} exceeds the number of latents {self.n_latents}")
        if not 0 <= self.skip_positions < self.window_length:
            raise ValueError(f"skip_positions must be in [0, {self.window_length})")

    def hook_name(self, layer: int) -> str:
        return self.hook.replace("{L}", str(layer))

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"layers": list(self.layers)}


ProgressCallback = Callable[[int, int, float], None]  # (step done, steps in total, tokens/s)


class TrainingInterrupted(Exception):
    """Raised by an `on_step` callback to stop training (tests use it to simulate a kill)."""


# ---- one autoencoder's training state --------------------------------------------------------


class LayerTrainer:
    """An autoencoder being trained: its Adam optimizer, loss scale, dead-latent counters and
    per-step training loss."""

    def __init__(self, cfg: TrainingConfig, layer: int, d_in: int, device: torch.device) -> None:
        self.cfg = cfg
        self.layer = layer
        self.ae = SparseAutoencoder(
            AutoencoderConfig(
                hook_name=cfg.hook_name(layer),
                d_in=d_in,
                n_latents=cfg.n_latents,
                activation="topk",
                k=cfg.k,
            )
        ).to(device)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + layer)
        directions = torch.randn(cfg.n_latents, d_in, generator=generator)
        directions /= directions.norm(dim=-1, keepdim=True)
        with torch.no_grad():
            self.ae.W_dec.copy_(directions)
            self.ae.W_enc.copy_(directions)
        self.ae.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.ae.parameters(), lr=cfg.lr)
        self.k_aux = cfg.k_aux or d_in // 2
        self.variance = 0.0  # σ², set from the first batch
        self.tokens_since_fired = torch.zeros(cfg.n_latents, dtype=torch.long, device=device)
        self.tokens_seen = 0
        self.history: list[float] = []

    def initialize(self, x: torch.Tensor) -> None:
        """b_pre = geometric median of the first batch x [T, d_in]; σ² from the same batch."""
        x = x.float()
        with torch.no_grad():
            self.ae.b_pre.copy_(geometric_median(x))
        self.variance = float((x - x.mean(0)).pow(2).sum(-1).mean())

    def step(self, x: torch.Tensor) -> float:
        """One Adam step on activations x [T, d_in]; returns the batch's normalized MSE."""
        ae, cfg = self.ae, self.cfg
        x = x.float()
        # W_enc (x - b_pre) + b_enc, written so that x (which needs no gradient) meets W_enc in one
        # product: its backward then computes only W_enc's gradient, not x's.
        pre = F.linear(x, ae.W_enc, ae.b_enc) - F.linear(ae.b_pre, ae.W_enc)
        top = pre.topk(cfg.k, dim=-1)
        values = F.relu(top.values)
        # The sparse decode Σ_j z_j W_dec[j] + b_pre, without forming z.
        recon = F.embedding_bag(top.indices, ae.W_dec, per_sample_weights=values, mode="sum")
        recon = recon + ae.b_pre
        nmse = (recon - x).pow(2).sum(-1).mean() / self.variance
        loss = nmse

        dead = self.tokens_since_fired >= cfg.dead_after_tokens
        if cfg.auxk_coef > 0 and bool(dead.any()):
            dead_ids = dead.nonzero().squeeze(1)
            aux_top = pre[:, dead_ids].topk(min(self.k_aux, len(dead_ids)), dim=-1)
            z_dead = torch.zeros(len(x), len(dead_ids), device=x.device, dtype=pre.dtype).scatter(
                -1, aux_top.indices, F.relu(aux_top.values)
            )
            residual = (x - recon).detach()
            aux = z_dead @ ae.W_dec[dead_ids]
            scale = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
            loss = loss + cfg.auxk_coef * (aux - residual).pow(2).sum(-1).mean() / scale

        loss.backward()
        with torch.no_grad():
            W, grad = ae.W_dec, ae.W_dec.grad
            assert grad is not None
            grad -= (grad * W).sum(-1, keepdim=True) * W  # keep the step tangent to unit rows
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            W.div_(W.norm(dim=-1, keepdim=True))

            fired = torch.zeros_like(dead)
            fired[top.indices[values > 0]] = True
            self.tokens_since_fired = torch.where(fired, 0, self.tokens_since_fired + len(x))
            self.tokens_seen += len(x)
        value = float(nmse.detach())
        self.history.append(value)
        return value

    def dead_fraction(self) -> tuple[float, int]:
        """(fraction of latents with no activation in the last N training tokens, N), with
        N = min(dead_after_tokens, tokens trained)."""
        window = min(self.cfg.dead_after_tokens, self.tokens_seen)
        dead = self.tokens_since_fired >= max(window, 1)
        return float(dead.float().mean()), window

    def state_dict(self) -> dict[str, Any]:
        return {
            "autoencoder": {k: v.detach().cpu() for k, v in self.ae.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "variance": self.variance,
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "tokens_seen": self.tokens_seen,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ae.load_state_dict(state["autoencoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.variance = float(state["variance"])
        device = self.tokens_since_fired.device
        self.tokens_since_fired = state["tokens_since_fired"].to(device)
        self.tokens_seen = int(state["tokens_seen"])
        self.history = list(state["history"])


def geometric_median(x: torch.Tensor, iterations: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """argmin_m Σ_t ‖x_t − m‖ for x [T, d], by Weiszfeld's iteration from the mean (float64)."""
    points = x.double()
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=-1).clamp_min(1e-12)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        moved = float((new - median).norm())
        median = new
        if moved <= tol * max(float(median.norm()), 1e-12):
            break
    return median.to(x.dtype)


# ---- running the model -------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the last hook needed, to skip the rest of the forward pass."""


def capture(
    model: HookedTransformer, tokens: torch.Tensor, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The values at hook points `names` for tokens [b, n]; the forward stops after the last."""
    order = {name: i for i, name in enumerate(model.hook_names())}
    last = max(names, key=order.__getitem__)
    cache: dict[str, torch.Tensor] = {}

    def save(x: torch.Tensor, hook: HookPoint) -> None:
        cache[hook.name] = x.detach()
        if hook.name == last:
            raise _StopForward

    hooks = [(n, save) for n in names]
    with torch.no_grad(), model.hooks(fwd=hooks), contextlib.suppress(_StopForward):
        model(tokens.to(model.device))
    return cache


# ---- the training run --------------------------------------------------------------------------


def train_autoencoders(
    model: HookedTransformer,
    corpus: Corpus | TokenWindows,
    config: TrainingConfig,
    out_dir: str | Path,
    checkpoint_seconds: float = 300.0,
    checkpoint_every_steps: int | None = None,
    eval_batch_size: int = 8,
    progress: bool = True,
    on_step: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Train one TopK autoencoder per layer in `config.layers` (module doc), resuming from
    `<out_dir>/checkpoint.pt` when present; write them and `<out_dir>/metrics.json`, which is
    also returned. A finished run is not redone: its metrics are returned as they are."""
    out_dir = Path(out_dir)
    names = [config.hook_name(layer) for layer in config.layers]
    widths = _check_hooks(model, names)
    if config.window_length > model.cfg.n_ctx:
        raise ValueError(f"window_length exceeds the model's context of {model.cfg.n_ctx}")
    if isinstance(corpus, TokenWindows):
        windows = corpus
    elif model.tokenizer is None:
        raise ValueError("training on a text corpus needs a model with a tokenizer")
    else:
        windows = tokenize(corpus, model.tokenizer, config.window_length)
    if windows.window_length != config.window_length:
        raise ValueError(f"the windows have length {windows.window_length}")
    order = np.random.default_rng(config.seed).permutation(len(windows))
    if len(order) <= config.eval_windows:
        raise ValueError(
            f"the corpus has {len(order)} windows of {config.window_length} tokens; "
            f"{config.eval_windows} are held out for evaluation, leaving none to train on"
        )
    eval_ids = order[: config.eval_windows]
    train_ids = order[config.eval_windows :][: config.n_tokens // config.window_length]
    if len(train_ids) == 0:
        raise ValueError(f"n_tokens={config.n_tokens} is less than one window")
    if len(train_ids) * config.window_length < config.n_tokens and progress:
        print(
            f"train-sae: the corpus holds {len(train_ids) * config.window_length:,} training "
            f"tokens (one pass), fewer than the {config.n_tokens:,} asked for",
            file=sys.stderr,
        )
    n_steps = math.ceil(len(train_ids) / config.batch_size)
    identity = {
        "version": CHECKPOINT_VERSION,
        "config": config.to_json(),
        "model": {"name": model.cfg.name, **model.cfg.to_dict()},
        "corpus": {"name": windows.corpus_name, "hash": windows.corpus_hash},
    }

    metrics_path = out_dir / METRICS
    if metrics_path.is_file():
        done = json.loads(metrics_path.read_text())
        _check_same(identity, done, metrics_path)
        if progress:
            print(f"train-sae: {out_dir} is already complete", file=sys.stderr)
        return dict(done)

    out_dir.mkdir(parents=True, exist_ok=True)
    device = model.device
    trainers = {
        layer: LayerTrainer(config, layer, widths[name], device)
        for layer, name in zip(config.layers, names, strict=True)
    }
    start_step, train_seconds = 0, 0.0
    checkpoint_path = out_dir / CHECKPOINT
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        _check_same(identity, state, checkpoint_path)
        for layer, trainer in trainers.items():
            trainer.load_state_dict(state["layers"][layer])
        start_step, train_seconds = int(state["step"]), float(state["train_seconds"])
        if progress:
            print(f"train-sae: resuming {out_dir} at step {start_step}/{n_steps}", file=sys.stderr)

    def save_checkpoint(step: int) -> None:
        state = identity | {
            "step": step,
            "train_seconds": train_seconds,
            "layers": {layer: t.state_dict() for layer, t in trainers.items()},
        }
        with atomic_path(checkpoint_path) as tmp:
            torch.save(state, tmp)

    tokens_per_step = config.batch_size * config.window_length
    reporter = Progress(
        "train-sae",
        total=len(train_ids) * config.window_length,
        done=min(start_step * tokens_per_step, len(train_ids) * config.window_length),
        enabled=progress,
    )
    last_checkpoint = time.monotonic()
    for step in range(start_step, n_steps):
        started = time.perf_counter()
        ids = np.sort(train_ids[step * config.batch_size : (step + 1) * config.batch_size])
        tokens = torch.from_numpy(windows.tokens[ids].astype(np.int64))
        values = capture(model, tokens, names)
        nmse = []
        for layer, name in zip(config.layers, names, strict=True):
            x = per_token(values.pop(name), config.skip_positions)
            if step == 0:
                trainers[layer].initialize(x)
            nmse.append(trainers[layer].step(x))
        train_seconds += time.perf_counter() - started
        done_tokens = min((step + 1) * tokens_per_step, reporter.total)
        reporter.update(done_tokens, f" nmse {float(np.mean(nmse)):.3f} (mean over layers)")
        due = (
            (step + 1) % checkpoint_every_steps == 0
            if checkpoint_every_steps
            else time.monotonic() - last_checkpoint >= checkpoint_seconds
        )
        if due and step + 1 < n_steps:
            save_checkpoint(step + 1)
            last_checkpoint = time.monotonic()
        if on_step is not None:
            on_step(step + 1, n_steps, done_tokens / max(train_seconds, 1e-9))
    reporter.finish()
    if start_step < n_steps:
        save_checkpoint(n_steps)  # evaluation can be redone without retraining

    results = evaluate(
        model,
        {t.ae.hook_name: t.ae for t in trainers.values()},
        windows.tokens[np.sort(eval_ids)],
        config.skip_positions,
        eval_batch_size,
        progress,
    )
    tokens_trained = len(train_ids) * config.window_length
    summary: dict[str, Any] = identity | {
        "status": "complete",
        "finishedAt": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tokens_trained": tokens_trained,
        "steps": n_steps,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(tokens_trained / max(train_seconds, 1e-9), 1),
        "eval": {
            "windows": len(eval_ids),
            "tokens": len(eval_ids) * config.window_length,
            "loss_clean": results["loss_clean"],
        },
        "autoencoders": {},
    }
    for layer, trainer in trainers.items():
        name = trainer.ae.hook_name
        dead, window = trainer.dead_fraction()
        r = results["layers"][name]
        layer_metrics = LayerMetrics(
            hook_name=name,
            nmse=r["nmse"],
            fraction_variance_explained=1 - r["nmse"],
            l0=r["l0"],
            dead_fraction=dead,
            dead_window_tokens=window,
            loss_clean=results["loss_clean"],
            loss_spliced=r["loss_spliced"],
            loss_increase=r["loss_spliced"] - results["loss_clean"],
            train_nmse_first=round(trainer.history[0], 5),
            train_nmse_last=round(float(np.mean(trainer.history[-10:])), 5),
            train_nmse=[round(v, 5) for v in trainer.history],
        )
        ae = trainer.ae.requires_grad_(False)
        ae.cfg.metadata.update(
            {
                "format": "native",
                "trained_by": "tdb train-sae",
                "model": model.cfg.name,
                "corpus": identity["corpus"],
                "training": config.to_json() | {"layer": layer, "tokens": tokens_trained},
                "metrics": {k: v for k, v in asdict(layer_metrics).items() if k != "train_nmse"},
            }
        )
        save_autoencoder(ae, out_dir / name)
        summary["autoencoders"][name] = {"path": name} | asdict(layer_metrics)
    with atomic_path(metrics_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    checkpoint_path.unlink(missing_ok=True)
    return summary


def _check_hooks(model: HookedTransformer, names: Sequence[str]) -> dict[str, int]:
    widths = {}
    known = set(model.hook_names())
    for name in names:
        if name not in known:
            raise ValueError(f"the model has no hook point {name!r}; see `tdb info --hooks`")
        width = hook_width(model.cfg, name)
        if width is None:
            raise ValueError(f"{name!r} is not a per-token activation; autoencoders need one")
        widths[name] = width
    return widths


def _check_same(identity: dict[str, Any], found: dict[str, Any], path: Path) -> None:
    differ = [key for key in identity if found.get(key) != identity[key]]
    if differ:
        detail = "; ".join(f"{key}: {found.get(key)!r} vs now {identity[key]!r}" for key in differ)
        raise ValueError(
            f"{path} was written with different settings ({detail}); pass the same arguments to "
            "resume, or choose another --out"
        )
