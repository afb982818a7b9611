"""Collation throughput vs a bare forward pass of the same model on the same batches.

The corpus (default: the built-in Jane Austen corpus) is tokenized once into 64-token windows; the
first `--tokens` worth of windows, in batches of `--batch-size`, are then
1. run through the model as a full forward (`model(tokens)` under torch.no_grad(), logits and all):
   the baseline;
2. collated with `neuron_explainer.datasets.collate.collate` into a fresh SQLite store in a
   temporary folder (progress off, everything else at collate's defaults: k = 20, 20 random and
   5 x 5 quantile-binned excerpts, commits every 60 s), once per configuration of families.
Collation time covers the whole `collate` call on the pre-tokenized windows: hooks, accumulators,
SQLite commits and the final clean-up of the store. Everything is warmed up once (one batch) first;
with `--repeats N` the forward and the collations alternate N times and the best time of each is
kept (other processes only ever add time). `--profile N` adds an untimed, cProfiled collation per
configuration.

Prints tokens/s of each, the ratio collation/forward (the project's target is >= 0.8), and the
finished store's size, also scaled to MiB per million tokens. Store size is mostly the kept
excerpts' activations, a fixed amount per component once the samples are full, so the scaled
figure overstates the size of larger runs; the absolute size is printed as well. The default
budget is the demo's background store (65,536 tokens). Smaller budgets show a lower ratio: the
last commit and the clean-up of the store (~8 s for 30 layers here, writing ~480 MiB) are a fixed
cost per store.

With `--ray N` the first configuration is also collated through a new local Ray cluster of N
CPU slots (`tdb collate --ray --shards N`: one task of one torch thread per shard, then the merge),
against the single-process collation timed above: tokens/s of both and their ratio; per shard its
tokens, the task's start latency (submission to the task running: worker process start-up), its
set-up (loading the model, reading and tokenizing the corpus), the calibration windows it runs
first and its store's size; the merge's time, also of shard 0 alone, which gives a fixed part and a
cost per shard; the bytes moved (the shard stores, written by the tasks and read by the merge, the
merged store, and what goes through Ray's object store); and the time projected for K machines
from these figures. On a machine with fewer cores than N + 1 the Ray figure measures overhead, not
scaling.

    python bench/collate.py                                    # all layers, both families
    python bench/collate.py --families mlp_neuron,attention_head mlp_neuron attention_head
    python bench/collate.py --tokens 4096 --layers 0-3 --profile 25
    python bench/collate.py --tokens 16384 --ray 2             # against 2 local Ray workers
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import math
import os
import pickle
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from neuron_explainer.datasets.collate import DEFAULT_FAMILIES, collate, parse_layers
from neuron_explainer.datasets.corpus import DEFAULT_WINDOW_LENGTH, load_corpus, tokenize
from neuron_explainer.datasets.store import stored_metadata
from neuron_explainer.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", default="default", help="as `tdb collate --corpus`")
    parser.add_argument(
        "--tokens",
        type=int,
        default=65536,
        help="token budget (whole windows; default: the demo's background store)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="windows per forward pass")
    parser.add_argument("--window-length", type=int, default=DEFAULT_WINDOW_LENGTH)
    parser.add_argument("--layers", default="all", help="e.g. 0,1,5-7 (default: all)")
    parser.add_argument(
        "--families",
        nargs="+",
        default=[",".join(DEFAULT_FAMILIES)],
        help="one or more configurations, each a comma-separated family list "
        "(default: mlp_neuron,attention_head)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs of each, alternating; best kept"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="cProfile each collation; top N rows"
    )
    parser.add_argument(
        "--ray",
        type=int,
        default=0,
        metavar="N",
        help="also collate the first configuration on a local Ray cluster of N workers",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model)
    assert model.tokenizer is not None
    layers = parse_layers(args.layers, model.cfg.n_layers)
    start = time.perf_counter()
    windows = tokenize(load_corpus(args.corpus), model.tokenizer, args.window_length)
    tokenize_rate = windows.n_tokens / (time.perf_counter() - start)
    n_windows = min(len(windows), args.tokens // args.window_length)
    n_tokens = n_windows * args.window_length
    batches = [tokens for _, tokens in windows.batches(args.batch_size, 0, n_windows)]
    print(
        f"model {model.cfg.name} ({model.device}, {model.dtype}); corpus {windows.corpus_name} "
        f"({windows.n_tokens:,} tokens in {len(windows):,} windows of {args.window_length}); "
        f"{n_tokens:,} tokens timed in {len(batches)} batches of {args.batch_size}; "
        f"layers {args.layers}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs; load average {_load()}"
    )

    def forward() -> None:
        with torch.no_grad():
            for tokens in batches:
                model(tokens.to(model.device))
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    configs = [[f.strip() for f in c.split(",") if f.strip()] for c in args.families]
    with tempfile.TemporaryDirectory(prefix="bench-collate-") as tmp:
        folder = Path(tmp)

        def run(path: Path, budget: int, families: list[str]) -> int:
            """One collation into a fresh store; returns the store's size in bytes."""
            collate(
                model,
                windows,
                path,
                n_tokens=budget,
                layers=layers,
                families=families,
                batch_size=args.batch_size,
                window_length=args.window_length,
                progress=False,
            )
            size = path.stat().st_size
            path.unlink()
            return size

        # Warm-up: one batch of each.
        with torch.no_grad():
            model(batches[0].to(model.device))
        for families in configs:
            run(folder / "warmup.sqlite", args.batch_size * args.window_length, families)

        # Repeats alternate the forward and the collations, so that a burst of load from other
        # processes does not fall on one side only; the best time of each is kept.
        forward_times: list[float] = []
        collate_times: list[list[float]] = [[] for _ in configs]
        sizes = [0] * len(configs)
        for _ in range(args.repeats):
            forward_times.append(_seconds(forward))
            for i, families in enumerate(configs):
                start = time.perf_counter()
                sizes[i] = run(folder / "store.sqlite", n_tokens, families)
                collate_times[i].append(time.perf_counter() - start)

        forward_s = min(forward_times)
        forward_rate = n_tokens / forward_s
        print(
            f"\n{'':40} {'seconds':>8} {'tokens/s':>9} {'ratio':>6} {'store MiB':>10} "
            f"{'MiB/Mtok':>9}"
        )
        print(f"{'bare forward (full, with logits)':40} {forward_s:>8.2f} {forward_rate:>9.0f}")
        for families, times, size in zip(configs, collate_times, sizes, strict=True):
            seconds = min(times)
            rate = n_tokens / seconds
            mib = size / 2**20
            print(
                f"{'collate ' + '+'.join(families):40} {seconds:>8.2f} {rate:>9.0f} "
                f"{rate / forward_rate:>6.2f} {mib:>10.1f} {mib * 1e6 / n_tokens:>9.1f}"
            )
        if args.repeats > 1:
            spread = [forward_times, *collate_times]
            print("all times (s): " + "; ".join(" ".join(f"{t:.1f}" for t in ts) for ts in spread))

        if args.ray:
            tokenizing = (windows.n_tokens, tokenize_rate)
            ray_comparison(
                args, model.device.type, n_tokens, configs[0], min(collate_times[0]), tokenizing
            )

        if args.profile:  # extra, untimed runs
            for families in configs:
                profiler = cProfile.Profile()
                profiler.runcall(run, folder / "profiled.sqlite", n_tokens, families)
                print(f"\n-- profile of collate {'+'.join(families)}, top {args.profile} --")
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
                pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    print(f"\nload average at the end {_load()} (other processes on the machine skew the figures)")


