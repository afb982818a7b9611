"""`tdb serve --explanations PATH|URL`: TDB's published explanation files (`<layer>/<index>.jsonl`)
beside the datasets, from a folder (as `tdb export-explanations` writes) and from a real local HTTP
server; their explanations reach node-table rows, `/neuron_record` and `/existing_explanations`; a
component without a file has none; an unreachable URL is one error at startup."""

from __future__ import annotations

import functools
import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuron_explainer.explanations import (
    ExplanationReader,
    Scores,
)
from neuron_explainer.explanations.tdb_format import TdbExplanation, write_tdb_explanations
from tests.datasets.conftest import (  # noqa: F401
    prose_dir,
    tiny_model,
    tiny_model_dir,
    tiny_store,
)
from tests.datasets.helpers import explained_copy
from tests.servers import ROOT, Server, call, free_port, start_server, stop_server

D_MLP, N_LAYERS = 96, 2  # the tiny model's


def has_file(index: int) -> bool:
    return index % 5 != 0  # every fifth neuron has no file


def file_text(layer: int, index: int) -> str:
    return f"neuron {layer}/{index} of the files"


def write_files(root: Path) -> None:
    """TDB files for the tiny model's MLP neurons (not every fifth), score index / 100."""
    for layer in range(N_LAYERS):
        for index in range(D_MLP):
            if has_file(index):
                e = TdbExplanation(file_text(layer, index), Scores(index / 100, None, None))
                write_tdb_explanations(root, "mlp_neuron", layer, index, [e])


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real HTTP server (python's http.server in a thread) serving `<layer>/<index>.jsonl`."""
    root = tmp_path_factory.mktemp("tdb-explanations")
    write_files(root / "neurons")
    handler = functools.partial(Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/neurons"
    httpd.shutdown()


@pytest.fixture(scope="module")
def model_server(
    http_files: str,
    tiny_model_dir: Path,  # noqa: F811
    tiny_store: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    """The tiny model, its store with the baseline's head explanations only, and the MLP
    neurons' explanations from TDB files over HTTP."""
    folder = tmp_path_factory.mktemp("files_model_server")
    store = explained_copy(tiny_store, folder, ["attention_head"])
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--dataset", str(store)]
    srv = start_server([*args, "--explanations", http_files], folder / "server.log")
    yield srv
    stop_server(srv)


def neuron(layer: int, index: int) -> dict[str, object]:
    return {"nodeType": "mlp_neuron", "layerIndex": layer, "componentIndex": index}


def test_files_over_http_reach_node_table_and_records(model_server: Server) -> None:
    prompt = {"prompt": "The cat sat on the mat because it was", "targetTokens": [" warm"]}
    body = {"subRequests": [{**prompt, "distractorTokens": [" cold"]}]}
    status, out = call(model_server, "/batched_tdb", body)
    assert status == 200, out
    rows = out["subResponses"][0]["nodeTable"]
    mlp = [r for r in rows if r["node"]["nodeType"] == "mlp_neuron"]
    assert any(r["explanation"] is not None for r in mlp)
    for r in mlp:
        layer, index = r["node"]["layerIndex"], r["node"]["componentIndex"]
        if has_file(index):
            assert r["explanation"] == file_text(layer, index)
            assert r["explanationScore"] == pytest.approx(index / 100)
        else:  # no file: no explanation, and the request still answers
            assert r["explanation"] is None and r["explanationScore"] is None
    # Heads keep the store's explanations.
    heads = [r for r in rows if r["node"]["nodeType"] == "attention_head"]
    assert heads and all(r["explanation"] for r in heads)
    # /neuron_record and /existing_explanations carry the file's explanation, with its method.
    status, record = call(model_server, "/neuron_record", neuron(1, 7))
    assert status == 200, record
    assert record["explanation"]["explanation"] == file_text(1, 7)
    assert record["explanation"]["evCorrelationScore"] == pytest.approx(0.07)
    assert record["explanation"]["method"] == {
        "explainer": "tdb-files",
        "simulator": "tdb-files",
        "model": "",
        "promptVersion": "published",
    }
    status, found = call(model_server, "/existing_explanations", neuron(0, 3))
    assert status == 200 and [e["explanation"] for e in found["explanations"]] == [file_text(0, 3)]
    status, record = call(model_server, "/neuron_record", neuron(1, 10))  # no file
    assert status == 200 and record["explanation"] is None
    status, found = call(model_server, "/existing_explanations", neuron(1, 10))
    assert status == 200 and found["explanations"] == []


def test_exported_folder_joins_the_stores_explanations(
    tiny_store: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    store = explained_copy(tiny_store, tmp_path, ["mlp_neuron"])
    files = tmp_path / "exported"
    write_files(files / "mlp_neuron")  # tdb export-explanations' <family>/<layer>/<index>.jsonl
    srv = start_server(
        ["--no-model", "--dataset", str(store), "--explanations", str(files)],
        tmp_path / "server.log",
    )
    try:
        stored = ExplanationReader(store).best("mlp_neuron", 1, 42)
        assert stored is not None
        status, found = call(srv, "/existing_explanations", neuron(1, 42))
        assert status == 200, found
        both = {e["method"]["explainer"]: e for e in found["explanations"]}
        assert both["baseline"]["explanation"] == stored.explanation
        assert both["tdb-files"]["explanation"] == file_text(1, 42)
        assert both["tdb-files"]["score"] == pytest.approx(0.42)
        # Best score first, whichever it is.
        scores = [e["score"] if e["score"] is not None else -2 for e in found["explanations"]]
        assert scores == sorted(scores, reverse=True)
        status, found = call(srv, "/existing_explanations", neuron(1, 40))  # no file
        assert [e["method"]["explainer"] for e in found["explanations"]] == ["baseline"]
    finally:
        stop_server(srv)


def test_unreachable_url_is_one_error_at_startup() -> None:
    url = f"http://127.0.0.1:{free_port()}/explanations"
    run = subprocess.run(
        [sys.executable, "-m", "activation_server", "--no-model", "--port", str(free_port()),
         "--explanations", url],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --explanations: cannot reach {url}")
