"""The LLM explainer and simulator through OpenAI's API: `tdb explain --explainer URL` against a
second real server (`tdb serve` with the default model), faults (an unreachable endpoint is one
error naming the URL and the store is left as it was; 429 answers are retried after a backoff; a
reply without an explanation records that component as failed and the batch goes on)."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from neuron_explainer.datasets import DatasetStore
from neuron_explainer.explanations import ExplanationError, explain_store
from neuron_explainer.explanations.llm import (
    LLM_LIMITS,
    AllAtOnceSimulator,
    LLMExplainer,
    OpenAIBackend,
    clean_explanation,
    expected_value,
    llm_method,
)
from tests.servers import ROOT, Proxy, Server, free_port, proxy_to


def tdb(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "neuron_explainer.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def store(tiny_store: Path, tmp_path: Path) -> Path:
    path = tmp_path / "store.sqlite"
    shutil.copy(tiny_store, path)
    return path


def test_explain_through_a_served_model(server: Server, store: Path, tmp_path: Path) -> None:
    import os

    env = {**os.environ, "TDB_CACHE": str(tmp_path / "cache")}
    args = ["explain", str(store), "--explainer", server.url + "/v1", "--families", "mlp_neuron"]
    run = tdb(*args, "--limit", "1", env=env)
    assert run.returncode == 0, run.stderr
    with sqlite3.connect(store) as conn:
        methods = conn.execute(
            "SELECT explainer, simulator, model, prompt_version FROM explanation_methods"
        ).fetchall()
        rows = conn.execute(
            "SELECT layer, idx, explanation, ev_correlation_score, n_scored_excerpts, error "
            "FROM explanations"
        ).fetchall()
    assert methods == [("llm", "all_at_once", "smollm2-135m", "bills2023-1")]
    assert len(rows) == 1
    with DatasetStore(store) as ds:
        for layer, index, explanation, score, n_scored, error in rows:
            assert error is None, error
            assert explanation and "\n" not in explanation
            # Scored on the held-out excerpts of an LLM method (few, never those shown).
            held_out = LLM_LIMITS.split(ds.record("mlp_neuron", layer, index)).score
            assert n_scored == len(held_out) > 0
            assert score is None or -1 <= score <= 1
    # Every answer was cached on disk: the same run on a copy of the store asks nothing new and
    # writes the same rows.
    cached = sorted((tmp_path / "cache" / "llm-cache").iterdir())
    assert cached
    again = tmp_path / "again.sqlite"
    shutil.copy(store, again)
    with sqlite3.connect(again) as conn:
        conn.execute("DELETE FROM explanations")
    assert tdb(*args[:1], str(again), *args[2:], "--limit", "1", env=env).returncode == 0
    assert sorted((tmp_path / "cache" / "llm-cache").iterdir()) == cached
    with sqlite3.connect(again) as conn:
        again_rows = conn.execute(
            "SELECT layer, idx, explanation, ev_correlation_score, n_scored_excerpts, error "
            "FROM explanations"
        ).fetchall()
    assert again_rows == rows


def test_unreachable_endpoint_is_one_error_and_writes_nothing(store: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    before = digest(store)
    run = tdb("explain", str(store), "--explainer", url, "--no-cache")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdb: error: cannot reach " + url)
    assert digest(store) == before


class Throttling(Proxy):
    """Answers 429 to the first `refusals` requests, then passes them on to the real server."""

    refusals = 0

    def answer(self, body: bytes | None) -> tuple[int, dict[str, str], bytes]:
        cls = type(self)
        if cls.refusals > 0:
            cls.refusals -= 1
            return 429, {"Retry-After": "0"}, b""
        return super().answer(body)


@pytest.fixture
def throttled(server: Server) -> Iterator[str]:
    Throttling.refusals = 0
    with proxy_to(server, Throttling) as url:
        yield url


def test_429_is_retried_after_a_backoff(throttled: str) -> None:
    backend = OpenAIBackend(throttled, model="smollm2-135m", backoff_s=0.01)
    Throttling.refusals = 2
    reply = backend.chat([("user", "Say hello.")], max_tokens=3)
    assert reply and backend.retried == 2
    # The all-at-once simulator's read of the prompt: a distribution at every placeholder.
    predicted = AllAtOnceSimulator(backend).simulate(
        "the word hello", "mlp_neuron", [_record(["Hi", " hello", " there"])]
    )
    assert predicted[0].shape == (3,) and np.all((predicted[0] >= 0) & (predicted[0] <= 10))


def _record(tokens: list[str]):  # type: ignore[no-untyped-def]
    from neuron_explainer.datasets import ActivationRecord

    return ActivationRecord(tokens, [0.0] * len(tokens), 0)


class SilentBackend:
    """A model that answers nothing: what a malformed reply looks like to the explainer."""

    name = "silent"

    def chat(self, messages: object, max_tokens: int) -> str:
        return "\n \n"

    def prompt_logprobs(self, prompt: str, top: int) -> list[tuple[int, dict[str, float]]]:
        return []


def test_malformed_reply_records_failure_and_the_batch_goes_on(store: Path) -> None:
    backend = SilentBackend()
    summary = explain_store(
        store,
        LLMExplainer(backend),
        AllAtOnceSimulator(backend),
        llm_method(backend),
        LLM_LIMITS,
        families=["mlp_neuron"],
        limit=3,
        progress=False,
    )
    assert summary.failed == 3 and summary.explained == 0
    with DatasetStore(store) as ds:
        rows = ds._conn.execute("SELECT explanation, error FROM explanations").fetchall()
    assert len(rows) == 3
    assert all(e is None and "holds no explanation" in err for e, err in rows)


def test_reply_cleaning_and_expected_value() -> None:
    lead = "the main thing this neuron does is find"
    assert clean_explanation('The main thing this neuron does is find "dates".\nMore', lead) == (
        "dates"
    )
    with pytest.raises(ExplanationError):
        clean_explanation("  ", lead)
    assert expected_value({"0": np.log(0.5), " 10": np.log(0.25), "x": 0.0}) == pytest.approx(
        10 * 0.25 / 0.75
    )
    assert expected_value({"a": -1.0}) == 0.0
