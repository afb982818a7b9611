"""Read endpoints: collated datasets (no model needed) and background jobs."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request

from activation_server import schemas as s
from activation_server.datasets import DatasetRegistry
from activation_server.errors import NotFoundError, documented
from activation_server.state import server_state
from neuron_explainer.activations import NodeType, RequestError
from neuron_explainer.activations.nodes import by_api_name, describe
from neuron_explainer.datasets.normalization import (
    NormalizedActivationRecord,
    NormalizedComponentRecord,
    normalize_record,
)
from neuron_explainer.datasets.records import (
    ComponentNotFoundError,
    ComponentRecord,
    DatasetNotFoundError,
)
from neuron_explainer.explanations import Method, Scores, StoredExplanation

router = APIRouter(tags=["datasets"])


def _registry(request: Request) -> DatasetRegistry:
    return server_state(request).datasets


def _number(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


async def lookup(
    request: Request, family: str, layer: int, index: int, dataset: str | None, field: str
) -> tuple[s.DatasetInfoModel, ComponentRecord]:
    """The record, or a 404 naming what is missing (`field` names the index in the request)."""
    try:
        return await _registry(request).record(family, layer, index, dataset)
    except DatasetNotFoundError as e:
        raise NotFoundError("datasetName", str(e)) from e
    except ComponentNotFoundError as e:
        layers = next(
            (i.layers for i in _registry(request).infos() if dataset in (None, i.name, i.location)),
            None,
        )
        raise NotFoundError(
            "layerIndex" if layers and layer not in layers else field, str(e)
        ) from e


def explanation_model(
    text: str | None,
    scores: Scores,
    n_scored: int,
    method: Method,
    dataset: str,
    error: str | None = None,
    scored_excerpts: list[s.ScoredExcerptModel] | None = None,
) -> s.ExplanationModel:
    return s.ExplanationModel(
        explanation=text,
        score=scores.best,
        ev_correlation_score=scores.ev_correlation_score,
        rsquared_score=scores.rsquared_score,
        absolute_dev_explained_score=scores.absolute_dev_explained_score,
        roc_auc_score=scores.roc_auc_score,
        n_scored_excerpts=n_scored,
        method=s.ExplanationMethodModel(
            explainer=method.explainer,
            simulator=method.simulator,
            model=method.model,
            prompt_version=method.prompt_version,
        ),
        error=error,
        dataset_name=dataset,
        scored_excerpts=scored_excerpts,
    )


def stored_explanation_model(e: StoredExplanation, dataset: str) -> s.ExplanationModel:
    return explanation_model(
        e.explanation, e.scores, e.n_scored_excerpts, e.method, dataset, error=e.error
    )


async def best_explanation(
    request: Request, family: str, layer: int, index: int, dataset: str
) -> s.ExplanationModel | None:
    """The best-scoring explanation (of any method, failed ones never) the dataset holds."""
    _, found = await _registry(request).explanations(family, layer, index, dataset)
    best = next((e for e in found if not e.failed), None)
    return None if best is None else stored_explanation_model(best, dataset)


def _statistics(record: ComponentRecord) -> dict[str, Any]:
    """The statistics fields of a record response (JSON has no NaN: null)."""
    return {
        "max_activation": _number(record.max_activation),
        "mean": _number(record.mean),
        "variance": _number(record.variance),
        "skewness": _number(record.skewness),
        "kurtosis": _number(record.kurtosis),
        "fraction_active": record.fraction_active,
        "dead": record.dead,
        "quantile_boundaries": record.quantile_boundaries,
    }


def _activation_records(
    normalized: NormalizedComponentRecord, model: type[s.ActivationRecordModel]
) -> dict[str, Any]:
    """The activation-record fields of a record response, each record as `model`."""

    def one(r: NormalizedActivationRecord) -> s.ActivationRecordModel:
        return model.model_validate(asdict(r))

    by_quantile = normalized.random_sample_by_quantile
    return {
        "most_positive_activation_records": [
            one(r) for r in normalized.most_positive_activation_records
        ],
        "random_sample": [one(r) for r in normalized.random_sample],
        "random_sample_by_quantile": None
        if by_quantile is None
        else [[one(r) for r in group] for group in by_quantile],
    }


def _record_family(request: Request, body: s.NeuronRecordRequest) -> str:
    """The component family a /neuron_record request reads: that of its node type (families are
    named as the library names node types), for latents that of the side asked for; with no side,
    the one latent family the datasets hold for the layer (400 when they hold both)."""
    candidates = by_api_name(body.node_type, body.autoencoder_side)
    if not candidates:  # a side given on a node type without sides
        raise RequestError("autoencoder_side", "only autoencoder latents have one")
    if len(candidates) == 1:
        return candidates[0].value
    families = {t.value for t in candidates}
    held = {
        family
        for info in _registry(request).infos()
        if body.dataset_name in (None, info.name, info.location)
        and (info.layers is None or body.layer_index in info.layers)
        for family in info.families
        if family in families
    }
    if len(held) > 1:
        raise RequestError(
            "autoencoder_side",
            f"the datasets hold MLP-side and attention-side latents of layer {body.layer_index}: "
            "say which (mlp or attention)",
        )
    return held.pop() if held else by_api_name(body.node_type, "mlp")[0].value


@router.get("/neuron_datasets_metadata", response_model=s.DatasetsMetadataResponse)
async def neuron_datasets_metadata(request: Request) -> s.DatasetsMetadataResponse:
    """The collated datasets this server reads: stores (with their progress while being built)
    and TDB JSON layouts."""
    return s.DatasetsMetadataResponse(datasets=_registry(request).infos())


@router.post(
    "/neuron_datasets_metadata",
    response_model=s.DatasetsMetadataResponse,
    responses=documented(413),
)
async def post_neuron_datasets_metadata(request: Request) -> s.DatasetsMetadataResponse:
    """The same as GET (TDB's clients POST it)."""
    return await neuron_datasets_metadata(request)


@router.post(
    "/neuron_record",
    response_model=s.NeuronRecordResponse,
    responses=documented(400, 404, 413, 422),
)
async def neuron_record(body: s.NeuronRecordRequest, request: Request) -> s.NeuronRecordResponse:
    """Top-activating and random excerpts of an MLP neuron (or latent) with raw activations and
    activations normalized by the dataset max, and its statistics."""
    family = _record_family(request, body)
    info, record = await lookup(
        request, family, body.layer_index, body.component_index, body.dataset_name, "componentIndex"
    )
    return s.NeuronRecordResponse(
        dataset=info,
        node_type=body.node_type,
        autoencoder_side=describe(NodeType(family)).autoencoder_side,
        layer_index=body.layer_index,
        component_index=body.component_index,
        explanation=await best_explanation(
            request, family, body.layer_index, body.component_index, info.name
        ),
        **_activation_records(normalize_record(record), s.ActivationRecordModel),
        **_statistics(record),
    )


@router.post(
    "/attention_head_record",
    response_model=s.AttentionHeadRecordResponse,
    responses=documented(404, 413, 422),
)
async def attention_head_record(
    body: s.AttentionHeadRecordRequest, request: Request
) -> s.AttentionHeadRecordResponse:
    """Top-activating and random excerpts of an attention head, per token pair (its write
    magnitude), with per-token summaries (total/max in and out), raw and normalized."""
    info, record = await lookup(
        request, "attention_head", body.layer_index, body.head_index, body.dataset_name, "headIndex"
    )
    return s.AttentionHeadRecordResponse(
        dataset=info,
        layer_index=body.layer_index,
        head_index=body.head_index,
        explanation=await best_explanation(
            request, "attention_head", body.layer_index, body.head_index, info.name
        ),
        **_activation_records(normalize_record(record), s.PairActivationRecordModel),
        **_statistics(record),
    )


@router.get("/jobs", response_model=s.JobsResponse, tags=["operations"])
async def jobs(request: Request) -> s.JobsResponse:
    """Background jobs (the default dataset's collation) and their progress."""
    state = server_state(request)
    return s.JobsResponse(
        jobs=[s.JobModel.model_validate(asdict(j.status())) for j in state.jobs.values()]
    )
