"""Collation: stream a corpus through the model and keep, per component, what makes it fire.

    collate(model, corpus, "smollm2.tdb.sqlite", n_tokens=100_000, layers=[0, 5])

The corpus is cut into fixed windows (corpus.py); windows go through the model in batches with
hooks on the values the requested families read (families.py, runner.py). Each (family, layer)'s
activations are folded into its `LayerAccumulator` (accumulators.py: exact top-k, hash-keyed random
samples, quantile-binned samples, moments) as soon as its hooks fire, then dropped; the forward
stops after the last hook needed, so the layers above and the unembedding are never computed.

Every `commit_every_batches` batches (or `commit_every_seconds`, stretched to 10x the last commit's
duration so that commits never take more than about a tenth of the run), the whole running state
and the next window index are written to the SQLite store in one transaction (store_writer.py).
Started again with the same arguments, `collate` loads that state and goes on from the next
window; the finished store is identical to an uninterrupted run's (keys are hashes of window
indices, not RNG draws, and batches keep their composition because they are aligned to the range
start). Started on a complete store with the same arguments, it writes nothing (the file keeps its
bytes); `check_rerun` tells so from the store's metadata alone, before the model is loaded.

Shards: `shard=(i, n)` processes the i-th of n contiguous window ranges (aligned to whole batches,
so each batch has the same windows as in a single run), and `merge_stores` (merge.py) folds
complete shard stores into one, exactly. Quantile boundaries come from the first
`calibration_windows` windows of the corpus; a shard that does not start there first runs those
windows to compute the same boundaries.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuron_explainer.datasets.accumulators import (
    QUANTILES,
    LayerAccumulator,
    intra_op_threads,
)
from neuron_explainer.datasets.corpus import DEFAULT_WINDOW_LENGTH, Corpus, TokenWindows, tokenize
from neuron_explainer.datasets.families import FAMILIES, ComponentFamily, LatentFamily, get_family
from neuron_explainer.datasets.runner import ActivationRunner, UpdateThreads
from neuron_explainer.datasets.store import (
    FORMAT_VERSION,
    RESUME_FIELDS,
    DatasetMetadata,
    StoreStatus,
    stored_metadata,
    utc_now,
)
from neuron_explainer.datasets.store_writer import StoreLock, StoreWriter, load_accumulator
from neuron_explainer.models.config import ModelConfig
from neuron_explainer.models.transformer import HookedTransformer
from neuron_explainer.progress import Progress, ProgressCallback

# What `collate` collates unless told: the families of the node types that live in the model itself
# (mlp_neuron, attention_head); latent families need autoencoders (latents.py).
DEFAULT_FAMILIES = tuple(name for name, f in FAMILIES.items() if not isinstance(f, LatentFamily))


def tool_version() -> str:
    try:
        return importlib.metadata.version("transformer-debugger")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """'0,1,5-7' -> [0, 1, 5, 6, 7]; 'all' or '' -> every layer. Raises ValueError when out of range."""
    if spec.strip() in ("", "all"):
        return list(range(n_layers))
    layers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                layers.update(range(lo, hi + 1))
            else:
                layers.add(int(part))
        except ValueError:
            raise ValueError(f"bad layer list {spec!r}: use e.g. 0,1,5-7") from None
    bad = sorted(x for x in layers if not 0 <= x < n_layers)
    if bad:
        raise ValueError(f"layers {bad} are out of range: the model has layers 0-{n_layers - 1}")
    return sorted(layers)


def parse_shard(spec: str) -> tuple[int, int]:
    """'2/8' -> (2, 8): the third of eight shards."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"bad shard {spec!r}: use I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"bad shard {spec!r}: need 0 <= I < N")
    return i, n