def ray_comparison(
    args: argparse.Namespace,
    device: str,
    n_tokens: int,
    families: list[str],
    single_seconds: float,
    tokenizing: tuple[int, float],
) -> None:
    """The same collation on a new local Ray cluster of `args.ray` CPU slots, one shard each
    (module doc), against the single-process one (`single_seconds`). `tokenizing`: the corpus's
    tokens and the rate it was tokenized at (each task tokenizes the whole corpus)."""
    import ray

    from neuron_explainer.datasets.distributed import (
        ShardJob,
        TaskResources,
        collate_on_ray,
        shard_paths,
    )
    from neuron_explainer.datasets.latents import merge_shards

    n = args.ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    start = time.perf_counter()
    ray.init(
        num_cpus=n,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        logging_level=logging.WARNING,
    )
    cluster_seconds = time.perf_counter() - start
    corpus = args.corpus if args.corpus == "default" else str(Path(args.corpus).resolve())
    job = ShardJob(
        model=args.model,
        corpus=corpus,
        layers=args.layers,
        device=device,
        threads=1,
        settings=dict(
            n_tokens=n_tokens,
            families=families,
            batch_size=args.batch_size,
            window_length=args.window_length,
        ),
    )
    resources = TaskResources(device, 1, 1 if device == "cuda" else 0)
    with tempfile.TemporaryDirectory(prefix="bench-collate-ray-") as tmp:
        out = Path(tmp) / "ray.sqlite"
        run = collate_on_ray(job, out, n, resources, keep_shards=True, progress=False)
        merged_bytes = out.stat().st_size
        paths = shard_paths(out, n)
        start = time.perf_counter()
        merge_shards(paths[:1], Path(tmp) / "one.sqlite")
        merge_one = time.perf_counter() - start
        metas = [stored_metadata(p) for p in paths]
    ray.shutdown()

    single_rate = n_tokens / single_seconds
    ray_rate = n_tokens / run.seconds
    print(
        f"\n-- Ray: a local cluster of {n} CPU slots ({os.cpu_count()} cores here), {n} shards, "
        f"1 torch thread per task; families {'+'.join(families)} --"
    )
    print(f"cluster start (ray.init): {cluster_seconds:.1f}s (not counted below)")
    print(f"{'':44} {'seconds':>8} {'tokens/s':>9} {'ratio':>6}")
    print(f"{'single process (collate, above)':44} {single_seconds:>8.1f} {single_rate:>9.0f}")
    print(
        f"{'Ray, submission to merged store':44} {run.seconds:>8.1f} {ray_rate:>9.0f} "
        f"{ray_rate / single_rate:>6.2f}"
    )
    print(
        f"\n{'shard':>5} {'tokens':>8} {'latency s':>9} {'set-up s':>8} {'collate s':>9} "
        f"{'calib. windows':>14} {'store MiB':>9}"
    )
    for shard, meta in zip(run.shards, metas, strict=True):
        if shard is None or meta is None:
            continue
        [[first, _]] = meta.window_ranges
        calibrated = 0 if first == 0 else calibration_windows(meta.n_windows_total, args)
        print(
            f"{shard.shard:>5} {shard.n_tokens:>8,} {shard.started_at - run.submitted_at:>9.1f} "
            f"{shard.setup_seconds:>8.1f} {shard.seconds - shard.setup_seconds:>9.1f} "
            f"{calibrated:>14} {shard.bytes / 2**20:>9.1f}"
        )
    # Two points, each with the noise of a shared machine: neither part below 0.
    per_shard = max(0.0, (run.merge_seconds - merge_one) / (n - 1)) if n > 1 else merge_one
    fixed = max(0.0, merge_one - per_shard)
    through_ray = len(pickle.dumps(run.shards))
    print(
        f"\nmerge: {run.merge_seconds:.1f}s for {n} shards, {merge_one:.1f}s for shard 0 alone: "
        f"~{fixed:.1f}s + {per_shard:.1f}s per shard"
    )
    print(
        f"bytes moved: {run.shard_bytes / 2**20:,.1f} MiB of shard stores (written by the tasks, "
        f"read by the merge), {merged_bytes / 2**20:,.1f} MiB merged store written; through "
        f"Ray's object store only the results, {through_ray:,} bytes"
    )
    corpus_tokens, tokenize_rate = tokenizing
    latency = max(s.started_at - run.submitted_at for s in run.shards if s is not None)
    setup = max(s.setup_seconds for s in run.shards if s is not None)
    model_load = max(0.0, setup - corpus_tokens / tokenize_rate)
    print(
        f"\nprojection for K machines, each collating one shard at the single-process rate "
        f"({single_rate:,.0f} tok/s), the shard stores on a shared filesystem as fast as this "
        f"disk: T(K) = {latency:.1f}s start + {model_load:.1f}s loading the model + tokenizing "
        f"the corpus (at least the budget) at {tokenize_rate:,.0f} tok/s + (tokens/K + the "
        f"calibration windows if K > 1, at most 256 x {args.window_length} tokens) / rate + "
        f"merge {fixed:.1f}s + {per_shard:.1f}s x K"
    )
    budgets = [n_tokens, 100_000_000]
    print(f"{'K':>4} " + " ".join(f"{f'{b:,} tokens':>30}" for b in budgets))
    for k in (1, 2, 4, 8, 16, 32, 64):
        cells = []
        for budget in budgets:
            tokenize = max(budget, corpus_tokens) / tokenize_rate
            calibration = calibration_windows(budget // args.window_length, args) if k > 1 else 0
            work = (budget / k + calibration * args.window_length) / single_rate
            total = latency + model_load + tokenize + work + fixed + per_shard * k
            speedup = (budget / single_rate) / total
            cells.append(f"{_hours(total):>10} {budget / total:>9,.0f} tok/s {speedup:>5.1f}x")
        print(f"{k:>4} " + " ".join(f"{c:>30}" for c in cells))


def calibration_windows(n_windows: int, args: argparse.Namespace) -> int:
    """The windows a shard that does not start at window 0 runs first (collate.py: the
    quantile calibration windows at collate's default of 256, in whole batches)."""
    windows = max(1, min(256, n_windows // 4))
    return math.ceil(windows / args.batch_size) * args.batch_size


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
