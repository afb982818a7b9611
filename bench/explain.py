"""Explanations of the default store: speed of `tdb explain` and quality against a control.

Speed. The baseline explainer and simulator over every MLP neuron of a store (default: the demo's
store, `~/.cache/tdb/datasets/smollm2-135m.default.65536.sqlite`, built by `make demo` or `tdb
collate --tokens 65536`), into a copy of the store in a temporary folder, exactly as `tdb explain
--families mlp_neuron` runs it (reading records, explaining, scoring, committing). The baseline of
the ratio is reading the same records alone (`DatasetStore.record`), timed on a sample in the same
run: explaining costs (ratio - 1) x reading.

Quality. `--sample` randomly drawn MLP neurons (all layers; `sample_components`, seed `--seed`):
each one's `ev_correlation_score` on its held-out excerpts, and that of a *control*, the
explanation of a different sampled neuron (a fixed random derangement) scored on this neuron's
held-out excerpts by the same simulator. A score that is undefined (the simulation is constant on
the scored excerpts: the explanation's tokens do not occur there) counts as 0, since such a
simulation explains nothing; how many were undefined is printed. The difference own - control is
paired, per neuron: its mean with a 95 % interval (normal approximation, and a percentile
bootstrap of 10,000 resamples as a check).

    python bench/explain.py                          # speed over all 46,080 neurons, quality on 200
    python bench/explain.py --skip-speed --sample 500
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from neuron_explainer.datasets import DatasetStore
from neuron_explainer.explanations import (
    BASELINE_METHOD,
    BaselineExplainer,
    BaselineSimulator,
    explain_store,
    sample_components,
    score_explanation,
    split_excerpts,
)

DEFAULT_STORE = Path.home() / ".cache/tdb/datasets/smollm2-135m.default.65536.sqlite"


def speed(store: Path, family: str) -> None:
    with DatasetStore(store) as ds:
        nodes = ds.components(family)
        sample = sample_components(nodes, 2000, seed=1)
        t = time.perf_counter()
        for node in sample:
            ds.record(*node)
        read_s = (time.perf_counter() - t) / len(sample)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / store.name
        shutil.copy(store, copy)
        summary = explain_store(
            copy,
            BaselineExplainer(),
            BaselineSimulator(),
            BASELINE_METHOD,
            families=[family],
            progress=False,
        )
    per_node = summary.seconds / summary.total
    print(f"speed: {summary.total:,} {family} components explained and scored (baseline)")
    print(
        f"  {summary.seconds:.1f} s in all, {60 / per_node:,.0f} nodes/min "
        f"({1e3 * per_node:.2f} ms per node; {summary.failed} failed)"
    )
    print(
        f"  reading a record alone: {1e3 * read_s:.2f} ms -> explain+score+write / read = "
        f"{per_node / read_s:.2f}"
    )


def interval(diffs: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """(normal low, high, bootstrap low, high) of the mean of `diffs`, 95 %."""
    mean, se = diffs.mean(), diffs.std(ddof=1) / math.sqrt(len(diffs))
    boot = rng.choice(diffs, size=(10_000, len(diffs)), replace=True).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return mean - 1.96 * se, mean + 1.96 * se, float(lo), float(hi)


def quality(store: Path, family: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    explainer, simulator = BaselineExplainer(), BaselineSimulator()
    with DatasetStore(store) as ds:
        nodes = sample_components(ds.components(family), n, seed=seed)
        records = [ds.record(*node) for node in nodes]
    splits = [split_excerpts(r) for r in records]
    texts = [explainer.explain(r, sp.explain) for r, sp in zip(records, splits, strict=True)]
    # A derangement: every neuron gets another neuron's explanation as its control.
    perm = rng.permutation(len(nodes))
    while np.any(perm == np.arange(len(nodes))):
        perm = rng.permutation(len(nodes))
    own, control, undefined_own, undefined_control = [], [], 0, 0
    for i, (r, sp) in enumerate(zip(records, splits, strict=True)):
        a = score_explanation(r, texts[i], simulator, sp.score).scores.ev_correlation_score
        b = score_explanation(r, texts[perm[i]], simulator, sp.score).scores.ev_correlation_score
        undefined_own += a is None
        undefined_control += b is None
        own.append(a or 0.0)
        control.append(b or 0.0)
    own_a, control_a = np.array(own), np.array(control)
    lo, hi, blo, bhi = interval(own_a - control_a, rng)
    layers = sorted({node[1] for node in nodes})
    print(
        f"quality: {len(nodes)} random {family} components (layers {layers[0]}-{layers[-1]}, "
        f"{len(layers)} layers), seed {seed}, ev_correlation_score on held-out excerpts"
    )
    for name, a, und in (
        ("baseline", own_a, undefined_own),
        ("control", control_a, undefined_control),
    ):
        print(
            f"  {name:9} mean {a.mean():.3f}  median {statistics.median(a.tolist()):.3f}  "
            f"(undefined, counted 0: {und})"
        )
    print(
        f"  baseline - control: mean {own_a.mean() - control_a.mean():+.3f}, 95 % interval "
        f"[{lo:+.3f}, {hi:+.3f}] (bootstrap [{blo:+.3f}, {bhi:+.3f}]); baseline better on "
        f"{int((own_a > control_a).sum())}/{len(nodes)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--family", default="mlp_neuron")
    parser.add_argument("--sample", type=int, default=200, help="components for quality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    if not args.store.is_file():
        parser.error(
            f"no store at {args.store}: build it with `tdb collate --tokens 65536 --out ...`"
        )
    if not args.skip_quality:
        quality(args.store, args.family, args.sample, args.seed)
    if not args.skip_speed:
        speed(args.store, args.family)


if __name__ == "__main__":
    main()
