"""The text-only simulator (endpoints without log-probabilities): its reply parsing with known
answers; a real run in-process through the local backend on the tiny store; and `tdb explain`'s
choice of simulator for a real served model, directly and behind an endpoint that answers no
log-probabilities."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuron_explainer.cli.explanations import _llm_simulator
from neuron_explainer.explanations import ExcerptLimits, ExplanationError, explain_store
from neuron_explainer.explanations.llm import (
    PROMPT_VERSION,
    AllAtOnceSimulator,
    LLMExplainer,
    LocalBackend,
    OpenAIBackend,
    llm_method,
)
from neuron_explainer.explanations.text_simulator import (
    TextSimulator,
    parse_simulation,
    show_token,
    simulation_messages,
)
from neuron_explainer.models import HookedTransformer
from tests.servers import Proxy, Server, proxy_to

TOKENS = ["The", " year", " 1969", ",", "\n", " men", " landed"]


@pytest.fixture
def store(tiny_store: Path, tmp_path: Path) -> Path:
    path = tmp_path / "store.sqlite"
    shutil.copy(tiny_store, path)
    return path


def test_parse_known_answers() -> None:
    exact = "<start>\nThe\t0\n year\t1\n 1969\t10\n,\t0\n\\n\t0\n men\t2\n landed\t3\n<end>"
    assert parse_simulation(exact, TOKENS).tolist() == [0, 1, 10, 0, 0, 2, 3]
    # Other separators, quotes, stripped spaces: the same values.
    loose = "The: 0\nyear = 1\n'1969' -> 10\n, 0\n\\n\t0\nmen\t2\nlanded | 3"
    assert parse_simulation(loose, TOKENS).tolist() == [0, 1, 10, 0, 0, 2, 3]
    # Extra lines (one before, one among the tokens) are skipped by aligning on the texts.
    extra = (
        "Here you go:\t5\nThe\t0\nyear\t1\n1969\t10\n(a year)\t7\n,\t0\n\\n\t0\nmen\t2\nlanded\t3"
    )
    assert parse_simulation(extra, TOKENS).tolist() == [0, 1, 10, 0, 0, 2, 3]
    # Missing lines: those tokens are predicted 0, the others keep their values.
    missing = "The\t4\nyear\t1\n1969\t10\nmen\t2\nlanded\t3"
    assert parse_simulation(missing, TOKENS).tolist() == [4, 1, 10, 0, 0, 2, 3]
    # Values alone, one per token: read in order.
    assert parse_simulation("0\n1\n10\n0\n0\n2\n3", TOKENS).tolist() == [0, 1, 10, 0, 0, 2, 3]
    # A value above 10 is no value; a token that is a number keeps its own value.
    assert parse_simulation("The\t0\nyear\t12\n1969\t9", TOKENS[:3]).tolist() == [0, 0, 9]


def test_too_little_to_read_is_a_failure_with_its_reason() -> None:
    # The small model's typical failure: the tokens echoed without values.
    echo = "<start>\nThe\n year\n 1969\n,\n men\n landed\n<end>"
    with pytest.raises(ExplanationError, match="values for 0 of the excerpt's 7 tokens"):
        parse_simulation(echo, TOKENS)
    with pytest.raises(ExplanationError, match="values for 2 of the excerpt's 7 tokens"):
        parse_simulation("The\t0\nyear\t1", TOKENS)


def test_prompt_shows_each_token_on_one_line() -> None:
    messages = simulation_messages("years", TOKENS)
    assert [role for role, _ in messages] == ["system", "user", "assistant", "user"]
    body = messages[-1][1].split("<start>\n")[1].split("\n<end>")[0]
    assert body.splitlines() == [show_token(t) for t in TOKENS]
    assert show_token("a\tb\n") == "a\\tb\\n"


def test_text_simulator_through_the_local_backend(
    store: Path, default_model: HookedTransformer
) -> None:
    backend = LocalBackend(default_model)
    method = llm_method(backend, "text")
    limits = ExcerptLimits(explain_top=1, score_top=1, score_random=0, with_quantiles=False)
    summary = explain_store(
        store,
        LLMExplainer(backend),
        TextSimulator(backend),
        method,
        limits,
        families=["mlp_neuron"],
        limit=1,
        progress=False,
    )
    assert summary.explained + summary.failed == 1
    with sqlite3.connect(store) as conn:
        methods = conn.execute(
            "SELECT explainer, simulator, model, prompt_version FROM explanation_methods"
        ).fetchall()
        rows = conn.execute(
            "SELECT explanation, ev_correlation_score, n_scored_excerpts, error FROM explanations"
        ).fetchall()
    assert methods == [("llm", "text", "smollm2-135m", PROMPT_VERSION)]
    [(explanation, score, n_scored, error)] = rows
    # Either scored on the one held-out excerpt, or failed with the reason the reply gave.
    if error is None:
        assert explanation and n_scored == 1 and (score is None or -1 <= score <= 1)
    else:
        assert explanation is None and ("text simulator" in error or "explanation" in error)


class NoLogprobs(Proxy):
    """An endpoint that answers like one without log-probabilities: the real server's answers,
    with `logprobs` null in completions."""

    def answer(self, body: bytes | None) -> tuple[int, dict[str, str], bytes]:
        answer = json.loads(self.forward(body))
        for choice in answer.get("choices") or []:
            choice["logprobs"] = None
        return 200, {}, json.dumps(answer).encode()


@pytest.fixture
def no_logprobs(server: Server) -> Iterator[str]:
    with proxy_to(server, NoLogprobs) as url:
        yield url


def test_auto_picks_the_text_simulator_without_logprobs(
    server: Server, no_logprobs: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """What `tdb explain --simulator auto` (the default) runs: all at once where the endpoint
    answers prompt log-probabilities (tdb serve's /v1), the text simulator where it does not."""
    with_logprobs = OpenAIBackend(server.url + "/v1")
    simulator, name = _llm_simulator("auto", with_logprobs)
    assert isinstance(simulator, AllAtOnceSimulator) and name == "all_at_once"
    assert capsys.readouterr().err == ""
    without = OpenAIBackend(no_logprobs)
    simulator, name = _llm_simulator("auto", without)
    assert isinstance(simulator, TextSimulator) and name == "text"
    assert "answers without prompt log-probabilities: simulating with the text-only simulator" in (
        capsys.readouterr().err
    )
    # Asked for by name, each is used as asked.
    assert _llm_simulator("text", with_logprobs)[1] == "text"
    assert _llm_simulator("all_at_once", without)[1] == "all_at_once"
    # The recorded method names the simulator.
    assert llm_method(without, name).simulator == "text"
