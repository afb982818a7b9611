"""Test helpers: comparing stores, torch thread counts."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
