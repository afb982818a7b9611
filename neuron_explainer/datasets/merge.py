"""Merging shard stores: `merge_stores(inputs, out)` folds complete stores of one collation run in
shards (`collate(..., shard=(i, n))`: same settings, disjoint window ranges) into one store.

The merge is exact: top-k and samples are re-selected from the union by the same keys (scores
with the window index as tie-break; hashes of window indices), and moments are merged pairwise, so
the result is the store one run over the union of the windows writes (up to floating-point rounding
of the moments when the inputs are not in window order).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from neuron_explainer.datasets.records import DatasetError
from neuron_explainer.datasets.store import (
    SAME_RUN_FIELDS,
    DatasetMetadata,
    connect,
    read_metadata,
    utc_now,
)
from neuron_explainer.datasets.store_writer import StoreWriter, load_accumulator


def merge_stores(inputs: Sequence[str | Path], out_path: str | Path) -> DatasetMetadata:
    """Fold complete shard stores (same settings, disjoint window ranges) into a new store.

    The result equals a single run over the union of their windows: top-k and samples are
    re-selected from the union by the same keys, moments merged pairwise, in input order.
    """
    if len(inputs) < 1:
        raise ValueError("merge_stores needs at least one input store")
    out_path = Path(out_path)
    if out_path.exists():
        raise DatasetError(f"{out_path} already exists; merge into a new file")
    metas: list[DatasetMetadata] = []
    conns = [connect(p, readonly=True) for p in inputs]
    try:
        for path, conn in zip(inputs, conns, strict=True):
            meta = read_metadata(conn, str(path))
            if meta.status != "complete":
                raise DatasetError(
                    f"{path} is not complete (status {meta.status}); finish it first"
                )
            if metas:
                metas[0].check_same(meta, SAME_RUN_FIELDS, f"{inputs[0]} and {path} have")
            metas.append(meta)
        ranges = sorted(r for m in metas for r in m.window_ranges)
        for (_, a_end), (b_start, _) in itertools.pairwise(ranges):
            if b_start < a_end:
                raise DatasetError(f"the inputs' window ranges overlap: {ranges}")
        merged_ranges: list[list[int]] = []
        for a, b in ranges:
            if merged_ranges and merged_ranges[-1][1] == a:
                merged_ranges[-1][1] = b
            else:
                merged_ranges.append([a, b])

        window_tokens: dict[int, np.ndarray] = {}
        vocabulary: dict[int, str] = {}
        for meta, conn in zip(metas, conns, strict=True):
            for w, blob in conn.execute("SELECT window_index, tokens FROM windows"):
                window_tokens[int(w)] = np.frombuffer(
                    blob, dtype=np.dtype(meta.token_dtype).newbyteorder("<")
                )
            vocabulary.update(conn.execute("SELECT token_id, token FROM vocabulary"))
        out = replace(
            metas[0],
            window_ranges=merged_ranges,
            n_tokens=sum(m.n_tokens for m in metas),
            shard=None,
            status="complete",
            next_window=merged_ranges[-1][1],
            merged_from=[str(p) for p in inputs],
            created_at=utc_now(),
            updated_at=utc_now(),
        )
        writer = StoreWriter(out_path)
        try:
            for family in out.families:
                for layer in out.layers:
                    n = (
                        conns[0]
                        .execute(
                            "SELECT count(*) FROM components WHERE family = ? AND layer = ?",
                            (family, layer),
                        )
                        .fetchone()[0]
                    )
                    merged = load_accumulator(conns[0], metas[0], family, layer, n)
                    for meta, conn in zip(metas[1:], conns[1:], strict=True):
                        merged.merge(load_accumulator(conn, meta, family, layer, n))
                    merged.dirty.fill_(True)
                    writer.commit(out, [merged], window_tokens, vocabulary.__getitem__)
            writer.finish()
        finally:
            writer.close()
        return out
    finally:
        for conn in conns:
            conn.close()
