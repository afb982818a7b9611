"""One writer per store: a second collation of the same file fails at once, from another process
too, and the lock goes away with its holder."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from neuron_explainer.datasets.records import DatasetError
from neuron_explainer.datasets.store import DatasetStore
from neuron_explainer.datasets.store_writer import StoreWriter

SECOND_WRITER = """
import sys
from neuron_explainer.datasets.records import DatasetError
from neuron_explainer.datasets.store_writer import StoreWriter
try:
    StoreWriter(sys.argv[1])
except DatasetError as e:
    print(e)
    sys.exit(3)
"""


def test_a_second_writer_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    first = StoreWriter(path)
    with pytest.raises(DatasetError, match="another process is writing"):
        StoreWriter(path)
    run = subprocess.run(
        [sys.executable, "-c", SECOND_WRITER, str(path)], capture_output=True, text=True
    )
    assert run.returncode == 3 and "another process is writing" in run.stdout
    first.close()
    StoreWriter(path).close()


def test_finishing_while_a_server_reads_the_store(tiny_store: Path, tmp_path: Path) -> None:
    """A server reading a store while it is being built must not make the collation fail at its
    last step (leaving WAL mode needs exclusive access): the store stays readable, complete."""
    path = tmp_path / "store.sqlite"
    shutil.copy(tiny_store, path)
    writer = StoreWriter(path)
    reader = DatasetStore(path)
    before = reader.record("mlp_neuron", 1, 3)
    writer.finish()
    writer.close()
    assert reader.record("mlp_neuron", 1, 3) == before
    reader.close()
    with DatasetStore(path) as again:
        assert again.record("mlp_neuron", 1, 3) == before
