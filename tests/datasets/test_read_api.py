"""The server's dataset read API against real servers: a native store, a TDB JSON export served
by `python -m http.server`, 404s for what is missing, normalization of custom prompts, and the
background collation job of `--auto-dataset` (a real `tdb collate` child process)."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from activation_server.jobs import default_store_path
from neuron_explainer.datasets import DatasetStore
from neuron_explainer.datasets.corpus import default_corpus, default_corpus_dir
from neuron_explainer.datasets.families import pair_of_position
from tests.server.test_fuzz_openapi import fuzz, modes, openapi, operations
from tests.servers import Server, call, start_server, stop_server


@pytest.fixture(scope="module")
def read_server(
    tiny_store: Path, http_root: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The tiny model, its store, and the store's TDB export twice over HTTP: as a root whose
    metadata.json lists the families, and as one family's folder."""
    log = tmp_path_factory.mktemp("read_server") / "server.log"
    srv = start_server(
        [
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--dataset",
            str(tiny_store),
            "--dataset",
            http_root,
            "--dataset",
            f"attention_head={http_root}/attention_head",
        ],
        log,
    )
    yield srv
    stop_server(srv)


def test_metadata_lists_every_dataset(read_server: Server, tiny_store: Path) -> None:
    status, out = call(read_server, "/neuron_datasets_metadata")
    assert status == 200
    by_kind = [(d["kind"], sorted(d["families"])) for d in out["datasets"]]
    assert by_kind == [
        ("store", ["attention_head", "mlp_neuron"]),
        ("tdb", ["attention_head", "mlp_neuron"]),
        ("tdb", ["attention_head"]),
    ]
    store = out["datasets"][0]
    with DatasetStore(tiny_store) as s:
        meta = s.metadata()
    assert store["status"] == "complete" and store["nTokens"] == meta.n_tokens
    assert store["modelName"] == meta.model["name"] and store["layers"] == [0, 1]
    assert call(read_server, "/neuron_datasets_metadata", {})[1] == out  # POST as TDB's clients


def flat(response: dict[str, Any]) -> list[tuple[list[str], list[float]]]:
    groups = [response["mostPositiveActivationRecords"], response["randomSample"]]
    groups += response["randomSampleByQuantile"] or []
    return [(r["tokens"], r["activations"]) for g in groups for r in g]


