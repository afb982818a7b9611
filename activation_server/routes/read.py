"""Read endpoints: collated datasets (no model needed) and background jobs."""

from __future__ import annotations

import math
from dataclasses import asdict

from fastapi import APIRouter, Request

from activation_server import schemas as s
from activation_server.errors import NotFoundError
from activation_server.state import server_state
from neuron_explainer.activations import RequestError
from neuron_explainer.datasets import (
    ActivationRecord,
    ComponentNotFoundError,
    ComponentRecord,
    DatasetNotFoundError,
)
from neuron_explainer.datasets.families import LATENT_FAMILY_OF_SIDE
from neuron_explainer.datasets.sources import (
    DatasetInfo,
    DatasetRegistry,
    all_records,
    normalize,
    token_summaries,
)

router = APIRouter(tags=["datasets"])
SIDE_OF_LATENT_FAMILY = {family: side for side, family in LATENT_FAMILY_OF_SIDE.items()}


def _registry(request: Request) -> DatasetRegistry:
    return server_state(request).datasets


def _number(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _info(info: DatasetInfo) -> s.DatasetInfoModel:
    return s.DatasetInfoModel.model_validate(asdict(info))


async def lookup(
    request: Request, family: str, layer: int, index: int, dataset: str | None, field: str
) -> tuple[DatasetInfo, ComponentRecord]:
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


def _statistics(record: ComponentRecord) -> dict[str, object]:
    return {
        "max_activation": _number(record.maxActivation),
        "mean": _number(record.mean),
        "variance": _number(record.variance),
        "skewness": _number(record.skewness),
        "kurtosis": _number(record.kurtosis),
        "fraction_active": record.fractionActive,
        "dead": record.dead,
        "quantile_boundaries": record.quantileBoundaries,
    }


def _record_family(request: Request, body: s.NeuronRecordRequest) -> str:
    """The component family a /neuron_record request reads: mlp_neuron, or the latent family of
    the autoencoder side asked for; with no side, the one latent family the datasets hold for the
    layer (400 when they hold both)."""
    if body.node_type != "autoencoder_latent":
        return body.node_type
    if body.autoencoder_side is not None:
        return LATENT_FAMILY_OF_SIDE[body.autoencoder_side]
    held = {
        family
        for info in _registry(request).infos()
        if body.dataset_name in (None, info.name, info.location)
        and (info.layers is None or body.layer_index in info.layers)
        for family in info.families
        if family in SIDE_OF_LATENT_FAMILY
    }
    if len(held) > 1:
        raise RequestError(
            "autoencoderSide",
            f"the datasets hold MLP-side and attention-side latents of layer {body.layer_index}: "
            "say which (mlp or attention)",
        )
    return held.pop() if held else LATENT_FAMILY_OF_SIDE["mlp"]


@router.get("/neuron_datasets_metadata", response_model=s.DatasetsMetadataResponse)
async def neuron_datasets_metadata(request: Request) -> s.DatasetsMetadataResponse:
    """The collated datasets this server reads: stores (with their progress while being built)
    and TDB JSON layouts."""
    return s.DatasetsMetadataResponse(datasets=[_info(i) for i in _registry(request).infos()])


@router.post("/neuron_datasets_metadata", response_model=s.DatasetsMetadataResponse)
async def post_neuron_datasets_metadata(request: Request) -> s.DatasetsMetadataResponse:
    """The same as GET (TDB's clients POST it)."""
    return await neuron_datasets_metadata(request)


@router.post("/neuron_record", response_model=s.NeuronRecordResponse)
async def neuron_record(body: s.NeuronRecordRequest, request: Request) -> s.NeuronRecordResponse:
    """Top-activating and random excerpts of an MLP neuron (or latent) with raw activations and
    activations normalized by the dataset max, and its statistics."""
    family = _record_family(request, body)
    info, record = await lookup(
        request, family, body.layer_index, body.component_index, body.dataset_name, "componentIndex"
    )
    scale = record.maxActivation

    def one(r: ActivationRecord) -> s.ActivationRecordModel:
        return s.ActivationRecordModel(
            tokens=r.tokens,
            activations=r.activations,
            normalized_activations=normalize(r.activations, scale),
            window_index=r.windowIndex,
        )

    return s.NeuronRecordResponse(
        dataset=_info(info),
        node_type=body.node_type,
        autoencoder_side=SIDE_OF_LATENT_FAMILY.get(family),
        layer_index=body.layer_index,
        component_index=body.component_index,
        most_positive_activation_records=[one(r) for r in record.mostPositiveActivationRecords],
        random_sample=[one(r) for r in record.randomSample],
        random_sample_by_quantile=None
        if record.randomSampleByQuantile is None
        else [[one(r) for r in group] for group in record.randomSampleByQuantile],
        **_statistics(record),  # type: ignore[arg-type]
    )


@router.post("/attention_head_record", response_model=s.AttentionHeadRecordResponse)
async def attention_head_record(
    body: s.AttentionHeadRecordRequest, request: Request
) -> s.AttentionHeadRecordResponse:
    """Top-activating and random excerpts of an attention head, per token pair (its write
    magnitude), with per-token summaries (total/max in and out), raw and normalized."""
    info, record = await lookup(
        request, "attention_head", body.layer_index, body.head_index, body.dataset_name, "headIndex"
    )
    scale = record.maxActivation
    summaries = {id(r): token_summaries(len(r.tokens), r.activations) for r in all_records(record)}
    total_in_scale = max((max(t.totalIn, default=0.0) for t in summaries.values()), default=0.0)
    total_out_scale = max((max(t.totalOut, default=0.0) for t in summaries.values()), default=0.0)

    def one(r: ActivationRecord) -> s.PairActivationRecordModel:
        t = summaries[id(r)]
        return s.PairActivationRecordModel(
            tokens=r.tokens,
            activations=r.activations,
            normalized_activations=normalize(r.activations, scale),
            window_index=r.windowIndex,
            summaries=s.TokenSummariesModel(
                total_in=t.totalIn, max_in=t.maxIn, total_out=t.totalOut, max_out=t.maxOut
            ),
            normalized_summaries=s.TokenSummariesModel(
                total_in=normalize(t.totalIn, total_in_scale),
                max_in=normalize(t.maxIn, scale),
                total_out=normalize(t.totalOut, total_out_scale),
                max_out=normalize(t.maxOut, scale),
            ),
        )

    return s.AttentionHeadRecordResponse(
        dataset=_info(info),
        layer_index=body.layer_index,
        head_index=body.head_index,
        most_positive_activation_records=[one(r) for r in record.mostPositiveActivationRecords],
        random_sample=[one(r) for r in record.randomSample],
        random_sample_by_quantile=None
        if record.randomSampleByQuantile is None
        else [[one(r) for r in group] for group in record.randomSampleByQuantile],
        **_statistics(record),  # type: ignore[arg-type]
    )


@router.get("/jobs", response_model=s.JobsResponse, tags=["operations"])
async def jobs(request: Request) -> s.JobsResponse:
    """Background jobs (the default dataset's collation) and their progress."""
    state = server_state(request)
    return s.JobsResponse(
        jobs=[s.JobModel.model_validate(asdict(j.status())) for j in state.jobs.values()]
    )
