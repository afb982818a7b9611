"""TDB JSON datasets: export a store, read it back from the folder and over a real HTTP server,
and the errors a server maps to 404."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from neuron_explainer.datasets import (
    ComponentNotFoundError,
    ComponentRecord,
    DatasetNotFoundError,
    DatasetStore,
    read_tdb_record,
)
from neuron_explainer.datasets.tdb_format import list_tdb_components


def same_record(a: ComponentRecord, b: ComponentRecord) -> None:
    """Equal in every field TDB's format carries (activations exactly: JSON keeps floats)."""

    def pairs(r: ComponentRecord) -> list[tuple[list[str], list[float]]]:
        groups = [r.most_positive_activation_records, r.random_sample]
        groups += r.random_sample_by_quantile or []
        return [(x.tokens, x.activations) for g in groups for x in g]

    assert (a.family, a.layer, a.index) == (b.family, b.layer, b.index)
    assert pairs(a) == pairs(b)
    assert a.quantile_boundaries == b.quantile_boundaries
    for field in ("mean", "variance", "skewness", "kurtosis"):
        x, y = getattr(a, field), getattr(b, field)
        assert x == y or (math.isnan(x) and math.isnan(y)), field
    # TDB has no stored max: it is the largest activation in the top records (float16-rounded).
    assert b.max_activation == pytest.approx(a.max_activation, rel=1e-3)


@pytest.mark.parametrize("family", ["mlp_neuron", "attention_head"])
def test_export_round_trips_from_folder_and_http(
    tiny_store: Path, exported: Path, http_root: str, family: str
):
    with DatasetStore(tiny_store) as store:
        components = store.components(family=family)
        assert list_tdb_components(exported / family) == [(lay, i) for _, lay, i in components]
        for _, layer, index in components[:: max(1, len(components) // 6)]:
            original = store.record(family, layer, index)
            local = read_tdb_record(exported / family, layer, index, family)
            remote = read_tdb_record(f"{http_root}/{family}", layer, index, family)
            same_record(original, local)
            same_record(original, remote)
            if family == "attention_head":
                n = len(local.most_positive_activation_records[0].tokens)
                assert (
                    len(local.most_positive_activation_records[0].activations) == n * (n + 1) // 2
                )


def test_exported_json_is_tdb_neuron_record(exported: Path):
    data = json.loads((exported / "mlp_neuron" / "1" / "3.json").read_text())
    assert data["dataclass_name"] == "NeuronRecord"
    assert data["neuron_id"] == {"dataclass_name": "NeuronId", "layer_index": 1, "neuron_index": 3}
    assert set(data) == {
        "dataclass_name",
        "neuron_id",
        "random_sample",
        "random_sample_by_quantile",
        "quantile_boundaries",
        "mean",
        "variance",
        "skewness",
        "kurtosis",
        "most_positive_activation_records",
    }
    first = data["most_positive_activation_records"][0]
    assert first["dataclass_name"] == "ActivationRecord"
    assert len(first["tokens"]) == len(first["activations"]) == 16
    assert len(data["random_sample_by_quantile"]) == 5
    assert json.loads((exported / "metadata.json").read_text())["datasets"]["mlp_neuron"]


def test_missing_records_and_datasets_raise_lookup_errors(
    tiny_store: Path, exported: Path, http_root: str, tmp_path: Path
):
    with pytest.raises(ComponentNotFoundError):
        read_tdb_record(f"{http_root}/mlp_neuron", 1, 10_000)
    with pytest.raises(ComponentNotFoundError):
        read_tdb_record(exported / "mlp_neuron", 7, 0)
    with pytest.raises(DatasetNotFoundError):
        read_tdb_record(tmp_path / "no-such-dataset", 0, 0)

    with pytest.raises(DatasetNotFoundError):
        DatasetStore(tmp_path / "missing.sqlite")
    (tmp_path / "not-a-store.sqlite").write_text("hello")
    with pytest.raises(DatasetNotFoundError):
        DatasetStore(tmp_path / "not-a-store.sqlite")
    with DatasetStore(tiny_store) as store:
        for family, layer, index in (
            ("mlp_neuron", 0, 96),  # index past the layer's width
            ("mlp_neuron", 5, 0),  # layer not collated
            ("autoencoder_latent", 0, 0),  # family not collated
        ):
            with pytest.raises(ComponentNotFoundError) as info:
                store.record(family, layer, index)
            assert isinstance(info.value, LookupError)
            assert str(layer) in str(info.value) or family in str(info.value)


def test_band_limited_head_records_expand_to_the_full_triangle(tmp_path: Path):
    """Some TDB head datasets keep each query's last m keys only: zeros elsewhere."""
    n, m = 4, 2
    tokens = ["a", "b", "c", "d"]
    band = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # rows keep 1, 2, 2, 2 keys
    record = {
        "dataclass_name": "NeuronRecord",
        "neuron_id": {"layer_index": 0, "neuron_index": 0},
        "most_positive_activation_records": [{"tokens": tokens, "activations": band}],
        "random_sample": [],
    }
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "0.json").write_text(json.dumps(record))
    got = read_tdb_record(tmp_path, 0, 0, "attention_head")
    full = got.most_positive_activation_records[0].activations
    assert len(full) == n * (n + 1) // 2 and m == 2
    # row 0: (0,0); row 1: (1,0) (1,1); row 2: (2,1) (2,2); row 3: (3,2) (3,3)
    assert full == [1.0, 2.0, 3.0, 0.0, 4.0, 5.0, 0.0, 0.0, 6.0, 7.0]
    assert got.random_sample_by_quantile is None and math.isnan(got.mean)
    assert got.max_activation == 7.0
