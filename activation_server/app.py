"""The FastAPI app factory: `create_app(model)` wires state, routers, errors, CORS and the UI."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Scope

from activation_server import convert
from activation_server import schemas as s
from activation_server.access import AccessMiddleware, declare_bearer_auth
from activation_server.api_docs import install_docs
from activation_server.body_limit import BodyLimitMiddleware
from activation_server.datasets import DatasetRegistry
from activation_server.errors import RequestIdMiddleware, install_error_handlers
from activation_server.jobs import CollationJob, default_store_path
from activation_server.routes import explanations, inference, openai_compat, read
from activation_server.state import ServerState, Settings, server_state
from activation_server.worker import ModelWorker
from neuron_explainer.activations import Engine
from neuron_explainer.datasets import DatasetError, DatasetStore
from neuron_explainer.explanations import BASELINE_METHOD
from neuron_explainer.explanations.batch import unexplained
from neuron_explainer.models import HookedTransformer

log = logging.getLogger("activation_server")
DEFAULT_UI_DIR = Path(__file__).resolve().parent.parent / "neuron_viewer" / "dist"

ops = APIRouter(tags=["operations"])


@ops.get("/health", response_model=s.HealthResponse)
async def health(request: Request) -> s.HealthResponse:
    """Liveness; says whether a model is loaded, what the model is doing and what waits for it."""
    state = server_state(request)
    worker = state.worker
    running, queue = worker.status() if worker is not None else ([], [])
    return s.HealthResponse(
        model_loaded=state.model is not None,
        model_name=state.model.cfg.name if state.model is not None else None,
        queued_requests=len(queue),
        running=[convert.worker_request(j) for j in running],
        queue=[convert.worker_request(j) for j in queue],
        batches_run=worker.batches_run if worker is not None else 0,
        requests_merged=worker.requests_merged if worker is not None else 0,
        requests_cancelled=worker.requests_cancelled if worker is not None else 0,
        requests_timed_out=worker.requests_timed_out if worker is not None else 0,
        runs_stopped=worker.runs_stopped if worker is not None else 0,
    )


@ops.get("/node_types", response_model=s.NodeTypesResponse)
async def node_types(request: Request) -> s.NodeTypesResponse:
    """Every node type the server knows, described (labels, metrics, how the API names it);
    with a model loaded, where its nodes are. Answers without a model too (the dataset viewer)."""
    return s.NodeTypesResponse(node_types=convert.node_type_infos(server_state(request).model))


def create_app(model: HookedTransformer | None, settings: Settings | None = None) -> FastAPI:
    """An app serving `model` (None: a read-only server, inference endpoints answer 503)."""
    settings = settings or Settings()
    state = ServerState(settings=settings, model=model)
    if model is not None:
        state.engine = Engine(
            model,
            settings.max_prompt_tokens,
            max_result_bytes=settings.max_response_bytes,
            result_limit_name="the server's --max-response-mb",
        )

    check = DatasetRegistry()
    for spec in settings.datasets:
        check.add(spec)  # a missing folder or unknown family fails here, before serving
    for spec in settings.explanations:  # and an unreachable explanations URL
        check.add_explanations(spec).check()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for spec in settings.datasets:  # in command-line order: lookups take the first match
            if spec.startswith(("http://", "https://")):
                await state.datasets.add_url_root(spec)
            else:
                state.datasets.add(spec)
        for spec in settings.explanations:
            state.datasets.add_explanations(spec)
        if state.engine is not None:
            state.worker = ModelWorker(
                state.engine, settings.max_merged_rows, settings.request_timeout_s
            )
            # Background jobs wait while the model runs requests (jobs.py).
            state.worker.on_busy = lambda busy: pause_jobs(state, busy)
            state.worker.start()
        if settings.auto_dataset_model is not None:
            await _start_default_collation(state, settings.auto_dataset_model)
        yield
        for job in state.jobs.values():
            await job.stop()
        if state.worker is not None:
            await state.worker.stop()
        await state.datasets.close()

    app = FastAPI(
        title="Transformer debugger activation server",
        version="0.1.0",
        summary="Activations, ablations, upstream traces and derived scalars of a transformer.",
        lifespan=lifespan,
        docs_url=None,  # served from this machine by install_docs, not from a CDN
        redoc_url=None,
    )
    app.state.tdb = state
    install_error_handlers(app)
    app.include_router(inference.router)
    app.include_router(read.router)
    app.include_router(openai_compat.router)
    app.include_router(explanations.router)
    app.include_router(ops)
    # Order matters: the last added middleware is the outermost. CORS wraps the request-id
    # middleware, so the contract's 500 responses get CORS headers too.
    # The Host check and the token come first inside them, before anything reads the request.
    # Innermost, after them: the body limit, which reads the body (body_limit.py).
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        AccessMiddleware, allowed_hosts=settings.allowed_hosts, auth_token=settings.auth_token
    )
    if settings.auth_token:
        declare_bearer_auth(app)
    app.add_middleware(RequestIdMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["x-request-id"],
        )
    install_docs(app)  # before the UI, whose mount at "/" takes every path left
    _mount_ui(app, Path(settings.ui_dir) if settings.ui_dir else DEFAULT_UI_DIR)
    return app


def pause_jobs(state: ServerState, paused: bool) -> None:
    for job in state.jobs.values():
        if paused:
            job.pause()
        else:
            job.resume()


async def _start_default_collation(state: ServerState, model: str) -> None:
    """Serve the model's default store, building it in the background unless it is complete."""
    tokens = state.settings.auto_dataset_tokens
    path = default_store_path(model, tokens)
    state.datasets.add(str(path))
    if path.is_file():
        try:
            with DatasetStore(path) as store:
                complete = store.metadata().status == "complete"
            if complete:
                if state.settings.auto_explain:
                    await _start_default_explanations(state, path)
                return
        except DatasetError:
            pass  # created but never committed: collate starts it afresh
    device = str(state.model.device) if state.model is not None else None
    job = CollationJob.for_default_store(model, tokens, path, device=device)
    if state.settings.auto_explain:
        job.then = lambda: _start_default_explanations(state, path)
    state.jobs[job.state.id] = job
    await job.start()
    log.info(
        "building %s in the background (%s); progress at GET /jobs", path, job.state.description
    )


