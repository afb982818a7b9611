"""Running `tdb collate` again (the real command, in a subprocess, on a tiny random model): on a
complete store it writes nothing, so the file keeps its bytes and its journal mode; what can be
told from the store's metadata (complete, other settings) and its lock (another writer) is told
before the model is loaded, which the absence of the "loaded ..." line on stderr shows."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from neuron_explainer.datasets.store import DatasetStore
from neuron_explainer.datasets.store_writer import StoreWriter

SMALL = ["--window-length", "16", "--batch-size", "16", "--k", "4", "--random-sample-size", "3"]


def tdb_collate(model_dir: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "neuron_explainer.cli", "collate"),
        *("--model", str(model_dir), "--corpus", str(corpus), "--out", str(out)),
        *SMALL,
        *("--device", "cpu", "--threads", "1", *extra),
    ]


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def loaded_the_model(stderr: str) -> bool:
    """`tdb` prints "loaded NAME (device, dtype) in Ns" once the model is loaded."""
    return any(line.startswith("loaded ") for line in stderr.splitlines())


def fingerprint(path: Path) -> tuple[str, int]:
    """The file's SHA-256 and its journal mode as its header records it (byte 18: 1 for a
    rollback journal, 2 for WAL), read as bytes, without SQLite."""
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), data[18]


def test_a_complete_store_is_left_byte_identical_without_loading_the_model(
    tiny_model_dir: Path, prose_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "store.sqlite"
    command = tdb_collate(tiny_model_dir, prose_dir, out, "--tokens", "1024")
    first = run(command)
    assert first.returncode == 0, first.stderr
    assert loaded_the_model(first.stderr)
    before = fingerprint(out)
    assert before[1] == 1  # the finished store is a single file with a rollback journal

    again = run(command)
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stderr
    assert not loaded_the_model(again.stderr), again.stderr
    assert fingerprint(out) == before
    assert not Path(f"{out}-wal").exists()

    # Other settings are refused, with the list of differences, before the model is loaded too.
    other = run(tdb_collate(tiny_model_dir, prose_dir, out, "--tokens", "1024", "--k", "5"))
    assert other.returncode == 2
    assert "different settings (k: 4 vs 5)" in other.stderr, other.stderr
    assert not loaded_the_model(other.stderr), other.stderr
    smaller = run(tdb_collate(tiny_model_dir, prose_dir, out, "--tokens", "512"))
    assert smaller.returncode == 2
    assert "nWindowsTotal: 64 vs 32" in smaller.stderr, smaller.stderr
    assert not loaded_the_model(smaller.stderr), smaller.stderr
    assert fingerprint(out) == before


def test_a_rerun_that_needs_the_model_still_writes_nothing(
    tiny_model_dir: Path, prose_dir: Path, tmp_path: Path
) -> None:
    """Without a budget, the corpus's number of windows decides whether the settings agree, and
    counting them needs the model's tokenizer: the model is loaded, and the file still keeps its
    bytes."""
    out = tmp_path / "store.sqlite"
    command = tdb_collate(tiny_model_dir, prose_dir, out)  # the whole corpus
    assert run(command).returncode == 0
    before = fingerprint(out)

    again = run(command)
    assert again.returncode == 0, again.stderr
    assert loaded_the_model(again.stderr)
    assert "already complete" in again.stderr
    assert fingerprint(out) == before

    # Given as a budget, the store's own number of tokens needs no model.
    with DatasetStore(out) as store:
        n_tokens = store.metadata().n_tokens
    budget = run(tdb_collate(tiny_model_dir, prose_dir, out, "--tokens", str(n_tokens)))
    assert budget.returncode == 0, budget.stderr
    assert not loaded_the_model(budget.stderr), budget.stderr
    assert fingerprint(out) == before


def test_a_second_writer_is_refused_before_loading_the_model(
    tiny_model_dir: Path, prose_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "store.sqlite"
    writing = StoreWriter(out)  # what a running collation holds
    try:
        second = run(tdb_collate(tiny_model_dir, prose_dir, out, "--tokens", "1024"))
    finally:
        writing.close()
    assert second.returncode == 2
    assert "another process is writing" in second.stderr, second.stderr
    assert not loaded_the_model(second.stderr), second.stderr
