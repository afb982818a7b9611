"""`tdb explain` on a real store: every component gets a row with its method, a rerun does
nothing more, a run killed with SIGKILL mid-way and rerun leaves the same table as one that ran
through, and bad arguments are one clear error."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neuron_explainer.datasets import DatasetStore
from neuron_explainer.explanations import (
    BASELINE_METHOD,
    BaselineExplainer,
    BaselineSimulator,
    all_explanations,
    best_explanations,
    explain_and_score,
    explain_store,
    read_explanations,
    sample_components,
)
from tests.servers import ROOT


def tdb(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "neuron_explainer.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def table(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT e.*, m.explainer, m.simulator, m.model, m.prompt_version FROM explanations e "
            "JOIN explanation_methods m USING (method_id) ORDER BY family, layer, idx"
        ).fetchall()


@pytest.fixture
def store(tiny_store: Path, tmp_path: Path) -> Path:
    path = tmp_path / "store.sqlite"
    shutil.copy(tiny_store, path)
    return path


def test_explains_every_component_into_the_store(store: Path) -> None:
    run = tdb("explain", str(store))
    assert run.returncode == 0, run.stderr
    assert "nodes/s" in run.stderr and "ETA" in run.stderr
    with DatasetStore(store) as ds:
        components = ds.components()
        rows = all_explanations(ds._conn, BASELINE_METHOD)
        assert [(r.family, r.layer, r.index) for r in rows] == components
        assert {f for f, _, _ in components} == {"mlp_neuron", "attention_head"}
        # Each row is what the library computes for that component.
        for family, layer, index in [components[0], components[-1]]:
            record = ds.record(family, layer, index)
            expected = explain_and_score(record, BaselineExplainer(), BaselineSimulator())
            [stored] = read_explanations(ds._conn, family, layer, index)
            assert stored.explanation == expected.explanation
            assert stored.scores == expected.scores
            assert stored.n_scored_excerpts == len(expected.scored)
        heads = [r for r in rows if r.family == "attention_head"]
        assert any(r.scores.roc_auc_score is not None for r in heads)
        neurons = [r.scores.ev_correlation_score for r in rows if r.family == "mlp_neuron"]
        assert sum(s is not None and s > 0.3 for s in neurons) > len(neurons) / 2
        assert len(best_explanations(ds._conn, "mlp_neuron", 1)) == 96


def test_limit_and_filters(store: Path) -> None:
    run = tdb("explain", str(store), "--families", "mlp_neuron", "--layers", "1", "--limit", "7")
    assert run.returncode == 0, run.stderr
    rows = table(store)
    assert len(rows) == 7 and {(r[0], r[1]) for r in rows} == {("mlp_neuron", 1)}
    # The same sample on every run, and a larger sample includes a smaller one.
    nodes = [("mlp_neuron", 1, i) for i in range(96)]
    assert [r[:3] for r in rows] == sample_components(nodes, 7)
    assert set(sample_components(nodes, 7)) < set(sample_components(nodes, 20))
    bad = tdb("explain", str(store), "--families", "mlp_autoencoder_latent")
    assert bad.returncode == 2 and "--families" in bad.stderr and "Traceback" not in bad.stderr


def killed_after_a_commit(args: list[str], store: Path) -> int:
    """Run `tdb explain STORE ARGS`; once it has committed some rows, hold the store's write lock
    so that it blocks at its next commit, and kill it there with SIGKILL. Returns the rows it had
    written (the lock is released, nothing of the blocked chunk is in the store)."""
    cmd = [sys.executable, "-m", "neuron_explainer.cli", "explain", str(store), *args]
    process = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
    blocker = sqlite3.connect(store, timeout=60, isolation_level=None)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert process.poll() is None, "the run finished before it could be interrupted"
            assert time.monotonic() < deadline
            try:
                n = blocker.execute("SELECT count(*) FROM explanations").fetchone()[0]
            except sqlite3.OperationalError:  # no table yet
                n = 0
            if n > 0:
                blocker.execute("BEGIN IMMEDIATE")
                break
            time.sleep(0.005)
        written = int(blocker.execute("SELECT count(*) FROM explanations").fetchone()[0])
        process.send_signal(signal.SIGKILL)
        process.wait()
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    return written


def test_sigkill_then_rerun_gives_the_uninterrupted_table(store: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference.sqlite"
    shutil.copy(store, reference)
    explain_store(reference, BaselineExplainer(), BaselineSimulator(), BASELINE_METHOD)
    expected = table(reference)

    written = killed_after_a_commit(["--chunk", "4"], store)
    assert 0 < written < len(expected)
    assert len(table(store)) == written

    rerun = tdb("explain", str(store))
    assert rerun.returncode == 0, rerun.stderr
    assert f"{written:,} already done" in rerun.stderr
    assert table(store) == expected


def test_local_model_sigkill_then_rerun_gives_the_uninterrupted_table(
    store: Path, tmp_path: Path
) -> None:
    """The same with the local LLM explainer and simulator (the default model, greedy): each
    component's row, written by whichever run did it, is the uninterrupted run's."""
    args = ["--explainer", "local", "--threads", "1", "--families", "mlp_neuron", "--limit", "2"]
    args += ["--chunk", "1"]
    reference = tmp_path / "reference.sqlite"
    shutil.copy(store, reference)
    run = tdb("explain", str(reference), *args, timeout=900)
    assert run.returncode == 0, run.stderr
    expected = table(reference)
    assert len(expected) == 2 and {r[-4] for r in expected} == {"llm"}

    assert killed_after_a_commit(args, store) == 1
    rerun = tdb("explain", str(store), *args, timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 already done" in rerun.stderr
    assert table(store) == expected
