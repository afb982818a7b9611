"""Test helpers: comparing stores, torch thread counts."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from neuron_explainer.explanations import (
    BASELINE_METHOD,
    BaselineExplainer,
    BaselineSimulator,
    explain_store,
)


def table_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the store's data tables, in key order (metadata minus timestamps)."""
    conn = sqlite3.connect(path)
    try:
        out = {
            "components": conn.execute("SELECT * FROM components ORDER BY 1, 2, 3").fetchall(),
            "samples": conn.execute("SELECT * FROM samples ORDER BY 1, 2, 3").fetchall(),
            "windows": conn.execute("SELECT * FROM windows ORDER BY 1").fetchall(),
            "vocabulary": conn.execute("SELECT * FROM vocabulary ORDER BY 1").fetchall(),
        }
        out["metadata"] = [
            row
            for row in conn.execute("SELECT * FROM metadata ORDER BY 1").fetchall()
            if row[0] not in ("createdAt", "updatedAt")
        ]
        return out
    finally:
        conn.close()


def assert_same_dataset(single: Path, merged: Path) -> None:
    """`merged` (shard stores merged) holds the dataset the single run `single` wrote: the same
    samples, windows, tokens and metadata (but the merge's provenance), byte for byte; the same
    statistics, the moments (mean, variance, ...) to float64 rounding, as they are summed in
    another order."""
    a, b = table_rows(single), table_rows(merged)
    assert a["samples"] == b["samples"]
    assert a["windows"] == b["windows"]
    assert a["vocabulary"] == b["vocabulary"]
    assert len(a["components"]) == len(b["components"])
    for row_a, row_b in zip(a["components"], b["components"], strict=True):
        assert row_a[:4] == row_b[:4]  # family, layer, index, max activation
        assert row_a[10] == row_b[10] and row_a[14] == row_b[14]  # counts
        assert row_a[15] == row_b[15]  # quantile boundaries
        assert row_a[4:8] == pytest.approx(row_b[4:8], rel=1e-9, nan_ok=True)
    provenance = ("mergedFrom",)
    assert [r for r in a["metadata"] if r[0] not in provenance] == [
        r for r in b["metadata"] if r[0] not in provenance
    ]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Tiny-model work runs on one torch thread: two threads only wait on each other there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def explained_copy(
    store: Path, folder: Path, families: list[str], limit: int | None = None
) -> Path:
    """A copy of `store` in `folder` whose components of `families` (a sample of `limit`) are
    explained by the no-LLM baseline, as `tdb explain` does."""
    path = folder / "explained.sqlite"
    shutil.copy(store, path)
    explain_store(
        path,
        BaselineExplainer(),
        BaselineSimulator(),
        BASELINE_METHOD,
        families=families,
        limit=limit,
        progress=False,
    )
    return path
