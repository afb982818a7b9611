"""Endpoints that run the model. Thin: validate, convert, queue on the worker, convert back."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.background import BackgroundTask

from activation_server import convert
from activation_server import schemas as s
from activation_server.errors import documented, request_id
from activation_server.routes import read
from activation_server.state import model_worker, server_state
from activation_server.worker import BoundWorker, release_memory
from neuron_explainer.activations import (
    NodeType,
    RequestError,
    SubRequest,
    describe,
    node_types,
)
from neuron_explainer.activations.nodes import at
from neuron_explainer.activations.processing import component_values, generate, run_batched
from neuron_explainer.activations.validation import resolve_prepend_bos
from neuron_explainer.datasets.normalization import normalize_by_dataset_max, token_summaries

# The error statuses of an endpoint that runs the model on a request body.
INFERENCE_ERRORS = documented(400, 413, 422, 503, 504)
router = APIRouter(tags=["inference"])
# ... and of one that may also look the component up in the collated datasets (404).
COMPONENT_ERRORS = documented(400, 404, 413, 422, 503, 504)


async def _client_gone(request: Request) -> None:
    """Returns once the client has closed its connection (the body has been read by then: what
    the server receives afterwards is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def request_worker(request: Request) -> BoundWorker:
    """The model worker, for this request: its work shows in /health under this endpoint and is
    dropped or stopped when the client disconnects (docs/api.md, "Concurrency")."""
    return BoundWorker(
        model_worker(request), request.url.path, request_id(request), lambda: _client_gone(request)
    )


Worker = Annotated[BoundWorker, Depends(request_worker)]
# Responses from this size on give their memory back to the system once sent.
RELEASE_MEMORY_ABOVE_BYTES = 4 * 2**20


async def _json_response(build: Callable[[], BaseModel]) -> Response:
    """The response model built and serialized on a thread: a large one takes seconds, during
    which the event loop keeps answering /health and noticing disconnects. The same JSON as
    FastAPI's own serialization of the model."""

    def run() -> bytes:
        model = build()
        return model.__pydantic_serializer__.to_json(model, by_alias=True)

    body = await asyncio.to_thread(run)
    large = len(body) >= RELEASE_MEMORY_ABOVE_BYTES
    return Response(
        body,
        media_type="application/json",
        background=BackgroundTask(release_memory) if large else None,
    )


@router.post("/batched_tdb", response_model=s.BatchedTdbResponse, responses=INFERENCE_ERRORS)
async def batched_tdb(body: s.BatchedTdbRequest, request: Request, worker: Worker) -> Response:
    """The debugger's main call: one forward and one backward over all sub-requests (for
    example left prompt, right prompt and an unablated baseline)."""
    subs = convert.tdb_sub_requests(body, worker.engine.model)
    for i, sub in enumerate(subs):
        with at(i):  # before waiting for the model
            worker.engine.check_prompt_size(sub.prompt, sub.prepend_bos)
    results, timings = await worker.run_tdb(subs)
    explain = server_state(request).datasets.explanation_lookup(worker.engine.model.cfg.name)
    return await _json_response(
        lambda: s.BatchedTdbResponse(
            sub_responses=[convert.tdb_response(r, explain) for r in results], timings=timings
        )
    )


@router.post("/batched", response_model=s.BatchedResponse, responses=INFERENCE_ERRORS)
async def batched(body: s.BatchedRequest, worker: Worker) -> Response:
    """The general form: per sub-request an inference spec and named processing specs
    (derived scalars, top-k, scored tokens, token-pair attribution) answered from one pass."""
    engine = worker.engine
    subs = convert.batched_sub_requests(body, engine.model)
    for i, batched_sub in enumerate(subs):
        with at(i, "request"):
            engine.check_prompt_size(batched_sub.request.prompt, batched_sub.request.prepend_bos)
    answered = await worker.call(lambda: run_batched(engine, subs), sub_requests=len(subs))

    def build() -> s.BatchedResponse:
        out = []
        for sub, (result, answers) in zip(body.sub_requests, answered, strict=True):
            out.append(
                s.BatchedSubResponse(
                    token_ids=result.tokens,
                    token_strings=result.token_strings,
                    direction_value=result.direction_value,
                    processing_results_by_name={
                        name: convert.query_result(spec, answers[name])
                        for name, spec in sub.processing_request_spec_by_name.items()
                    },
                )
            )
        return s.BatchedResponse(sub_responses=out)

    return await _json_response(build)


def _component_request(
    prompt: str | list[int],
    targets: list[str | int],
    distractors: list[str | int],
    prepend_bos: bool | None,
) -> SubRequest:
    return SubRequest(
        prompt=prompt,
        target_tokens=targets,
        distractor_tokens=distractors,
        prepend_bos=prepend_bos,
        token_views=False,
        top_and_bottom_k=0,
    )


async def _dataset_max(
    request: Request,
    body: s.DerivedScalarsRequest | s.DerivedAttentionScalarsRequest,
    node_type: NodeType = NodeType.ATTENTION_HEAD,
) -> float | None:
    """The component's max activation in its collated dataset, when normalization is asked.
    Datasets name their component families as the library names node types."""
    if not body.normalize_by_dataset_max:
        return None
    if isinstance(body, s.DerivedAttentionScalarsRequest):
        family, index, field = node_type.value, body.head_index, "headIndex"
    elif describe(node_type).dataset_metric is not None:
        family, index, field = node_type.value, body.component_index, "componentIndex"
    else:
        raise RequestError("normalizeByDatasetMax", f"no collated datasets of {body.node_type}")
    _, record = await read.lookup(
        request, family, body.layer_index, index, body.dataset_name, field
    )
    scale = record.max_activation
    if not (math.isfinite(scale) and scale > 0):
        raise RequestError(
            "normalizeByDatasetMax",
            f"the dataset max of this component is {scale}: nothing to normalize by",
        )
    return float(scale)


@router.post(
    "/derived_scalars", response_model=s.DerivedScalarsResponse, responses=COMPONENT_ERRORS
)
async def derived_scalars(
    body: s.DerivedScalarsRequest, worker: Worker, request: Request
) -> s.DerivedScalarsResponse:
    """One component's metric at every token of a prompt (a neuron, an autoencoder latent, the
    embedding), optionally normalized by the max activation in its collated dataset (to colour a
    custom prompt like the dataset examples)."""
    engine = worker.engine
    engine.check_prompt_size(body.prompt, body.prepend_bos)
    node_type = convert.node_type(
        engine.model, body.node_type, body.layer_index, body.autoencoder_side
    )
    dataset_max = await _dataset_max(request, body, node_type)
    sub = _component_request(
        body.prompt, list(body.target_tokens), list(body.distractor_tokens), body.prepend_bos
    )
    result, values = await worker.call(
        lambda: component_values(
            engine,
            sub,
            node_type,
            body.layer_index,
            body.component_index,
            body.metric,
        )
    )
    flat = [float(v) for v in values]  # type: ignore[arg-type]
    return s.DerivedScalarsResponse(
        token_ids=result.tokens,
        token_strings=result.token_strings,
        values=flat,
        normalized_values=normalize_by_dataset_max(flat, dataset_max) if dataset_max else None,
        dataset_max=dataset_max,
    )


@router.post(
    "/derived_attention_scalars",
    response_model=s.DerivedAttentionScalarsResponse,
    responses=COMPONENT_ERRORS,
)
async def derived_attention_scalars(
    body: s.DerivedAttentionScalarsRequest, worker: Worker, request: Request
) -> s.DerivedAttentionScalarsResponse:
    """One attention head's metric for every token pair (q, k <= q) of a prompt."""
    worker.engine.check_prompt_size(body.prompt, body.prepend_bos)
    dataset_max = await _dataset_max(request, body)
    sub = _component_request(
        body.prompt, list(body.target_tokens), list(body.distractor_tokens), body.prepend_bos
    )
    engine = worker.engine
    result, values = await worker.call(
        lambda: component_values(
            engine, sub, NodeType.ATTENTION_HEAD, body.layer_index, body.head_index, body.metric
        )
    )
    rows: list[list[float]] = values  # type: ignore[assignment]
    summaries = token_summaries([v for row in rows for v in row], len(rows))
    return s.DerivedAttentionScalarsResponse(
        token_ids=result.tokens,
        token_strings=result.token_strings,
        values=rows,
        normalized_values=[normalize_by_dataset_max(r, dataset_max) for r in rows]
        if dataset_max
        else None,
        dataset_max=dataset_max,
        total_in=summaries.total_in,
        max_in=summaries.max_in,
        total_out=summaries.total_out,
        max_out=summaries.max_out,
    )


@router.post("/tokenize", response_model=s.TokenizeResponse, responses=INFERENCE_ERRORS)
async def tokenize(body: s.TokenizeRequest, request: Request) -> s.TokenizeResponse:
    """Text to tokens with display strings (the prompt editor's live tokenization)."""
    state = server_state(request)
    if state.model is None:
        model_worker(request)  # raises the 503
    assert state.model is not None
    tok = state.model.tokenizer
    if tok is None:
        raise RequestError("text", "this model has no tokenizer")
    ids = tok.encode(body.text)
    if resolve_prepend_bos(state.model, body.text, body.prepend_bos):
        if tok.bos_token_id is None:
            raise RequestError("prependBos", "this tokenizer has no BOS token")
        ids = [tok.bos_token_id, *ids]
    return s.TokenizeResponse(token_ids=ids, token_strings=tok.display_tokens(ids))


@router.post("/generate", response_model=s.GenerateResponse, responses=INFERENCE_ERRORS)
async def generate_text(body: s.GenerateRequest, worker: Worker) -> s.GenerateResponse:
    """Greedy or sampled continuation, optionally with node ablations held on every step."""
    engine = worker.engine
    engine.check_prompt_size(body.prompt, body.prepend_bos)
    ablations = convert.ablations(body.node_ablations, engine.model)
    new = await worker.call(
        lambda: generate(
            engine,
            body.prompt,
            max_new_tokens=body.max_new_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            seed=body.seed,
            node_ablations=ablations,
            prepend_bos=body.prepend_bos,
        )
    )
    tok = engine.model.tokenizer
    return s.GenerateResponse(
        completion=tok.decode(new) if tok else "",
        token_ids=new,
        token_strings=tok.display_tokens(new) if tok else [str(t) for t in new],
    )


def model_info(request: Request) -> s.ModelInfo:
    state = server_state(request)
    if state.model is None or state.engine is None:
        model_worker(request)  # raises the 503
    assert state.model is not None and state.engine is not None
    cfg, tok = state.model.cfg, state.model.tokenizer
    return s.ModelInfo(
        name=cfg.name,
        architecture=cfg.architecture,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        d_mlp=cfg.d_mlp,
        vocab_size=cfg.vocab_size,
        n_ctx=cfg.n_ctx,
        max_prompt_tokens=state.engine.max_prompt_tokens,
        device=str(state.model.device),
        dtype=str(state.model.dtype).removeprefix("torch."),
        node_types=list(
            dict.fromkeys(
                describe(t).api_name for t in node_types() if describe(t).layers(state.model)
            )
        ),
        node_type_descriptions=convert.node_type_infos(state.model),
        autoencoders=[convert.autoencoder_info(ae) for ae in state.model.autoencoders.values()],
        bos_token=tok.token_display(tok.bos_token_id)
        if tok is not None and tok.bos_token_id is not None
        else None,
        bos_by_default=tok is not None and tok.add_bos_token,
    )


@router.get("/model_info", response_model=s.ModelInfo, responses=documented(503))
async def get_model_info(request: Request) -> s.ModelInfo:
    """The loaded model: name, sizes, device and dtype, loaded autoencoders."""
    return model_info(request)


@router.post("/model_info", response_model=s.ModelInfo, responses=documented(413, 503))
async def post_model_info(request: Request) -> s.ModelInfo:
    """The same as GET (TDB's clients POST it)."""
    return model_info(request)