async def _start_default_explanations(state: ServerState, path: Path) -> None:
    """Explain every component of the complete default store with the no-LLM baseline in the
    background, unless every one has its baseline explanation already."""
    try:
        missing = await asyncio.to_thread(unexplained, path, BASELINE_METHOD)
    except (DatasetError, sqlite3.Error) as e:
        log.warning("not explaining %s: %s", path, e)
        return
    if missing == 0:
        return
    job = CollationJob.for_baseline_explanations(path)
    state.jobs[job.state.id] = job
    await job.start()
    log.info("explaining %s in the background (%d components left)", path, missing)


class SinglePageApp(StaticFiles):
    """The built UI: files as they are; any other GET path gets index.html, so the UI's own
    routes (/debugger?..., /<model>/<nodeType>/<layer>/<index>) load from a shared link.

    Mounted at "/", it sees every request no API route took: a wrong method on an API path is a
    405 and any non-GET request a 404, both in the error contract, never the UI's HTML."""

    def __init__(self, directory: Path, api_paths: Callable[[], set[str]]) -> None:
        super().__init__(directory=directory, html=True)
        self._api_paths = api_paths

    async def get_response(self, path: str, scope: Scope) -> Response:
        url_path = scope["path"]
        if url_path in self._api_paths():
            raise StarletteHTTPException(405, f"{scope['method']} is not allowed on {url_path}")
        if scope["method"] not in ("GET", "HEAD"):
            raise StarletteHTTPException(404, f"no endpoint {scope['method']} {url_path}")
        try:
            response = await super().get_response(path, scope)
        except StarletteHTTPException as e:
            if e.status_code != 404 or path.startswith("assets/"):
                raise  # a missing script or style is a 404, not the page
            response = await super().get_response("index.html", scope)
        if response.status_code == 404 and not path.startswith("assets/"):
            response = await super().get_response("index.html", scope)
        return response


def _mount_ui(app: FastAPI, ui_dir: Path) -> None:
    if (ui_dir / "index.html").is_file():

        def api_paths() -> set[str]:
            return set(app.openapi()["paths"])  # built once, then cached by FastAPI

        app.mount("/", SinglePageApp(ui_dir, api_paths), name="ui")
        return

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def no_ui() -> str:
        return (
            "<!doctype html><title>Transformer debugger</title>"
            "<p>The activation server is running, but the UI is not built "
            f"(no {ui_dir}/index.html). Build it with <code>make ui</code>, "
            "or use the API: <a href='/docs'>/docs</a>, <a href='/openapi.json'>/openapi.json</a>."
        )
