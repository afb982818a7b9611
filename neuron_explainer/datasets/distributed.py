"""Collation across a Ray cluster (`tdb collate --ray`): the windows cut into N shards, one Ray
task per shard, then the exact merge.

    connect(None, "tdb collate")        # the cluster ray.init() finds, or a local one
    job = ShardJob(model="smollm2-135m", settings={"n_tokens": 1_048_576})
    run = collate_on_ray(job, "/shared/big.sqlite", n_shards=8)

Nothing here schedules, queues or talks to another machine: Ray places each task where its
resources are free (one CPU, or `--threads`; one GPU when the model runs on CUDA), retries a task
whose worker process or node is lost (`MAX_RETRIES`), and carries the small results and the
progress reports.

A task is the single-machine shard collation (`collate(..., shard=(i, N))`, as `tdb collate
--shard I/N` runs it) in a Ray worker: it loads the model (once per worker process), reads and
tokenizes the corpus, and writes `OUT.shards/shard-I-of-N.sqlite`. Those files, the corpus and
local model paths must be on a filesystem every node sees (the driver merges the shard stores).
A shard store resumes like any store: a retried task goes on from the shard's last commit (the
lost worker's lock on the file went with its process), and rerunning the driver leaves complete
shards as they are (told from their metadata, before a model loads) and resumes the others. When
every shard is complete the driver merges them in shard order (merge.py: the store one run over
all windows writes) into `OUT.merging`, then renames that to OUT, so OUT is absent or complete.

Progress: each task reports its shard's tokens done and rate to a small actor (`ShardBoard`) at
most once a second; the driver reads it while it waits on the tasks and prints one line (tokens,
the summed tokens/s, ETA, shards done/running/queued/failed).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuron_explainer.datasets.collate import check_rerun, collate, parse_layers, shard_range
from neuron_explainer.datasets.corpus import DEFAULT_WINDOW_LENGTH, load_corpus, tokenize
from neuron_explainer.datasets.latents import collate_latents, load_autoencoders, merge_shards
from neuron_explainer.datasets.records import DatasetError
from neuron_explainer.datasets.store import DatasetMetadata, stored_metadata
from neuron_explainer.datasets.store_writer import StoreLock
from neuron_explainer.models.loading import load_model, model_name
from neuron_explainer.models.transformer import HookedTransformer
from neuron_explainer.progress import Progress, ProgressCallback, at_most_every

RAY_INSTALL = "pip install 'transformer-debugger[ray]'"
# Attempts after the first for a task whose worker process or node died (Ray's own default, stated
# here). An exception raised by the task itself is not retried: it would fail the same way again.
MAX_RETRIES = 3


class ClusterError(DatasetError):
    """Ray is missing, the cluster cannot be reached or lacks what a run asks for, or tasks
    failed."""


def import_ray(command: str) -> Any:
    """The `ray` module, or ClusterError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterError(f"{command} --ray needs Ray: {RAY_INSTALL}") from None
    return ray


