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

    python bench/collate.py                                    # all layers, both families
    python bench/collate.py --families mlp_neuron,attention_head mlp_neuron attention_head
    python bench/collate.py --tokens 4096 --layers 0-3 --profile 25
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from neuron_explainer.datasets.collate import DEFAULT_FAMILIES, collate, parse_layers
from neuron_explainer.datasets.corpus import DEFAULT_WINDOW_LENGTH, load_corpus, tokenize
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model)
    assert model.tokenizer is not None
    layers = parse_layers(args.layers, model.cfg.n_layers)
    windows = tokenize(load_corpus(args.corpus), model.tokenizer, args.window_length)
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

        if args.profile:  # extra, untimed runs
            for families in configs:
                profiler = cProfile.Profile()
                profiler.runcall(run, folder / "profiled.sqlite", n_tokens, families)
                print(f"\n-- profile of collate {'+'.join(families)}, top {args.profile} --")
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
                pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    print(f"\nload average at the end {_load()} (other processes on the machine skew the figures)")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
