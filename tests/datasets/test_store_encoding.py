"""What a commit writes is exactly the in-memory state: float16 activation blobs where they fit,
float32 for a component with a value beyond float16's range, and a reloaded accumulator (what a
resumed run starts from) equal to the one committed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from neuron_explainer.datasets.accumulators import AccumulatorConfig, LayerAccumulator
from neuron_explainer.datasets.store import FORMAT_VERSION, DatasetMetadata, connect
from neuron_explainer.datasets.store_writer import StoreWriter, load_accumulator

WINDOWS, COMPONENTS, POSITIONS = 12, 4, 5


def _metadata(config: AccumulatorConfig) -> DatasetMetadata:
    return DatasetMetadata(
        format_version=FORMAT_VERSION,
        tool_version="test",
        model={"name": "none"},
        corpus={"name": "random"},
        window_length=POSITIONS,
        n_windows_total=WINDOWS,
        window_ranges=[[0, WINDOWS]],
        n_tokens=WINDOWS * POSITIONS,
        families=["mlp_neuron"],
        layers=[0],
        k=config.k,
        random_sample_size=config.random_sample_size,
        quantile_sample_size=config.quantile_sample_size,
        quantiles=list(config.quantiles),
        calibration_windows=config.calibration_windows,
        seed=config.seed,
        active_threshold=config.active_threshold,
        batch_size=4,
        dtype="float32",
        status="complete",
        next_window=WINDOWS,
        created_at="",
        updated_at="",
    )


def test_commit_round_trips_float16_and_float32_rows(tmp_path: Path) -> None:
    config = AccumulatorConfig(
        k=3, random_sample_size=2, quantile_sample_size=1, quantiles=(0.5,), calibration_windows=4
    )
    acc = LayerAccumulator("mlp_neuron", 0, COMPONENTS, POSITIONS, config)
    acts = torch.randn(WINDOWS, COMPONENTS, POSITIONS, generator=torch.Generator().manual_seed(0))
    acts[5, 2, 1] = 1e6  # beyond float16: component 2's excerpts must be stored as float32
    for first in range(0, WINDOWS, 4):
        acc.update(acts[first : first + 4], first)
    metadata = _metadata(config)
    writer = StoreWriter(tmp_path / "store.sqlite")
    tokens = {w: np.arange(POSITIONS, dtype=np.uint16) for w in range(WINDOWS)}
    kept = writer.commit(metadata, [acc], tokens, str)
    assert kept == {
        int(w)
        for s in (acc.top, acc.random, acc.by_quantile)
        for w in s.windows.flatten().tolist()
        if w >= 0
    }
    writer.finish(kept)
    writer.close()

    conn = connect(tmp_path / "store.sqlite", readonly=True)
    dtypes = dict(conn.execute("SELECT idx, acts_dtype FROM samples").fetchall())
    assert dtypes == {0: "float16", 1: "float16", 2: "float32", 3: "float16"}
    stored = {w for (w,) in conn.execute("SELECT window_index FROM windows")}
    assert stored == kept
    again = load_accumulator(conn, metadata, "mlp_neuron", 0, COMPONENTS)
    conn.close()
    for mine, theirs in (
        (acc.top, again.top),
        (acc.random, again.random),
        (acc.by_quantile, again.by_quantile),
    ):
        assert torch.equal(mine.windows, theirs.windows)
        assert torch.equal(mine.order, theirs.order)
        assert torch.equal(mine.sorted_acts(), theirs.sorted_acts())
    assert torch.equal(acc.top.values, again.top.values)
    assert torch.equal(acc.boundaries, again.boundaries)
    assert float(again.top.sorted_acts()[2, 0, 1]) == 1e6  # kept as float32