def connect(address: str | None, command: str) -> Any:
    """Join the Ray cluster at `address` (HOST:PORT, 'auto', 'local', ray://...); None or '': the
    one `ray.init()` finds ($RAY_ADDRESS, else one started by `ray start` on this machine), else a
    new local one. Returns the `ray` module."""
    ray = import_ray(command)
    if not ray.is_initialized():
        try:
            ray.init(address=address or None, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = (
                f"at {address}" if address else "(ray.init() found none and could not start one)"
            )
            raise ClusterError(f"{command} --ray: cannot join the Ray cluster {where}: {e}") from e
    return ray


@dataclass(frozen=True)
class TaskResources:
    """What each task asks Ray for, and the device its model goes on."""

    device: str  # "cuda" (the GPU Ray assigned the task: it sees only that one) or "cpu"
    num_cpus: int
    num_gpus: int

    def options(self) -> dict[str, Any]:
        """Ray's options for a task with these resources."""
        return {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "max_retries": MAX_RETRIES,
            "retry_exceptions": False,
        }

    def slots(self, ray: Any) -> int:
        """How many such tasks the cluster runs at once (at least 1)."""
        free = ray.cluster_resources()
        if self.num_gpus:
            return max(1, int(free.get("GPU", 0)) // self.num_gpus)
        return max(1, int(free.get("CPU", 0)) // self.num_cpus)


def task_resources(ray: Any, device: str | None, threads: int | None) -> TaskResources:
    """CUDA when `device` says so, or by default when the cluster has GPUs; `threads` CPUs per
    task (torch threads), else 1."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if device is None:
        device = "cuda" if gpus >= 1 else "cpu"
    if device.startswith("cuda"):
        if gpus < 1:
            raise ClusterError(f"--device {device}: the Ray cluster has no GPU")
        return TaskResources("cuda", threads or 1, 1)
    return TaskResources(device, threads or 1, 0)


# ---- in the worker -------------------------------------------------------------------------------

_held: dict[str, tuple[Any, Any]] = {}


def worker_cached(kind: str, key: Any, make: Callable[[], Any]) -> Any:
    """One object of each kind per worker process, made again when the key changes: a worker runs
    many tasks of one run, and loading the model or tokenizing the corpus each time would
    dominate short tasks."""
    held = _held.get(kind)
    if held is None or held[0] != key:
        _held.pop(kind, None)  # free the old one before making the new one
        _held[kind] = (key, make())
    return _held[kind][1]


def cached_model(spec: str, device: str, dtype: str | None) -> HookedTransformer:
    """The model `load_model(spec, device, dtype)` loads, kept for the worker's next task."""
    key = (spec, device, dtype)
    model: HookedTransformer = worker_cached(
        "model", key, lambda: load_model(spec, device=device, dtype=dtype)
    )
    return model


@dataclass(frozen=True)
class ShardJob:
    """What every shard task runs: `tdb collate`'s arguments less --out and --shard. Paths must be
    absolute and visible on every node."""

    model: str
    corpus: str = "default"
    text_field: str = "text"
    layers: str | None = None  # as parse_layers reads it; None: all (or the autoencoders')
    autoencoders: tuple[str, ...] = ()
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None
    # collate's settings that a store records: n_tokens, families, batch_size, k,
    # random_sample_size, quantile_sample_size, window_length, calibration_windows, seed.
    settings: dict[str, Any] = field(default_factory=dict)
    commit_every_batches: int | None = None
    commit_every_seconds: float = 60.0

    def dtype_name(self) -> str:
        import torch

        return str(getattr(torch, self.dtype or "float32")).removeprefix("torch.")


@dataclass(frozen=True)
class ShardResult:
    shard: int
    n_tokens: int
    bytes: int  # the shard store's size: what the merge reads
    seconds: float  # this attempt's, model loading included
    reused: bool  # complete before this run
    started_at: float = 0.0  # when this attempt started (time.time(), the worker's clock)
    setup_seconds: float = 0.0  # of `seconds`: loading the model, reading and tokenizing the corpus


class ShardBoard:
    """Ray actor: the latest (tokens done, tokens in total, tokens/s) of each shard, and how many
    times each shard's task was started (more than once: Ray retried it)."""

    def __init__(self) -> None:
        self.progress: dict[int, tuple[int, int, float]] = {}
        self.attempts: dict[int, int] = {}

    def started(self, shard: int) -> None:
        self.attempts[shard] = self.attempts.get(shard, 0) + 1

    def report(self, shard: int, done: int, total: int, rate: float) -> None:
        self.progress[shard] = (done, total, rate)

    def read(self) -> tuple[dict[int, tuple[int, int, float]], dict[int, int]]:
        return self.progress, self.attempts


def _reporter(board: Any, shard: int) -> ProgressCallback:
    def report(done: int, total: int, rate: float) -> None:
        board.report.remote(shard, done, total, rate)

    return at_most_every(1.0, report)


def collate_shard(
    job: ShardJob, path: str, shard: tuple[int, int], board: Any
) -> ShardResult | None:
    """The Ray task: collate shard `shard` = (i, N) into the store at `path` (resuming it, or
    leaving it as it is when complete). None when the shard holds no windows (more shards than
    batches)."""
    start, started_at = time.monotonic(), time.time()
    i = shard[0]
    board.started.remote(i)
    existing = stored_metadata(path)
    reused = existing is not None and existing.status == "complete"
    settings = job.settings
    corpus = load_corpus(job.corpus, text_field=job.text_field)
    if not job.autoencoders:  # as `tdb collate` does: a complete shard is told before loading
        done = check_rerun(
            path,
            model_name(job.model),
            job.dtype_name(),
            corpus,
            layers=job.layers,
            shard=shard,
            **settings,
        )
        if done is not None:
            board.report.remote(i, done.n_tokens, done.n_tokens, 0.0)
            size, seconds = Path(path).stat().st_size, time.monotonic() - start
            return ShardResult(i, done.n_tokens, size, seconds, True, started_at, seconds)
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    model = cached_model(job.model, job.device, job.dtype)
    assert model.tokenizer is not None
    length = settings.get("window_length", DEFAULT_WINDOW_LENGTH)
    windows = worker_cached(
        "windows",
        (job.corpus, job.text_field, corpus.hash, job.model, length),
        lambda: tokenize(corpus, model.tokenizer, length),  # type: ignore[arg-type]
    )
    n_windows = len(windows)
    if settings.get("n_tokens") is not None:
        n_windows = min(n_windows, settings["n_tokens"] // length)
    first, end = shard_range(n_windows, settings.get("batch_size", 32), shard)
    if first >= end:
        board.report.remote(i, 0, 0, 0.0)
        return None
    setup = time.monotonic() - start
    options: dict[str, Any] = dict(
        settings,
        layers=parse_layers(job.layers, model.cfg.n_layers) if job.layers else None,
        shard=shard,
        commit_every_batches=job.commit_every_batches,
        commit_every_seconds=job.commit_every_seconds,
        progress=False,
        on_progress=_reporter(board, i),
    )
    if job.autoencoders:
        autoencoders = load_autoencoders(job.autoencoders, model)
        meta = collate_latents(model, windows, path, autoencoders, **options)
    else:
        meta = collate(model, windows, path, **options)
    board.report.remote(i, meta.n_tokens, meta.n_tokens, 0.0)
    size, seconds = Path(path).stat().st_size, time.monotonic() - start
    return ShardResult(i, meta.n_tokens, size, seconds, reused, started_at, setup)


# ---- on the driver -------------------------------------------------------------------------------


def shard_paths(out: Path, n_shards: int) -> list[Path]:
    """Where the shard stores of `out` go: `OUT.shards/shard-I-of-N.sqlite`."""
    folder = out.with_name(out.name + ".shards")
    return [folder / f"shard-{i}-of-{n_shards}.sqlite" for i in range(n_shards)]


@dataclass
class ClusterRun:
    """What `collate_on_ray` did."""

    metadata: DatasetMetadata
    shards: list[ShardResult | None] = field(default_factory=list)  # None: an empty shard
    attempts: dict[int, int] = field(default_factory=dict)  # tasks started per shard
    seconds: float = 0.0  # the whole run, merge included
    merge_seconds: float = 0.0
    nothing_to_do: bool = False  # OUT was complete already
    submitted_at: float = 0.0  # when the tasks were submitted (time.time())

    @property
    def shard_bytes(self) -> int:
        return sum(s.bytes for s in self.shards if s is not None)

    @property
    def retried(self) -> dict[int, int]:
        """{shard: attempts} of the shards Ray ran more than once."""
        return {i: n for i, n in sorted(self.attempts.items()) if n > 1}


def collate_on_ray(
    job: ShardJob,
    out_path: str | Path,
    n_shards: int,
    resources: TaskResources,
    keep_shards: bool = False,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
) -> ClusterRun:
    """Collate `job` into the store at `out_path` with one Ray task per shard (module doc), on
    the cluster this process has joined (`connect`). The shard stores are deleted after the merge
    unless `keep_shards`. A complete OUT with the same settings is left as it is. Raises
    ClusterError naming the shards that failed (the others stay complete: rerun to resume)."""
    ray = import_ray("tdb collate")
    if n_shards < 1:
        raise ValueError(f"--shards {n_shards}: at least 1")
    start = time.monotonic()
    out = Path(out_path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with StoreLock(out):
        if out.exists():
            return ClusterRun(_complete_out(job, out), nothing_to_do=True)
        paths = shard_paths(out, n_shards)
        paths[0].parent.mkdir(exist_ok=True)
        node = ray.get_runtime_context().get_node_id()
        board = (
            ray.remote(ShardBoard)
            .options(
                num_cpus=0,
                scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                    node, soft=True
                ),
            )
            .remote()
        )
        task = ray.remote(collate_shard).options(**resources.options())
        submitted_at = time.time()
        pending = {task.remote(job, str(p), (i, n_shards), board): i for i, p in enumerate(paths)}
        budget = job.settings.get("n_tokens")
        length = job.settings.get("window_length", DEFAULT_WINDOW_LENGTH)
        expected = budget // length * length if budget else 0  # until every shard reports
        results, failed, attempts = _wait(ray, pending, board, expected, progress, on_progress)
        if failed:
            raise ClusterError(
                f"{len(failed)} of {n_shards} shards failed (the others are kept in "
                f"{paths[0].parent}; rerun the same command to resume):\n"
                + "\n".join(f"  shard {i}: {why}" for i, why in sorted(failed.items()))
            )
        shards = [results[i] for i in range(n_shards)]
        merge_start = time.monotonic()
        meta = _merge([p for p, r in zip(paths, shards, strict=True) if r is not None], out)
        run = ClusterRun(
            meta,
            shards,
            attempts,
            time.monotonic() - start,
            time.monotonic() - merge_start,
            submitted_at=submitted_at,
        )
        if not keep_shards:
            shutil.rmtree(paths[0].parent)
        return run


def _complete_out(job: ShardJob, out: Path) -> DatasetMetadata:
    """The metadata of an existing OUT that this run would write as it is, else DatasetError."""
    existing = stored_metadata(out)
    if existing is None or existing.status != "complete":
        status = "not a store" if existing is None else f"status {existing.status}"
        raise DatasetError(
            f"{out} exists ({status}); --ray writes OUT only once every shard is merged: remove "
            "it, or resume it without --ray"
        )
    if job.autoencoders:  # telling whether they are the same ones needs them loaded
        raise DatasetError(
            f"{out} is complete already (--ray writes OUT once every shard is merged); it is "
            "left as it is: remove it to collate again with these autoencoders"
        )
    settings = dict(job.settings)
    if settings.get("n_tokens") is None:
        # The whole corpus: as many windows as the store has when the corpus and the model are
        # the same, which check_rerun verifies.
        settings["n_tokens"] = existing.n_windows_total * existing.window_length
    corpus = load_corpus(job.corpus, text_field=job.text_field)
    check_rerun(out, model_name(job.model), job.dtype_name(), corpus, layers=job.layers, **settings)
    return existing


def _wait(
    ray: Any,
    pending: dict[Any, int],
    board: Any,
    expected: int,
    show: bool,
    on_progress: ProgressCallback | None,
) -> tuple[dict[int, ShardResult | None], dict[int, str], dict[int, int]]:
    """Wait for every shard task, showing the board's progress; (results, failures, attempts).
    `expected`: the tokens in total as far as the driver knows (the shards report theirs)."""
    n_shards = len(pending)
    results: dict[int, ShardResult | None] = {}
    failed: dict[int, str] = {}
    bar = Progress("collate", total=expected, done=0, enabled=show, callback=on_progress)
    attempts: dict[int, int] = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=1.0)
        for ref in ready:
            shard = pending.pop(ref)
            try:
                results[shard] = ray.get(ref)
            except Exception as e:  # the task's own exception, or its worker lost for good
                failed[shard] = _reason(e)
        try:
            reports, attempts = ray.get(board.read.remote(), timeout=10)
        except Exception:  # the board is lost with its node: progress pauses, the run goes on
            continue
        finished = results.keys() | failed.keys()
        if len(reports) == n_shards or not expected:
            bar.total = sum(total for _, total, _ in reports.values())
        running = sum(1 for i in attempts if i not in finished)
        note = (
            f"; shards {len(results)} done, {running} running, "
            f"{n_shards - len(finished) - running} queued, {len(failed)} failed"
        )
        retried = sum(n - 1 for n in attempts.values())
        if retried:
            note += f", {retried} retried"
        rate = sum(r for i, (_, _, r) in reports.items() if i not in finished)
        if not pending:  # the run's own rate: the tokens it collated (not those reused) per second
            new = sum(r.n_tokens for r in results.values() if r is not None and not r.reused)
            rate = new / max(time.monotonic() - bar.start, 1e-9)
        done = sum(d for d, _, _ in reports.values())
        bar.update(done, note, force=not pending, rate=rate)
    bar.finish()
    return results, failed, attempts


def _reason(error: Exception) -> str:
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"


def _merge(inputs: list[Path], out: Path) -> DatasetMetadata:
    """Merge into OUT.merging, then rename it to OUT (a merge cut short leaves no OUT)."""
    tmp = out.with_name(out.name + ".merging")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
        leftover.unlink(missing_ok=True)
    meta = merge_shards(inputs, tmp)
    os.replace(tmp, out)
    Path(f"{tmp}.lock").unlink(missing_ok=True)
    return meta


def print_summary(run: ClusterRun) -> None:
    """What the shards did, on stderr: reused, retried, bytes merged, times."""
    if run.nothing_to_do:
        return
    shards = [s for s in run.shards if s is not None]
    reused = sum(s.reused for s in shards)
    line = (
        f"collate: {len(shards)} shards ({reused} complete already, "
        f"{len(run.shards) - len(shards)} empty), {run.shard_bytes / 2**20:,.1f} MiB of shard "
        f"stores merged in {run.merge_seconds:.1f}s; {run.seconds:.1f}s in all"
    )
    if run.retried:
        line += "; retried by Ray: " + ", ".join(
            f"shard {i} ({n} attempts)" for i, n in run.retried.items()
        )
    print(line, file=sys.stderr)
