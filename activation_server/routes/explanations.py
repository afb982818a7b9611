"""Explanations of collated components, with TDB's route names: `/existing_explanations` (what the
datasets hold), `/explain` (the baseline explainer, run now) and `/score` (an explanation scored on
the component's held-out excerpts). No model needed. Thin: the work is
`neuron_explainer.explanations`."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from activation_server import schemas as s
from activation_server.errors import documented
from activation_server.routes import read
from neuron_explainer.activations import RequestError
from neuron_explainer.datasets.records import ComponentRecord
from neuron_explainer.explanations import (
    ALL_EXCERPTS,
    BASELINE_METHOD,
    BaselineExplainer,
    BaselineSimulator,
    Scored,
    explain_and_score,
    score_explanation,
)

router = APIRouter(tags=["explanations"])
ERRORS = documented(400, 404, 413, 422)


def _scored_model(scored: Scored, dataset: str) -> s.ExplanationModel:
    excerpts = [
        s.ScoredExcerptModel(
            tokens=e.tokens,
            activations=e.activations,
            simulated_activations=e.simulated,
            group=e.group,
        )
        for e in scored.excerpts()
    ]
    return read.explanation_model(
        scored.explanation,
        scored.scores,
        len(scored.scored),
        BASELINE_METHOD,
        dataset,
        scored_excerpts=excerpts,
    )


def _family(request: Request, body: s.ExplanationNodeRequest) -> str:
    if body.node_type == "attention_head":
        if body.autoencoder_side is not None:
            raise RequestError("autoencoder_side", "only autoencoder latents have one")
        return "attention_head"
    as_record = s.NeuronRecordRequest(
        dataset_name=body.dataset_name,
        node_type=body.node_type,
        autoencoder_side=body.autoencoder_side,
        layer_index=body.layer_index,
        component_index=body.component_index,
    )
    return read._record_family(request, as_record)


async def _record(
    request: Request, body: s.ExplanationNodeRequest
) -> tuple[s.DatasetInfoModel, ComponentRecord]:
    family = _family(request, body)
    field = "componentIndex"
    return await read.lookup(
        request, family, body.layer_index, body.component_index, body.dataset_name, field
    )


@router.post(
    "/existing_explanations", response_model=s.ExistingExplanationsResponse, responses=ERRORS
)
async def existing_explanations(
    body: s.ExistingExplanationsRequest, request: Request
) -> s.ExistingExplanationsResponse:
    """Every explanation a dataset holds for the component (`tdb explain`), one per method, best
    score first."""
    info, _ = await _record(request, body)  # a 404 for a component no dataset holds
    family = _family(request, body)
    info, found = await read._registry(request).explanations(
        family, body.layer_index, body.component_index, info.name
    )
    return s.ExistingExplanationsResponse(
        explanations=[read.stored_explanation_model(e, info.name) for e in found]
    )


@router.post("/explain", response_model=s.ExplainResponse, responses=ERRORS)
async def explain(body: s.ExplainRequest, request: Request) -> s.ExplainResponse:
    """Explain the component now with the baseline explainer (no model; milliseconds) and score
    the explanation on its held-out excerpts, which the answer holds with the simulated
    activations (`scoredExcerpts`). Nothing is stored."""
    info, record = await _record(request, body)
    scored = await asyncio.to_thread(
        explain_and_score, record, BaselineExplainer(), BaselineSimulator(), ALL_EXCERPTS
    )
    return s.ExplainResponse(explanations=[_scored_model(scored, info.name)], dataset=info)


@router.post("/score", response_model=s.ScoreResponse, responses=ERRORS)
async def score(body: s.ScoreRequest, request: Request) -> s.ScoreResponse:
    """Score an explanation of the component on its held-out excerpts with the baseline's
    simulator (which reads explanations in the baseline's form; any other text scores null); the
    answer holds those excerpts with the simulated activations (`scoredExcerpts`)."""
    info, record = await _record(request, body)
    held_out = ALL_EXCERPTS.split(record)
    scored = await asyncio.to_thread(
        score_explanation, record, body.explanation, BaselineSimulator(), held_out
    )
    model = _scored_model(scored, info.name)
    return s.ScoreResponse(score=model.score, explanation=model, dataset=info)