def shard_range(n_windows: int, batch_size: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """[start, end) windows of a shard: contiguous, aligned to whole batches."""
    if shard is None:
        return 0, n_windows
    i, n = shard
    n_batches = math.ceil(n_windows / batch_size)
    return (
        min(n_windows, i * n_batches // n * batch_size),
        min(n_windows, (i + 1) * n_batches // n * batch_size),
    )


def collate(
    model: HookedTransformer,
    corpus: Corpus | TokenWindows,
    out_path: str | Path,
    n_tokens: int | None = None,
    layers: Sequence[int] | None = None,
    families: Sequence[str] | None = None,
    batch_size: int = 32,
    k: int = 20,
    random_sample_size: int = 20,
    quantile_sample_size: int = 5,
    quantiles: Sequence[float] = QUANTILES,
    window_length: int = DEFAULT_WINDOW_LENGTH,
    calibration_windows: int = 256,
    seed: int = 0,
    active_threshold: float = 0.0,
    shard: tuple[int, int] | None = None,
    commit_every_batches: int | None = None,
    commit_every_seconds: float = 60.0,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
    lock: StoreLock | None = None,
) -> DatasetMetadata:
    """Collate `corpus` (or pre-tokenized windows) into the store at `out_path`, resuming it when
    it holds an unfinished run with the same arguments. Returns the store's metadata.

    n_tokens: budget (rounded down to whole windows; default the whole corpus). layers: default
    all. families: default mlp_neuron and attention_head. The calibration windows for quantile
    boundaries are min(calibration_windows, n_windows // 4) (at least 1). progress: a line on
    stderr every 10 s (every batch on a terminal); on_progress: called after every batch. lock:
    the store's lock when the caller took it already (`tdb collate` does, before loading the
    model); else it is taken here. A complete store with the same settings is left as it is, byte
    for byte. See the module doc.
    """
    if model.tokenizer is None:
        raise ValueError("collation needs a model with a tokenizer")
    _check_arguments(n_tokens, batch_size, k, window_length)
    if window_length > model.cfg.n_ctx:
        raise ValueError(
            f"window_length {window_length} exceeds the model's context {model.cfg.n_ctx}"
        )
    layers = list(range(model.cfg.n_layers)) if layers is None else sorted(set(layers))
    bad = [x for x in layers if not 0 <= x < model.cfg.n_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} are out of range 0-{model.cfg.n_layers - 1}")
    family_list = [get_family(f) for f in (families or DEFAULT_FAMILIES)]

    windows = (
        corpus
        if isinstance(corpus, TokenWindows)
        else tokenize(corpus, model.tokenizer, window_length)
    )
    if windows.window_length != window_length:
        raise ValueError(f"the windows have length {windows.window_length}, not {window_length}")
    n_windows = len(windows)
    if n_tokens is not None:
        n_windows = min(n_windows, n_tokens // window_length)
    start, end = shard_range(n_windows, batch_size, shard)
    if start >= end:
        raise ValueError(
            f"shard {shard} of {n_windows} windows in batches of {batch_size} is empty"
        )
    settings = _settings(
        model_identity(model.cfg),
        str(model.dtype).removeprefix("torch."),
        {"name": windows.corpus_name, "hash": windows.corpus_hash},
        n_windows,
        window_length=window_length,
        layers=layers,
        families=[f.name for f in family_list],
        batch_size=batch_size,
        k=k,
        random_sample_size=random_sample_size,
        quantile_sample_size=quantile_sample_size,
        quantiles=quantiles,
        calibration_windows=calibration_windows,
        seed=seed,
        active_threshold=active_threshold,
        shard=shard,
    )
    metadata = DatasetMetadata(
        format_version=FORMAT_VERSION,
        tool_version=tool_version(),
        n_tokens=0,
        status="in_progress",
        next_window=start,
        created_at=utc_now(),
        updated_at=utc_now(),
        token_dtype="uint16" if model.tokenizer.vocab_size <= 2**16 else "int32",
        **settings,
    )
    config = metadata.accumulator_config()

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    held = lock if lock is not None else StoreLock(out_path)
    try:
        # Read before the writer opens the file (which switches it to WAL mode), so that a
        # complete store is left exactly as it is.
        existing = stored_metadata(out_path)
        if existing is not None:
            existing.check_same(metadata, RESUME_FIELDS, f"{out_path} was started with")
            if existing.status == "complete":
                if progress:
                    print(
                        f"collate: {out_path} is already complete; nothing to do", file=sys.stderr
                    )
                return existing
            metadata = existing
        writer = StoreWriter(out_path, held)
        try:
            targets = [(f, layer) for layer in layers for f in family_list]
            accumulators = {
                (f.name, layer): (
                    load_accumulator(
                        writer.conn, metadata, f.name, layer, f.n_components(model), model.device
                    )
                    if existing is not None
                    else LayerAccumulator(
                        f.name,
                        layer,
                        f.n_components(model),
                        f.positions(window_length),
                        config,
                        model.device,
                    )
                )
                for f, layer in targets
            }
            _run(
                model,
                windows,
                metadata,
                accumulators,
                targets,
                writer,
                commit_every_batches,
                commit_every_seconds,
                progress,
                on_progress,
            )
            return metadata
        finally:
            writer.close()
    finally:
        if lock is None:
            held.release()


def check_rerun(
    out_path: str | Path,
    model_name: str,
    dtype: str,
    corpus: Corpus,
    n_tokens: int | None = None,
    layers: str | None = None,
    families: Sequence[str] | None = None,
    batch_size: int = 32,
    k: int = 20,
    random_sample_size: int = 20,
    quantile_sample_size: int = 5,
    quantiles: Sequence[float] = QUANTILES,
    window_length: int = DEFAULT_WINDOW_LENGTH,
    calibration_windows: int = 256,
    seed: int = 0,
    active_threshold: float = 0.0,
    shard: tuple[int, int] | None = None,
) -> DatasetMetadata | None:
    """What `collate` with these arguments would make of the store at `out_path`, told from its
    metadata before the model is loaded (nothing is written): the store's metadata when it is
    complete with the same settings (nothing to do); DatasetError listing the settings that
    differ, as `collate` would; None when the run has to go on (no store yet, an unfinished one)
    or when telling needs the model.

    `model_name` is the name `load_model` gives the model (loading.model_name) and `dtype` its
    dtype's name; `layers` is a layer list as `parse_layers` reads it. The model is identified by
    its name, and has the sizes the store records when the names agree. The number of windows is
    that of the tokenized corpus, unless a budget of at most the store's windows cuts it (the same
    corpus, tokenized by the same model, has at least as many windows as the store): with no
    budget or a larger one, telling needs the model, to tokenize the corpus.
    """
    _check_arguments(n_tokens, batch_size, k, window_length)
    existing = stored_metadata(out_path)
    if existing is None:
        return None
    same_model = existing.model.get("name") == model_name
    corpus_id = {"name": corpus.name, "hash": corpus.hash}
    n_windows = None if n_tokens is None else n_tokens // window_length
    if not (same_model and corpus_id == existing.corpus) or (
        n_windows is not None and n_windows > existing.n_windows_total
    ):
        n_windows = None
    n_layers = int(existing.model["nLayers"]) if same_model else None
    known = _settings(
        existing.model if same_model else {"name": model_name},
        dtype,
        corpus_id,
        n_windows,
        window_length=window_length,
        layers=[] if n_layers is None else parse_layers(layers or "", n_layers),
        families=[get_family(f).name for f in (families or DEFAULT_FAMILIES)],
        batch_size=batch_size,
        k=k,
        random_sample_size=random_sample_size,
        quantile_sample_size=quantile_sample_size,
        quantiles=quantiles,
        calibration_windows=calibration_windows,
        seed=seed,
        active_threshold=active_threshold,
        shard=shard,
    )
    if n_layers is None:
        del known["layers"]
    planned = dataclasses.replace(existing, **known)
    existing.check_same(planned, RESUME_FIELDS, f"{out_path} was started with")
    if existing.status == "complete" and known.keys() >= set(RESUME_FIELDS):
        return existing
    return None


def model_identity(cfg: ModelConfig) -> dict[str, Any]:
    """How a store's metadata names the model it was built with (its `model` field)."""
    return {
        "name": cfg.name,
        "nLayers": cfg.n_layers,
        "dModel": cfg.d_model,
        "dMlp": cfg.d_mlp,
        "nHeads": cfg.n_heads,
        "vocabSize": cfg.vocab_size,
    }


def _check_arguments(n_tokens: int | None, batch_size: int, k: int, window_length: int) -> None:
    for name, value in (("batch_size", batch_size), ("k", k), ("window_length", window_length)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if n_tokens is not None and n_tokens < window_length:
        raise ValueError(f"n_tokens={n_tokens} is less than one window of {window_length}")


def _settings(
    model: dict[str, Any],
    dtype: str,
    corpus: dict[str, Any],
    n_windows: int | None,
    *,
    window_length: int,
    layers: list[int],
    families: list[str],
    batch_size: int,
    k: int,
    random_sample_size: int,
    quantile_sample_size: int,
    quantiles: Sequence[float],
    calibration_windows: int,
    seed: int,
    active_threshold: float,
    shard: tuple[int, int] | None,
) -> dict[str, Any]:
    """The metadata fields a run must agree on to resume a store (RESUME_FIELDS), for a run with
    these arguments. The three that depend on the number of windows are left out when it is not
    known (None)."""
    settings: dict[str, Any] = dict(
        model=model,
        corpus=corpus,
        window_length=window_length,
        families=families,
        layers=layers,
        k=k,
        random_sample_size=random_sample_size,
        quantile_sample_size=quantile_sample_size,
        quantiles=[float(q) for q in quantiles],
        seed=seed,
        active_threshold=float(active_threshold),
        dtype=dtype,
        batch_size=batch_size,
        shard=None if shard is None else f"{shard[0]}/{shard[1]}",
    )
    if n_windows is not None:
        settings["n_windows_total"] = n_windows
        settings["window_ranges"] = [list(shard_range(n_windows, batch_size, shard))]
        settings["calibration_windows"] = max(1, min(calibration_windows, n_windows // 4))
    return settings


def _run(
    model: HookedTransformer,
    windows: TokenWindows,
    metadata: DatasetMetadata,
    accumulators: dict[tuple[str, int], LayerAccumulator],
    targets: Sequence[tuple[ComponentFamily, int]],
    writer: StoreWriter,
    commit_every_batches: int | None,
    commit_every_seconds: float,
    show_progress: bool,
    on_progress: ProgressCallback | None,
) -> None:
    tokenizer = model.tokenizer
    assert tokenizer is not None
    [[start, end]] = metadata.window_ranges
    bs, length = metadata.batch_size, metadata.window_length
    runner = ActivationRunner(model, targets)
    threads = UpdateThreads(torch.get_num_threads()) if model.device.type == "cpu" else None
    first_acc = next(iter(accumulators.values()))
    n_cal = metadata.calibration_windows

    if first_acc.boundaries is None and not (start == 0 and end >= n_cal):
        # This shard does not see all calibration windows: run them first (scores only), in the
        # same batches a single run would use.
        def calibrate(first: int) -> Callable[[ComponentFamily, int, torch.Tensor], None]:
            def on_acts(family: ComponentFamily, layer: int, acts: torch.Tensor) -> None:
                scores = acts.amax(dim=2).T.float()[:, : max(0, n_cal - first)]
                accumulators[(family.name, layer)].calibrate(scores, first)

            return on_acts

        for first, tokens in windows.batches(bs, 0, math.ceil(n_cal / bs) * bs):
            runner.run(tokens, calibrate(first))

    def update(first: int) -> Callable[[ComponentFamily, int, torch.Tensor], None]:
        def on_acts(family: ComponentFamily, layer: int, acts: torch.Tensor) -> None:
            accumulators[(family.name, layer)].update(acts, first)

        return on_acts

    progress = Progress(
        "collate",
        total=(end - start) * length,
        done=(metadata.next_window - start) * length,
        enabled=show_progress,
        callback=on_progress,
    )
    pending: dict[int, np.ndarray] = {}
    last_commit, batches_since = time.monotonic(), 0
    interval = commit_every_seconds  # stretched after each commit, see the module doc

    kept: set[int] | None = None  # windows the committed samples hold

    def commit(next_window: int, status: StoreStatus) -> None:
        nonlocal last_commit, batches_since, kept, interval
        started = time.monotonic()
        metadata.next_window = next_window
        metadata.n_tokens = (next_window - start) * length
        metadata.status = status
        metadata.updated_at = utc_now()
        with intra_op_threads(threads.best() if threads else None):
            kept = writer.commit(metadata, accumulators.values(), pending, tokenizer.token_display)
        pending.clear()
        last_commit, batches_since = time.monotonic(), 0
        interval = max(commit_every_seconds, 10 * (last_commit - started))

    for first, tokens in windows.batches(bs, metadata.next_window, end):
        if threads is None:
            runner.run(tokens, update(first))
        else:
            threads.record(runner.run(tokens, update(first), threads.next_batch()))
        for i, row in enumerate(windows.tokens[first : first + len(tokens)]):
            pending[first + i] = row
        next_window = first + len(tokens)
        batches_since += 1
        due = (
            batches_since >= commit_every_batches
            if commit_every_batches
            else time.monotonic() - last_commit >= interval
        )
        if due and next_window < end and first_acc.boundaries is not None:
            commit(next_window, "in_progress")
            progress.update((next_window - start) * length, " (committed)")
        else:
            progress.update((next_window - start) * length)
    writer.leave_wal()
    commit(end, "complete")
    progress.update((end - start) * length, force=True)
    progress.finish()
    writer.finish(kept)
