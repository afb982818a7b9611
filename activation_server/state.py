"""What the app holds: the model (or none), its engine and worker, the server settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from activation_server.body_limit import DEFAULT_MAX_BODY_BYTES
from activation_server.datasets import DatasetRegistry
from activation_server.errors import NoModelError
from activation_server.jobs import DEFAULT_BUDGET_TOKENS, CollationJob
from activation_server.worker import DEFAULT_REQUEST_TIMEOUT_S, ModelWorker
from neuron_explainer.activations import Engine
from neuron_explainer.models import HookedTransformer

DEFAULT_MAX_RESPONSE_BYTES = 512 * 2**20


@dataclass
class Settings:
    max_prompt_tokens: int | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_merged_rows: int = 16  # 1 disables merging of concurrent debugger requests
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies are a 413 (body_limit.py)
    # Resource limits (docs/api.md, "Limits"): a request whose response is estimated larger is a
    # 413 before it runs (None: no cap); one not answered this many seconds after it was queued
    # is a 504 and its work is stopped (None: no deadline).
    max_response_bytes: int | None = DEFAULT_MAX_RESPONSE_BYTES
    request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S
    ui_dir: str | None = None  # built UI files; default neuron_viewer/dist when present
    datasets: list[str] = field(default_factory=list)  # [FAMILY=]PATH|URL specs (datasets.py)
    # TDB's explanation files, [FAMILY=]PATH|URL specs (explanation_files.py)
    explanations: list[str] = field(default_factory=list)
    # Build a store of the default corpus for the model in the background when none is complete:
    # the model spec to collate (None: never), and the token budget.
    auto_dataset_model: str | None = None
    auto_dataset_tokens: int = DEFAULT_BUDGET_TOKENS
    # Then explain every component of that store with the no-LLM baseline (also in the background).
    auto_explain: bool = True
    # Access (access.py): Host names answered besides loopback ones (None: any Host, no check),
    # and the token every API request must carry (None: none needed).
    allowed_hosts: list[str] | None = None
    auth_token: str | None = None


@dataclass
class ServerState:
    settings: Settings
    model: HookedTransformer | None = None
    engine: Engine | None = None
    worker: ModelWorker | None = None
    datasets: DatasetRegistry = field(default_factory=DatasetRegistry)
    jobs: dict[str, CollationJob] = field(default_factory=dict)


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.tdb
    return state


def model_worker(request: Request) -> ModelWorker:
    """Dependency of inference endpoints: the worker, or 503 when no model is loaded."""
    state = server_state(request)
    if state.worker is None:
        raise NoModelError()
    return state.worker
