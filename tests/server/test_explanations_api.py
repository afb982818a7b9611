"""Explanations over HTTP with TDB's route names: `/existing_explanations` lists what `tdb explain`
stored, `/neuron_record` and `/attention_head_record` carry the best one, `/explain` runs the
baseline now (the same explanation and scores as the stored run), `/score` scores any explanation
on the component's held-out excerpts; a real `--no-model` server over real stores."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuron_explainer.datasets import collate
from neuron_explainer.datasets.corpus import folder_corpus
from neuron_explainer.explanations import (
    BASELINE_METHOD,
    BaselineExplainer,
    BaselineSimulator,
    ExplanationReader,
    best_explanations,
    correlation_scores,
    explain_store,
)
from neuron_explainer.models import HookedTransformer
from tests.datasets.conftest import (  # noqa: F401
    prose_dir,
    tiny_model,
    tiny_model_dir,
    tiny_store,
)
from tests.datasets.helpers import torch_threads
from tests.servers import Server, call, start_server, stop_server


@pytest.fixture(scope="module")
def explained(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    path = tmp_path_factory.mktemp("explained") / "explained.sqlite"
    shutil.copy(tiny_store, path)
    explain_store(path, BaselineExplainer(), BaselineSimulator(), BASELINE_METHOD, progress=False)
    return path


@pytest.fixture(scope="module")
def served(
    explained: Path,
    tiny_store: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    plain = tmp_path_factory.mktemp("plain") / "plain.sqlite"
    shutil.copy(tiny_store, plain)
    log = tmp_path_factory.mktemp("explanations_server") / "server.log"
    srv = start_server(["--no-model", "--dataset", str(explained), "--dataset", str(plain)], log)
    yield srv
    stop_server(srv)


def neuron(index: int = 7, **extra: object) -> dict[str, object]:
    return {"nodeType": "mlp_neuron", "layerIndex": 1, "componentIndex": index, **extra}


def test_existing_explanations_and_record(served: Server, explained: Path) -> None:
    status, body = call(served, "/existing_explanations", neuron())
    assert status == 200, body
    [e] = body["explanations"]
    stored = ExplanationReader(explained).best("mlp_neuron", 1, 7)
    assert stored is not None
    assert e["explanation"] == stored.explanation
    assert e["evCorrelationScore"] == stored.scores.ev_correlation_score
    assert e["score"] == stored.scores.ev_correlation_score
    assert e["method"] == {
        "explainer": "baseline",
        "simulator": "baseline",
        "model": "",
        "promptVersion": "baseline-1",
    }
    assert e["datasetName"] == "explained"
    assert e["scoredExcerpts"] is None  # a store keeps scores, not simulations
    status, record = call(served, "/neuron_record", neuron())
    assert status == 200 and record["explanation"] == e
    # Heads: the best explanation with its ROC AUC as the headline score.
    status, head = call(served, "/attention_head_record", {"layerIndex": 1, "headIndex": 2})
    assert status == 200
    best = ExplanationReader(explained).best("attention_head", 1, 2)
    assert best is not None and head["explanation"]["explanation"] == best.explanation
    assert head["explanation"]["score"] == best.scores.roc_auc_score
    # A dataset without explanations: none, not an error.
    status, plain = call(served, "/existing_explanations", neuron(datasetName="plain"))
    assert status == 200 and plain["explanations"] == []
    status, record = call(served, "/neuron_record", neuron(datasetName="plain"))
    assert status == 200 and record["explanation"] is None


def test_explain_and_score(served: Server, explained: Path) -> None:
    stored = ExplanationReader(explained).best("mlp_neuron", 1, 7)
    assert stored is not None
    status, body = call(served, "/explain", neuron(datasetName="plain"))
    assert status == 200, body
    [fresh] = body["explanations"]
    assert fresh["explanation"] == stored.explanation
    assert fresh["evCorrelationScore"] == stored.scores.ev_correlation_score
    assert fresh["nScoredExcerpts"] == stored.n_scored_excerpts
    # The scored excerpts come back with the simulation (what the UI shows side by side): the
    # held-out top excerpts (the 2nd, 4th, ... of the record), then random ones, never one the
    # explanation was written from; their pooled true and simulated activations give the score.
    excerpts = fresh["scoredExcerpts"]
    assert len(excerpts) == fresh["nScoredExcerpts"]
    status, record = call(served, "/neuron_record", neuron(datasetName="plain"))
    assert status == 200
    top = record["mostPositiveActivationRecords"]
    n_top = len(top[1::2])
    assert [e["group"] for e in excerpts] == ["top"] * n_top + ["random"] * (len(excerpts) - n_top)
    assert [(e["tokens"], e["activations"]) for e in excerpts[:n_top]] == [
        (r["tokens"], r["activations"]) for r in top[1::2]
    ]
    explained_from = {tuple(r["tokens"]) for r in top[0::2]}
    assert not any(tuple(e["tokens"]) in explained_from for e in excerpts)
    assert all(len(e["simulatedActivations"]) == len(e["tokens"]) for e in excerpts)
    pooled = correlation_scores(
        [e["activations"] for e in excerpts], [e["simulatedActivations"] for e in excerpts]
    )
    assert pooled.ev_correlation_score == pytest.approx(fresh["evCorrelationScore"], abs=1e-9)
    status, scored = call(served, "/score", neuron(explanation=stored.explanation))
    assert status == 200 and scored["score"] == stored.scores.ev_correlation_score
    assert scored["explanation"]["scoredExcerpts"] == excerpts
    # Another neuron's explanation scores lower on this one; prose the simulator cannot read: null.
    other = ExplanationReader(explained).best("mlp_neuron", 1, 8)
    assert other is not None
    status, control = call(served, "/score", neuron(explanation=other.explanation))
    assert status == 200
    assert control["score"] is None or control["score"] < stored.scores.ev_correlation_score
    status, prose = call(served, "/score", neuron(explanation="words about marriage"))
    assert status == 200 and prose["score"] is None
    assert all(
        set(e["simulatedActivations"]) == {0} for e in prose["explanation"]["scoredExcerpts"]
    )
    # Heads: one true and one simulated value per token pair (q, k <= q).
    head = {"nodeType": "attention_head", "layerIndex": 1, "componentIndex": 2}
    status, body = call(served, "/explain", head)
    assert status == 200, body
    for e in body["explanations"][0]["scoredExcerpts"]:
        n = len(e["tokens"])
        assert len(e["activations"]) == len(e["simulatedActivations"]) == n * (n + 1) // 2


def test_errors_name_the_field(served: Server) -> None:
    status, body = call(served, "/explain", neuron(index=10_000))
    assert status == 404 and body["detail"]["field"] == "componentIndex"
    status, body = call(served, "/existing_explanations", neuron(layerIndex=9))
    assert status == 404 and body["detail"]["field"] == "layerIndex"
    status, body = call(served, "/score", neuron())
    assert status == 422 and "explanation" in body["message"]
    status, body = call(served, "/existing_explanations", neuron(datasetName="nope"))
    assert status == 404 and body["detail"]["field"] == "datasetName"


@pytest.fixture(scope="module")
def model_server(
    default_model: HookedTransformer,
    prose_dir: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Server, Path]]:
    """The default model with a small store of its own layer-0 neurons, explained (and that
    store's path)."""
    path = tmp_path_factory.mktemp("smollm2_store") / "smollm2.sqlite"
    with torch_threads(1):
        collate(
            default_model,
            folder_corpus(prose_dir),
            path,
            n_tokens=16 * 16,
            window_length=16,
            batch_size=16,
            k=5,
            random_sample_size=4,
            quantile_sample_size=2,
            layers=[0],
            families=["mlp_neuron"],
            progress=False,
        )
    explain_store(path, BaselineExplainer(), BaselineSimulator(), BASELINE_METHOD, progress=False)
    log = tmp_path_factory.mktemp("model_server") / "server.log"
    srv = start_server(["--model", "smollm2-135m", "--device", "cpu", "--dataset", str(path)], log)
    yield srv, path
    stop_server(srv)


def test_node_table_rows_carry_the_best_explanation(model_server: tuple[Server, Path]) -> None:
    server, store = model_server
    status, body = call(
        server,
        "/batched_tdb",
        {
            "subRequests": [
                {
                    "prompt": "The capital of France is",
                    "targetTokens": [" Paris"],
                    "distractorTokens": [" London"],
                    "topAndBottomKForNodeTable": 50,
                }
            ]
        },
    )
    assert status == 200, body
    rows = body["subResponses"][0]["nodeTable"]
    best = best_explanations(ExplanationReader(store)._conn, "mlp_neuron", 0)
    layer0 = [
        r for r in rows if r["node"]["nodeType"] == "mlp_neuron" and r["node"]["layerIndex"] == 0
    ]
    others = [r for r in rows if r not in layer0]
    assert layer0 and others
    for r in layer0:
        stored = best[("mlp_neuron", 0, r["node"]["componentIndex"])]
        assert r["explanation"] == stored.explanation
        assert r["explanationScore"] == stored.score
    # Components the store does not hold (other layers, heads): none.
    assert all(r["explanation"] is None and r["explanationScore"] is None for r in others)