@pytest.mark.parametrize("family", ["mlp_neuron", "attention_head"])
def test_records_from_the_store_and_its_tdb_export_over_http_agree(
    read_server: Server, tiny_store: Path, family: str
) -> None:
    """Acceptance: a TDB layout served over HTTP, read through the server; the export
    round-trips (same excerpts and statistics as the store it came from)."""
    path = "/neuron_record" if family == "mlp_neuron" else "/attention_head_record"
    index_field = "componentIndex" if family == "mlp_neuron" else "headIndex"
    names = [d["name"] for d in call(read_server, "/neuron_datasets_metadata")[1]["datasets"]]
    with DatasetStore(tiny_store) as store:
        components = store.components(family=family)
        checked = components[:: max(1, len(components) // 5)]
        originals = {(lay, i): store.record(family, lay, i) for _, lay, i in checked}
    datasets = names if family == "attention_head" else names[:2]
    for (layer, index), original in originals.items():
        got = {}
        for name in datasets:
            body = {"datasetName": name, "layerIndex": layer, index_field: index}
            status, out = call(read_server, path, body)
            assert status == 200, out
            got[name] = out
        want_top = [(r.tokens, r.activations) for r in original.most_positive_activation_records]
        for name, out in got.items():
            assert out["dataset"]["name"] == name
            assert flat(out)[: len(want_top)] == want_top
            assert flat(out) == flat(got[names[0]])
            for field in ("mean", "variance", "skewness", "kurtosis"):
                assert out[field] == pytest.approx(getattr(original, field), rel=1e-6), field
            scale = out["maxActivation"]
            assert scale == pytest.approx(original.max_activation, rel=1e-3)
            for r in out["mostPositiveActivationRecords"]:
                assert r["normalizedActivations"] == pytest.approx(
                    [max(-1.0, min(1.0, a / scale)) for a in r["activations"]]
                )
        if family == "attention_head":
            check_summaries(got[names[0]]["mostPositiveActivationRecords"][0])


def check_summaries(record: dict[str, Any]) -> None:
    """Per-token summaries from the pair values, computed here from (q, k) explicitly."""
    n = len(record["tokens"])
    values = record["activations"]
    assert len(values) == n * (n + 1) // 2
    pairs = {pair_of_position(p): v for p, v in enumerate(values)}
    s = record["summaries"]
    for t in range(n):
        into = [pairs[(q, t)] for q in range(t, n)]  # t as the key
        out = [pairs[(t, k)] for k in range(t + 1)]  # t as the query
        assert s["totalIn"][t] == pytest.approx(sum(into), rel=1e-5, abs=1e-6)
        assert s["maxIn"][t] == pytest.approx(max(into))
        assert s["totalOut"][t] == pytest.approx(sum(out), rel=1e-5, abs=1e-6)
        assert s["maxOut"][t] == pytest.approx(max(out))
    assert max(record["normalizedSummaries"]["totalIn"]) <= 1.0


def test_missing_components_and_datasets_are_404_with_a_message(
    read_server: Server, no_model_server: Server
) -> None:
    cases = [
        ("/neuron_record", {"layerIndex": 1, "componentIndex": 96}, "componentIndex", "96"),
        ("/neuron_record", {"layerIndex": 7, "componentIndex": 0}, "layerIndex", "layer 7"),
        (
            "/neuron_record",
            {"datasetName": "nope", "layerIndex": 0, "componentIndex": 0},
            "datasetName",
            "nope",
        ),
        ("/attention_head_record", {"layerIndex": 0, "headIndex": 4}, "headIndex", "4"),
    ]
    for path, body, field, mentioned in cases:
        status, out = call(read_server, path, body)
        assert status == 404, (body, out)
        assert out["message"].startswith(field) and mentioned in out["message"], out
        assert out["requestId"] and "Traceback" not in json.dumps(out)
    # A record missing on the remote HTTP server (its 404) is a 404 here too.
    names = [d["name"] for d in call(read_server, "/neuron_datasets_metadata")[1]["datasets"]]
    status, out = call(
        read_server,
        "/neuron_record",
        {"datasetName": names[1], "layerIndex": 1, "componentIndex": 10_000},
    )
    assert status == 404 and "HTTP 404" in out["message"]
    # A server with no datasets says how to get one.
    status, out = call(no_model_server, "/neuron_record", {"layerIndex": 0, "componentIndex": 0})
    assert status == 404 and "--dataset" in out["message"]
    assert call(no_model_server, "/neuron_datasets_metadata")[1] == {"datasets": []}
    # Validation stays a 422 naming the field.
    status, out = call(read_server, "/neuron_record", {"layerIndex": -1, "componentIndex": 0})
    assert status == 422 and "layerIndex" in out["message"]


def test_custom_prompt_normalized_by_the_dataset_max(read_server: Server, tiny_store: Path) -> None:
    with DatasetStore(tiny_store) as store:
        neuron_max = store.record("mlp_neuron", 1, 3).max_activation
        head_max = store.record("attention_head", 0, 2).max_activation
    prompt = "It is a truth universally acknowledged"
    status, out = call(
        read_server,
        "/derived_scalars",
        {"prompt": prompt, "layerIndex": 1, "componentIndex": 3, "normalizeByDatasetMax": True},
    )
    assert status == 200, out
    assert out["datasetMax"] == pytest.approx(neuron_max)
    assert out["normalizedValues"] == pytest.approx([v / neuron_max for v in out["values"]])
    status, out = call(
        read_server,
        "/derived_attention_scalars",
        {"prompt": prompt, "layerIndex": 0, "headIndex": 2, "normalizeByDatasetMax": True},
    )
    assert status == 200, out
    assert out["datasetMax"] == pytest.approx(head_max)
    assert out["normalizedValues"][-1] == pytest.approx([v / head_max for v in out["values"][-1]])
    status, out = call(
        read_server,
        "/derived_scalars",
        {"prompt": prompt, "layerIndex": 1, "componentIndex": 96, "normalizeByDatasetMax": True},
    )
    assert status in (400, 404) and "componentIndex" in out["message"]


def wait_for_job(server: Server, job_id: str, timeout_s: float) -> dict[str, Any]:
    """The job once it has ended; `seenProgress`: it was seen running with some progress."""
    deadline = time.monotonic() + timeout_s
    seen_progress = False
    while True:
        jobs = {job["id"]: job for job in call(server, "/jobs")[1]["jobs"]}
        job = jobs.get(job_id)
        if job is not None:
            seen_progress |= job["status"] == "running" and job["tokens"] > 0
            if job["status"] not in ("queued", "running"):
                job["seenProgress"] = seen_progress
                return job
        assert time.monotonic() < deadline, jobs
        time.sleep(0.2)


def test_auto_dataset_builds_the_default_store_in_the_background(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`--auto-dataset`: the server answers at once, a `tdb collate` child builds the store with
    progress at /jobs, its records are served when it is done; then a `tdb explain` child explains
    every component with the baseline, and records carry the explanations. A restart reuses both
    (no job)."""
    default_corpus()  # prepared once in the real cache; the test's cache links to it
    cache = tmp_path / "cache"
    (cache / "corpora").mkdir(parents=True)
    os.symlink(default_corpus_dir(), cache / "corpora" / default_corpus_dir().name)
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--auto-dataset"]
    args += ["--auto-dataset-tokens", "8192"]
    env = {"TDB_CACHE": str(cache)}
    server = start_server(args, tmp_path / "server.log", env=env)
    try:
        status, out = call(server, "/health")
        assert status == 200 and out["modelLoaded"]
        job = wait_for_job(server, "collate-default", timeout_s=900)
        assert job["status"] == "done", server.log_text()
        assert job["kind"] == "collate" and job["totalTokens"] == job["tokens"] == 8192
        assert job["unit"] == "tokens"
        explain = wait_for_job(server, "explain-default", timeout_s=900)
        assert explain["status"] == "done", (explain, server.log_text())
        assert explain["kind"] == "explain" and explain["unit"] == "components"
        with DatasetStore(
            cache / "datasets" / default_store_path(str(tiny_model_dir), 8192).name
        ) as ds:
            n_components = len(ds.components())
        assert explain["totalTokens"] == explain["tokens"] == n_components
        [info] = call(server, "/neuron_datasets_metadata")[1]["datasets"]
        assert info["status"] == "complete" and info["nTokens"] == 8192
        status, out = call(server, "/neuron_record", {"layerIndex": 1, "componentIndex": 0})
        assert status == 200 and len(out["mostPositiveActivationRecords"]) == 20
        assert out["explanation"]["method"]["explainer"] == "baseline"
        assert any("Elinor" in "".join(r["tokens"]) for r in out["randomSample"])  # Austen
    finally:
        stop_server(server)
    path = default_store_path(str(tiny_model_dir), 8192)
    assert (cache / "datasets" / path.name).is_file()
    server = start_server(args, tmp_path / "server2.log", env=env)
    try:
        assert call(server, "/jobs")[1] == {"jobs": []}  # complete: nothing to build
        status, out = call(server, "/neuron_record", {"layerIndex": 0, "componentIndex": 5})
        assert status == 200 and math.isfinite(out["maxActivation"])
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def no_model_read_server(
    tiny_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The dataset viewer: --no-model, the tiny store."""
    log = tmp_path_factory.mktemp("no_model_read_server") / "server.log"
    srv = start_server(["--no-model", "--dataset", str(tiny_store)], log)
    yield srv
    stop_server(srv)


@pytest.mark.parametrize("which", ["read_server", "no_model_read_server"])
def test_indices_beyond_64_bits_are_422(which: str, request: pytest.FixtureRequest) -> None:
    """An index past SQLite's 64-bit integers was a 500 from the store's query; it is a 422
    naming the field, with or without a model."""
    server: Server = request.getfixturevalue(which)
    huge = 2**70
    cases = [
        ("/neuron_record", {"layerIndex": 0, "componentIndex": huge}, "componentIndex"),
        ("/neuron_record", {"layerIndex": huge, "componentIndex": 0}, "layerIndex"),
        ("/attention_head_record", {"layerIndex": huge, "headIndex": 0}, "layerIndex"),
        ("/attention_head_record", {"layerIndex": 0, "headIndex": huge}, "headIndex"),
    ]
    for path, body, field in cases:
        status, out = call(server, path, body)
        assert status == 422 and out["detail"][0]["field"] == field, (body, out)
    # The largest index accepted is one no dataset holds: a 404 naming it.
    status, out = call(server, "/neuron_record", {"layerIndex": 0, "componentIndex": 2**31 - 1})
    assert status == 404 and out["detail"] == {"field": "componentIndex"}, out


def test_read_endpoints_answer_as_documented(
    no_model_read_server: Server, subtests: pytest.Subtests
) -> None:
    """Schemathesis (tests/server/test_fuzz_openapi.py) on the dataset endpoints of a server that
    holds a store: generated requests, valid and invalid, answered as the document says."""
    server = no_model_read_server
    for operation in operations(server, openapi(server), ("503",)):
        if operation.path in ("/neuron_record", "/attention_head_record"):
            for mode in modes(operation):
                fuzz(operation, mode, subtests)


def test_a_side_on_a_neuron_is_400(no_model_read_server: Server) -> None:
    """`autoencoderSide` on a node type that has none (found by Schemathesis: a 500)."""
    body = {
        "nodeType": "mlp_neuron",
        "autoencoderSide": "mlp",
        "layerIndex": 0,
        "componentIndex": 0,
    }
    status, out = call(no_model_read_server, "/neuron_record", body)
    assert status == 400 and out["detail"] == {"field": "autoencoderSide", "kind": "invalid"}, out
