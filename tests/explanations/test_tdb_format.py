"""TDB's explanation files: a file in TDB's published form reads and writes back to the same
JSON; a store's explanations export to `<family>/<layer>/<index>.jsonl` and read back equal, from
a folder and over HTTP."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from neuron_explainer.explanations import (
    BASELINE_METHOD,
    BaselineExplainer,
    BaselineSimulator,
    ExplanationReader,
    explain_store,
)
from neuron_explainer.explanations.tdb_format import (
    read_tdb_explanations,
    to_tdb_json,
)
from tests.servers import ROOT

# One neuron's results in TDB's published form (the fields its files have), with a sequence
# simulation that the store does not keep but a read-and-write must.
TDB_NEURON = {
    "dataclass_name": "NeuronSimulationResults",
    "neuron_id": {"dataclass_name": "NeuronId", "layer_index": 3, "neuron_index": 17},
    "scored_explanations": [
        {
            "dataclass_name": "ScoredExplanation",
            "explanation": "mentions of marriage",
            "scored_simulation": {
                "dataclass_name": "ScoredSimulation",
                "scored_sequence_simulations": [
                    {
                        "dataclass_name": "ScoredSequenceSimulation",
                        "sequence_simulation": {
                            "dataclass_name": "SequenceSimulation",
                            "tokens": [" she", " married"],
                            "expected_activations": [0.1, 7.9],
                            "activation_scale": "simulated_normalized_activations",
                            "distribution_values": [[0, 1], [0, 8]],
                            "distribution_probabilities": [[0.9, 0.1], [0.1, 0.9]],
                        },
                        "true_activations": [0.0, 3.2],
                        "ev_correlation_score": 1.0,
                    }
                ],
                "ev_correlation_score": 0.62,
                "rsquared_score": 0.38,
                "absolute_dev_explained_score": 0.21,
            },
        }
    ],
}
TDB_HEAD = {
    "dataclass_name": "AttentionSimulationResults",
    "attention_head_id": {"dataclass_name": "NeuronId", "layer_index": 1, "neuron_index": 4},
    "scored_explanations": [
        {
            "dataclass_name": "ScoredAttentionExplanation",
            "explanation": "the previous token",
            "scored_attention_simulation": {
                "dataclass_name": "ScoredAttentionSimulation",
                "attention_simulations": [
                    {
                        "dataclass_name": "AttentionSimulation",
                        "tokens": ["a", "b"],
                        "token_pair_coords": [[1, 0]],
                        "token_pair_label": [1],
                        "simulation_prediction": [0.9],
                    }
                ],
                "roc_auc_score": 0.93,
            },
        }
    ],
}


def test_tdb_files_read_and_write_back_the_same(tmp_path: Path) -> None:
    for family, data, layer, index in (
        ("mlp_neuron", TDB_NEURON, 3, 17),
        ("attention_head", TDB_HEAD, 1, 4),
    ):
        folder = tmp_path / family / str(layer)
        folder.mkdir(parents=True)
        (folder / f"{index}.jsonl").write_text(json.dumps(data) + "\n")
        [e] = read_tdb_explanations(tmp_path / family, layer, index)
        assert e.explanation in ("mentions of marriage", "the previous token")
        assert e.scores.best in (0.62, 0.93)
        assert to_tdb_json(family, layer, index, [e]) == data


def test_store_export_round_trip(tiny_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store.sqlite"
    shutil.copy(tiny_store, store)
    explain_store(store, BaselineExplainer(), BaselineSimulator(), BASELINE_METHOD, progress=False)
    out = tmp_path / "tdb"
    run = subprocess.run(
        [sys.executable, "-m", "neuron_explainer.cli", "export-explanations", str(store), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["attention_head", "mlp_neuron"]
    assert len(list((out / "mlp_neuron").glob("*/*.jsonl"))) == 2 * 96
    reader = ExplanationReader(store)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for family, layer, index in [("mlp_neuron", 1, 5), ("attention_head", 0, 2)]:
            [stored] = reader.explanations(family, layer, index)
            for where in (out / family, f"{url}/{family}"):
                [read] = read_tdb_explanations(where, layer, index)
                assert read.explanation == stored.explanation
                if family == "attention_head":  # TDB's head files hold the ROC AUC only
                    assert read.scores.roc_auc_score == stored.scores.roc_auc_score
                else:
                    assert read.scores == stored.scores
    finally:
        server.shutdown()
