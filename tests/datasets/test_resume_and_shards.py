"""Resuming and sharding give the same store as one uninterrupted run.

`tdb collate` runs in a subprocess (python -m neuron_explainer.cli) on a tiny random
model, is killed with SIGKILL once its first commit is visible in the SQLite file, and is started
again with the same arguments; every table of the result equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neuron_explainer.datasets import DatasetError, DatasetStore, collate, merge_stores
from neuron_explainer.datasets.corpus import folder_corpus
from neuron_explainer.models import HookedTransformer
from tests.datasets.helpers import assert_same_dataset, table_rows

N_TOKENS = 120 * 16


def cli_args(model_dir: Path, corpus: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "neuron_explainer.cli",
        "collate",
        "--model",
        str(model_dir),
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--tokens",
        str(N_TOKENS),
        "--window-length",
        "16",
        "--batch-size",
        "1",
        "--commit-every",
        "1",
        "--k",
        "4",
        "--random-sample-size",
        "3",
        "--quantile-sample-size",
        "2",
        "--calibration-windows",
        "8",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--quiet",
    ]


def committed_progress(path: Path) -> tuple[int, str] | None:
    """(nextWindow, status) of the last commit, or None before the first one."""
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(path, timeout=1)
        try:
            rows = dict(
                conn.execute(
                    "SELECT key, value FROM metadata WHERE key IN ('nextWindow', 'status')"
                ).fetchall()
            )
        finally:
            conn.close()
    except sqlite3.OperationalError:  # tables not created yet, or locked
        return None
    if not rows:
        return None
    return json.loads(rows["nextWindow"]), json.loads(rows["status"])


def test_sigkilled_collation_resumes_to_the_same_store(
    tiny_model: HookedTransformer,
    tiny_model_dir: Path,
    prose_dir: Path,
    tmp_path: Path,
    one_thread: None,
):
    killed, full = tmp_path / "killed.sqlite", tmp_path / "full.sqlite"
    # The uninterrupted run goes alongside (one thread each, two cores).
    reference = subprocess.Popen(
        cli_args(tiny_model_dir, prose_dir, full), stderr=subprocess.PIPE, text=True
    )
    proc = subprocess.Popen(
        cli_args(tiny_model_dir, prose_dir, killed), stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    progress = None
    while progress is None or progress[0] == 0:
        assert proc.poll() is None, f"collate exited early: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "no commit within 120 s"
        time.sleep(0.005)
        progress = committed_progress(killed)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    partial = committed_progress(killed)
    assert partial is not None
    next_window, status = partial
    assert status == "in_progress" and 0 < next_window < N_TOKENS // 16, partial

    resumed = subprocess.run(
        cli_args(tiny_model_dir, prose_dir, killed), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait() == 0, reference.communicate()[1]

    a, b = table_rows(killed), table_rows(full)
    assert a["metadata"] == b["metadata"]
    for table in ("components", "samples", "windows", "vocabulary"):
        assert a[table] == b[table], table
    assert not Path(str(killed) + "-wal").exists()  # the finished store is one file

    # Started again once complete, it changes nothing; with other settings it refuses.
    settings = dict(
        n_tokens=N_TOKENS,
        window_length=16,
        batch_size=1,
        k=4,
        random_sample_size=3,
        quantile_sample_size=2,
        calibration_windows=8,
        progress=False,
    )
    corpus = folder_corpus(prose_dir)
    assert collate(tiny_model, corpus, killed, **settings).status == "complete"  # type: ignore[arg-type]
    assert table_rows(killed) == a
    with pytest.raises(DatasetError, match="different settings"):
        collate(tiny_model, corpus, killed, **(settings | {"k": 5}))  # type: ignore[arg-type]


def test_shards_merge_into_the_single_run_store(
    tiny_model: HookedTransformer, prose_dir: Path, tmp_path: Path, one_thread: None
):
    settings = dict(
        n_tokens=N_TOKENS,
        window_length=16,
        batch_size=8,
        k=4,
        random_sample_size=3,
        quantile_sample_size=2,
        calibration_windows=20,  # more than one batch, so shard 1 must calibrate first
        progress=False,
    )
    corpus = folder_corpus(prose_dir)
    single = tmp_path / "single.sqlite"
    collate(tiny_model, corpus, single, **settings)  # type: ignore[arg-type]
    shards = [tmp_path / f"shard{i}.sqlite" for i in range(3)]
    for i, path in enumerate(shards):
        meta = collate(tiny_model, corpus, path, shard=(i, 3), **settings)  # type: ignore[arg-type]
        assert meta.shard == f"{i}/3"
    merged = tmp_path / "merged.sqlite"
    merge_stores(shards, merged)

    # Samples are re-selected by the same keys: identical bytes. Moments merge in another order,
    # so they agree to float64 rounding.
    assert_same_dataset(single, merged)
    with DatasetStore(merged) as store:
        meta = store.metadata()
        assert meta.window_ranges == [[0, N_TOKENS // 16]] and meta.status == "complete"
        assert meta.n_tokens == N_TOKENS and len(meta.merged_from) == 3

    with pytest.raises(DatasetError, match="overlap"):
        merge_stores([shards[0], single], tmp_path / "bad.sqlite")
