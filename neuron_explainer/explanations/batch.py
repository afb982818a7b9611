"""Explain and score many components of a store (`tdb explain`): resumable, with progress.

Components are done in chunks; each chunk's rows are one transaction, so a run killed at any
moment (SIGKILL included) leaves whole chunks only, and a rerun with the same method skips every
component that has a row and does the rest. Explainers and simulators are deterministic (the
baseline; LLMs at temperature 0), so the final table is the same as that of one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from neuron_explainer.datasets.store import DatasetStore, connect
from neuron_explainer.explanations.methods import (
    ALL_EXCERPTS,
    ExcerptLimits,
    Explainer,
    ExplanationError,
    Method,
    Simulator,
    explain_and_score,
)
from neuron_explainer.explanations.scoring import Scores
from neuron_explainer.explanations.store import (
    ExplanationWriter,
    Node,
    StoredExplanation,
    has_explanations,
)
from neuron_explainer.progress import Progress, ProgressCallback


@dataclass(frozen=True)
class BatchSummary:
    total: int  # components selected
    skipped: int  # had a row already (a resumed run)
    explained: int
    failed: int
    seconds: float


def unexplained(path: str | Path, method: Method) -> int:
    """How many components of a store have no row (succeeded or failed) for `method`: what a
    `tdb explain` with it would still do. Read-only, one query."""
    conn = connect(path, readonly=True)
    try:
        (total,) = conn.execute("SELECT COUNT(*) FROM components").fetchone()
        if not has_explanations(conn):
            return int(total)
        (done,) = conn.execute(
            "SELECT COUNT(*) FROM explanations e JOIN explanation_methods m USING (method_id) "
            "JOIN components c ON c.family = e.family AND c.layer = e.layer AND c.idx = e.idx "
            "WHERE m.explainer = ? AND m.simulator = ? AND m.model = ? AND m.prompt_version = ?",
            (method.explainer, method.simulator, method.model, method.prompt_version),
        ).fetchone()
        return int(total) - int(done)
    finally:
        conn.close()


def sample_components(nodes: Sequence[Node], limit: int | None, seed: int = 0) -> list[Node]:
    """`limit` components drawn uniformly without replacement (those with the smallest hash of
    (seed, family, layer, index): the same sample on every run, and a larger limit includes a
    smaller one), in store order; all of them when `limit` is None."""
    if limit is None or limit >= len(nodes):
        return sorted(nodes)

    def key(node: Node) -> bytes:
        return hashlib.blake2b(
            f"{seed}/{node[0]}/{node[1]}/{node[2]}".encode(), digest_size=8
        ).digest()

    return sorted(sorted(nodes, key=key)[:limit])


def select_components(
    store: DatasetStore,
    families: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    limit: int | None = None,
) -> list[Node]:
    """The components of `families` and `layers` (default all), a sample of `limit` of them
    (`sample_components`): what a batch explains."""
    nodes = [
        n
        for n in store.components()
        if (families is None or n[0] in families) and (layers is None or n[1] in layers)
    ]
    return sample_components(nodes, limit)


def explain_one(
    store: DatasetStore,
    node: Node,
    explainer: Explainer,
    simulator: Simulator,
    method: Method,
    limits: ExcerptLimits,
) -> StoredExplanation:
    """One component's row: its explanation and scores, or the reason it failed."""
    family, layer, index = node
    record = store.record(family, layer, index)
    try:
        scored = explain_and_score(record, explainer, simulator, limits)
    except ExplanationError as e:
        return StoredExplanation(
            family, layer, index, method, None, Scores(None, None, None), 0, str(e) or repr(e)
        )
    return StoredExplanation(
        family, layer, index, method, scored.explanation, scored.scores, len(scored.scored)
    )


def explain_store(
    path: str | Path,
    explainer: Explainer,
    simulator: Simulator,
    method: Method,
    limits: ExcerptLimits = ALL_EXCERPTS,
    families: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    limit: int | None = None,
    chunk: int = 256,
    workers: int = 1,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
    on_progress: ProgressCallback | None = None,
) -> BatchSummary:
    """Explain and score the components of the store at `path` (of `families` and `layers`, a
        sample of `limit` of them) with one method, writing a row per component into the store.
        `workers` components of a chunk are done at once (threads: for methods that wait on a remote
        model). `on_chunk(done)` is called after each committed chunk, `on_progress(done, total, rate)`
    with the progress counts (components; skipped ones count as done). A BackendUnreachableError
        stops the run; the chunks committed before it stay (whole), and a rerun goes on from there."""
    import time

    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(DatasetStore(path))
        selected = select_components(store, families, layers, limit)
        writer = stack.enter_context(ExplanationWriter(path))
        method_id = writer.method_id(method)
        done = writer.done(method_id)
        todo = [n for n in selected if n not in done]
        bar = node_progress(len(selected), len(selected) - len(todo), progress, on_progress)
        explained = failed = 0
        pool = ThreadPoolExecutor(workers) if workers > 1 else None
        if pool is not None:
            stack.callback(pool.shutdown, cancel_futures=True)

        def one(node: Node) -> StoredExplanation:
            return explain_one(store, node, explainer, simulator, method, limits)

        for c in range(0, len(todo), chunk):
            part = todo[c : c + chunk]
            rows = list(pool.map(one, part)) if pool else [one(node) for node in part]
            writer.write(method_id, rows)
            explained += sum(not r.failed for r in rows)
            failed += sum(r.failed for r in rows)
            bar.update(len(selected) - len(todo) + c + len(rows))
            if on_chunk is not None:
                on_chunk(c + len(rows))
        bar.finish()
    return BatchSummary(
        len(selected), len(selected) - len(todo), explained, failed, time.monotonic() - start
    )


def node_progress(
    total: int, done: int, enabled: bool, callback: ProgressCallback | None
) -> Progress:
    """The progress line of an explanation run (nodes, nodes/s), `done` already counted."""
    bar = Progress(
        "explain",
        total=total,
        done=done,
        enabled=enabled,
        unit="nodes",
        rate_unit="nodes/s",
        callback=callback,
    )
    bar.update(done)
    return bar
