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

Local LLM (`--explainer local`): the LLM explainer and all-at-once simulator on the default model
(float32, greedy, the excerpt limits of `tdb explain --explainer local`), on `--sample` neurons
drawn as above. The control is again another sampled neuron's explanation: the sample is put in a
random order and cut into `--workers` blocks (processes, `--threads` torch threads each; 1 thread
per process is much faster than 2 on a shared 2-core machine), and within a block each neuron gets
the explanation of the one before it (the first, that of the last), a random derangement whose
controls are ready as soon as the neuron itself is done. When a neuron's control explanation is the
very same text as its own, the control score is its own score (the same prompts, not rerun).
Each neuron's explanation, scores and seconds go to `--results` (JSON lines, appended and flushed
one by one), so a rerun of the same command resumes where an interrupted one stopped, and
`--report` prints the figures of whatever is done, during a run too. Speed: seconds per neuron
explained and scored (the explanation prompt and the neuron's own simulation, what `tdb explain`
does per node), and the run's wall-clock neurons/min with the controls and all workers.

    python bench/explain.py                          # speed over all 46,080 neurons, quality on 200
    python bench/explain.py --skip-speed --sample 500
    python bench/explain.py --explainer local --results local.jsonl          # 200 neurons, resumable
    python bench/explain.py --explainer local --results local.jsonl --report # figures so far
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

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


def report_pair(
    name: str, own: list[float | None], control: list[float | None], rng: np.random.Generator
) -> None:
    """Mean and median of both (undefined scores counted as 0) and the paired difference."""
    own_a = np.array([a or 0.0 for a in own])
    control_a = np.array([b or 0.0 for b in control])
    groups: list[tuple[str, np.ndarray, list[float | None]]] = [
        (name, own_a, own),
        ("control", control_a, control),
    ]
    for label, values, raw in groups:
        undefined = sum(v is None for v in raw)
        print(
            f"  {label:9} mean {values.mean():.3f}  median {statistics.median(values.tolist()):.3f}"
            f"  (undefined, counted 0: {undefined})"
        )
    if len(own_a) < 2:
        return
    lo, hi, blo, bhi = interval(own_a - control_a, rng)
    print(
        f"  {name} - control: mean {own_a.mean() - control_a.mean():+.3f}, 95 % interval "
        f"[{lo:+.3f}, {hi:+.3f}] (bootstrap [{blo:+.3f}, {bhi:+.3f}]); {name} better on "
        f"{int((own_a > control_a).sum())}/{len(own_a)}, equal on "
        f"{int((own_a == control_a).sum())}"
    )


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
    own: list[float | None] = []
    control: list[float | None] = []
    for i, (r, sp) in enumerate(zip(records, splits, strict=True)):
        own.append(score_explanation(r, texts[i], simulator, sp.score).scores.ev_correlation_score)
        control.append(
            score_explanation(r, texts[perm[i]], simulator, sp.score).scores.ev_correlation_score
        )
    layers = sorted({node[1] for node in nodes})
    print(
        f"quality: {len(nodes)} random {family} components (layers {layers[0]}-{layers[-1]}, "
        f"{len(layers)} layers), seed {seed}, ev_correlation_score on held-out excerpts"
    )
    report_pair("baseline", own, control, rng)


# ---- the local LLM explainer ------------------------------------------------------------------


def local_blocks(store: Path, family: str, n: int, seed: int, workers: int) -> list[list[Any]]:
    """The sample in a random order, cut into `workers` blocks of at least 2 neurons."""
    with DatasetStore(store) as ds:
        nodes = sample_components(ds.components(family), n, seed=seed)
    order = np.random.default_rng(seed).permutation(len(nodes))
    blocks = [[list(nodes[i]) for i in part] for part in np.array_split(order, workers)]
    if any(len(b) < 2 for b in blocks):
        raise SystemExit("each worker needs at least 2 neurons (a control from another one)")
    return blocks


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: that work is redone
            continue
    return lines


def append(path: Path, row: dict[str, Any]) -> None:
    """One line, in one write to a file opened for appending (whole lines from every worker)."""
    data = (json.dumps(row) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def local_worker(
    store: str, results: str, block: list[list[Any]], model_name: str, threads: int, session: float
) -> None:
    import torch

    from neuron_explainer.explanations import ExplanationError
    from neuron_explainer.explanations.llm import (
        LLM_LIMITS,
        AllAtOnceSimulator,
        LLMExplainer,
        LocalBackend,
    )
    from neuron_explainer.models.loading import load_model

    torch.set_num_threads(threads)
    path = Path(results)
    done = read_results(path)
    texts = {tuple(r["node"]): r for r in done if r.get("kind") == "own"}
    controls = {tuple(r["node"]) for r in done if r.get("kind") == "control"}
    nodes = [tuple(n) for n in block]
    if all(n in texts and n in controls for n in nodes):
        return
    backend = LocalBackend(load_model(model_name, device="cpu"))
    explainer, simulator = LLMExplainer(backend), AllAtOnceSimulator(backend)

    def record(node: tuple[Any, ...]) -> Any:
        with DatasetStore(store) as ds:
            return ds.record(*node)

    def own(node: tuple[Any, ...]) -> None:
        r = record(node)
        split = LLM_LIMITS.split(r)
        t0 = time.perf_counter()
        row: dict[str, Any] = {"kind": "own", "node": list(node)}
        try:
            text = explainer.explain(r, split.explain)
        except ExplanationError as e:
            row |= {"explanation": None, "error": str(e), "score": None}
            text = None
        t1 = time.perf_counter()
        if text is not None:
            scored = score_explanation(r, text, simulator, split.score)
            row |= {"explanation": text, "score": scored.scores.ev_correlation_score}
        row |= {
            "explain_s": t1 - t0,
            "score_s": time.perf_counter() - t1,
            "t": time.time(),
            "session": session,
            "load": os.getloadavg()[0],
        }
        append(path, row)
        texts[node] = row

    def control(node: tuple[Any, ...], source: tuple[Any, ...]) -> None:
        text, mine = texts[source]["explanation"], texts[node]
        row: dict[str, Any] = {"kind": "control", "node": list(node), "source": list(source)}
        t0 = time.perf_counter()
        if text is None:  # the other neuron has no explanation: it predicts nothing
            row |= {"score": None, "how": "no explanation"}
        elif text == mine["explanation"]:
            row |= {"score": mine["score"], "how": "same text as its own"}
        else:
            r = record(node)
            scored = score_explanation(r, text, simulator, LLM_LIMITS.split(r).score)
            row |= {"score": scored.scores.ev_correlation_score, "how": "simulated"}
        row |= {"control_s": time.perf_counter() - t0, "t": time.time(), "session": session}
        row["load"] = os.getloadavg()[0]
        append(path, row)
        controls.add(node)

    for k, node in enumerate(nodes):
        if node not in texts:
            own(node)
        if k > 0 and node not in controls:
            control(node, nodes[k - 1])
    if nodes[0] not in controls:
        control(nodes[0], nodes[-1])


def local_report(path: Path, seed: int) -> None:
    rows = read_results(path)
    header = next((r for r in rows if r.get("kind") == "header"), None)
    own = {tuple(r["node"]): r for r in rows if r.get("kind") == "own"}
    control = {tuple(r["node"]): r for r in rows if r.get("kind") == "control"}
    both = sorted(n for n in own if n in control)
    if header is None or not own:
        print(f"{path}: no results yet")
        return
    total = header["sample"]
    layers = sorted({n[1] for n in both}) or [0]
    print(
        f"quality (local LLM {header['model']}, float32, greedy): {len(both)} of {total} random "
        f"{header['family']} components done with their control (layers {layers[0]}-"
        f"{layers[-1]}, {len(layers)} layers), seed {header['seed']}, ev_correlation_score on "
        "held-out excerpts"
    )
    if both:
        report_pair(
            "local",
            [own[n]["score"] for n in both],
            [control[n]["score"] for n in both],
            np.random.default_rng(seed),
        )
    failed = [n for n in own if own[n].get("error")]
    texts = [own[n]["explanation"] for n in own if own[n]["explanation"] is not None]
    common = statistics.mode(texts) if texts else ""
    print(
        f"  explanations: {len(own)} written, {len(failed)} failed, {len(set(texts))} distinct; "
        f"most common {common!r} ({texts.count(common)}x)"
    )
    how = [control[n]["how"] for n in both]
    print(
        "  controls: "
        + ", ".join(f"{h} {how.count(h)}" for h in ("simulated", "same text as its own"))
    )
    per = [own[n]["explain_s"] + own[n]["score_s"] for n in own]
    explain_s = [own[n]["explain_s"] for n in own]
    sim_s = [own[n]["score_s"] for n in own if own[n]["explanation"] is not None]
    print(
        f"speed: {len(own)} neurons explained and scored (local, {header['threads']} torch "
        f"thread(s) per process, {header['workers']} processes): {statistics.mean(per):.1f} s "
        f"per neuron on average, median {statistics.median(per):.1f} s (explanation "
        f"{statistics.mean(explain_s):.1f} s, simulation of 10 excerpts "
        f"{statistics.mean(sim_s) if sim_s else 0:.1f} s) -> {60 / statistics.mean(per):.2f} "
        "neurons/min per process"
    )
    sessions: dict[float, list[float]] = {}
    for r in rows:
        if "session" in r and "t" in r:
            sessions.setdefault(r["session"], []).append(r["t"])
    wall = sum(max(ts) - s for s, ts in sessions.items())
    loads = [r["load"] for r in rows if "load" in r]
    print(
        f"  wall clock {wall / 60:.1f} min in {len(sessions)} session(s): "
        f"{len(own) / (wall / 60):.2f} neurons/min with their controls, all processes together; "
        f"1-min load average while running: median {statistics.median(loads):.1f}, range "
        f"{min(loads):.1f}-{max(loads):.1f}"
    )


def local_quality(args: argparse.Namespace) -> None:
    from neuron_explainer.models.registry import DEFAULT_MODEL

    path: Path = args.results
    settings = {
        "kind": "header",
        "store": str(args.store),
        "family": args.family,
        "sample": args.sample,
        "seed": args.seed,
        "workers": args.workers,
        "threads": args.threads,
        "model": DEFAULT_MODEL,
    }
    if path.is_file() and not path.read_bytes().endswith(b"\n"):  # a line cut short by a kill
        append(path, {"kind": "cut"})
    header = next((r for r in read_results(path) if r.get("kind") == "header"), None)
    if header is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        append(path, settings)
    elif header != settings:
        raise SystemExit(f"{path} holds a run with other settings: {header}")
    blocks = local_blocks(args.store, args.family, args.sample, args.seed, args.workers)
    session = time.time()
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=local_worker,
            args=(str(args.store), str(path), b, DEFAULT_MODEL, args.threads, session),
        )
        for b in blocks
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"a worker failed: exit codes {[p.exitcode for p in procs]}")
    local_report(path, args.seed)


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
    parser.add_argument("--explainer", choices=["baseline", "local"], default="baseline")
    parser.add_argument(
        "--results", type=Path, default=None, help="local: the JSON-lines file (resumable)"
    )
    parser.add_argument("--workers", type=int, default=2, help="local: processes")
    parser.add_argument("--threads", type=int, default=1, help="local: torch threads each")
    parser.add_argument(
        "--report", action="store_true", help="local: print the figures of --results and exit"
    )
    args = parser.parse_args()
    if args.explainer == "local":
        if args.results is None:
            parser.error("--explainer local needs --results FILE")
        if args.report:
            local_report(args.results, args.seed)
            return
    if not args.store.is_file():
        parser.error(
            f"no store at {args.store}: build it with `tdb collate --tokens 65536 --out ...`"
        )
    if args.explainer == "local":
        local_quality(args)
        return
    if not args.skip_quality:
        quality(args.store, args.family, args.sample, args.seed)
    if not args.skip_speed:
        speed(args.store, args.family)


if __name__ == "__main__":
    main()
