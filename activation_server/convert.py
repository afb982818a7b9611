"""Between wire schemas and the library's request/result objects. No math here.

On the wire a node type is its description's `api_name` (both latent types are
"autoencoder_latent", told apart by `autoencoderSide`; a request may leave the side out where the
layer holds one autoencoder only). Errors raised while converting carry library field paths
relative to the converted value; callers prefix them with `at(...)` (errors.py maps them to wire
names).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from activation_server import schemas as s
from activation_server.worker import JobStatus
from neuron_explainer.activations import (
    AttentionTraceType,
    NodeAblation,
    NodeIndex,
    NodeTokenViews,
    NodeToTrace,
    NodeType,
    ScoredKeyToken,
    ScoredToken,
    SubRequest,
    SubResult,
    describe,
    node_types,
)
from neuron_explainer.activations.derived_scalars import METRICS, scalar
from neuron_explainer.activations.node_types.autoencoder_latents import HOW_TO_LOAD
from neuron_explainer.activations.nodes import RequestError, at
from neuron_explainer.activations.processing import (
    BatchedSubRequest,
    DerivedScalarsQuery,
    Query,
    QueryResult,
    ScoredTokensQuery,
    TokenPairQuery,
    TopKQuery,
)
from neuron_explainer.activations.validation import resolve_api_node_type
from neuron_explainer.explanations.store import StoredExplanation
from neuron_explainer.models import HookedTransformer
from neuron_explainer.models.autoencoders import SparseAutoencoder


def node_type(
    model: HookedTransformer, name: str, layer: int, side: s.AutoencoderSideName | None
) -> NodeType:
    """The library's node type for a wire node type (and side, for latents)."""
    return resolve_api_node_type(model, name, layer, side)


def node_index(m: s.NodeIndexModel, model: HookedTransformer) -> NodeIndex:
    return NodeIndex(
        node_type(model, m.node_type, m.layer_index, m.autoencoder_side),
        m.layer_index,
        m.token_index,
        m.component_index,
        m.attended_token_index,
    )


def node_model(n: NodeIndex) -> s.NodeIndexModel:
    desc = describe(n.node_type)
    return s.NodeIndexModel(
        node_type=desc.api_name,
        layer_index=n.layer,
        token_index=n.token,
        component_index=n.component,
        attended_token_index=n.attended_token,
        autoencoder_side=desc.autoencoder_side,
    )


def _trace(m: s.NodeToTraceModel | None, model: HookedTransformer) -> NodeToTrace | None:
    if m is None:
        return None
    kind = AttentionTraceType(m.attention_trace_type) if m.attention_trace_type else None
    with at("node"):
        return NodeToTrace(node_index(m.node, model), kind)


def ablations(items: list[s.NodeAblationModel], model: HookedTransformer) -> list[NodeAblation]:
    out = []
    for i, a in enumerate(items):
        with at("node_ablations", i, "node"):
            out.append(NodeAblation(node_index(a.node, model), a.value))
    return out


def sub_request(m: s.InferenceRequestSpec, model: HookedTransformer) -> SubRequest:
    with at("upstream_node_to_trace"):
        upstream = _trace(m.upstream_node_to_trace, model)
    with at("downstream_node_to_trace"):
        downstream = _trace(m.downstream_node_to_trace, model)
    req = SubRequest(
        prompt=m.prompt,
        target_tokens=list(m.target_tokens),
        distractor_tokens=list(m.distractor_tokens),
        loss_fn=m.loss_fn,
        node_ablations=ablations(m.node_ablations, model),
        upstream_node_to_trace=upstream,
        downstream_node_to_trace=downstream,
        prepend_bos=m.prepend_bos,
    )
    if isinstance(m, s.TdbSubRequest):
        req.component_type_for_mlp = m.component_type_for_mlp
        req.component_type_for_attention = m.component_type_for_attention
        req.top_and_bottom_k = m.top_and_bottom_k_for_node_table
        req.token_views = m.token_views
        req.token_view_k = m.token_view_k
    return req


def tdb_sub_requests(body: s.BatchedTdbRequest, model: HookedTransformer) -> list[SubRequest]:
    out = []
    for i, r in enumerate(body.sub_requests):
        with at(i):
            out.append(sub_request(r, model))
    return out


def batched_sub_requests(
    body: s.BatchedRequest, model: HookedTransformer
) -> list[BatchedSubRequest]:
    subs = []
    for i, sub in enumerate(body.sub_requests):
        with at(i, "request"):
            request = sub_request(sub.inference_request_spec, model)
        queries = {}
        for name, spec in sub.processing_request_spec_by_name.items():
            with at(i, "queries", name):
                queries[name] = query(spec, model)
        subs.append(BatchedSubRequest(request, queries))
    return subs


def scored(tokens: list[ScoredToken]) -> list[s.ScoredTokenModel]:
    return [
        s.ScoredTokenModel(token=t.token, text=t.text, score=t.score, probability=t.probability)
        for t in tokens
    ]


def key_token(a: ScoredKeyToken) -> s.ScoredKeyTokenModel:
    return s.ScoredKeyTokenModel(
        key_token_index=a.key_token_index, token=a.token, text=a.text, score=a.score
    )


def token_views(v: NodeTokenViews) -> s.NodeTokenViewsModel:
    return s.NodeTokenViewsModel(
        upvoted_output_tokens=scored(v.upvoted_output_tokens),
        downvoted_output_tokens=scored(v.downvoted_output_tokens),
        upvoting_input_tokens=scored(v.upvoting_input_tokens),
        downvoting_input_tokens=scored(v.downvoting_input_tokens),
        upvoting_key_tokens=scored(v.upvoting_key_tokens),
        downvoting_key_tokens=scored(v.downvoting_key_tokens),
        token_pair_attributions=[key_token(a) for a in v.token_pair_attributions],
    )


# (family, layer, index) -> the component's best stored explanation, or None.
ExplanationLookup = Callable[[str, int, int], StoredExplanation | None]


def node_table(r: SubResult, explain: ExplanationLookup | None = None) -> list[s.NodeRow]:
    """The node table's rows; `explain` (if any) gives each component's best explanation."""
    rows = []
    for j, node in enumerate(r.nodes):
        values = {metric: r.metrics[metric][j] for metric in r.metrics}
        views = r.token_views.get(node)
        best = explain(node.node_type.value, node.layer, node.component) if explain else None
        rows.append(
            s.NodeRow(
                node=node_model(node),
                token_views=token_views(views) if views is not None else None,
                explanation=best.explanation if best is not None else None,
                explanation_score=best.score if best is not None else None,
                **values,
            )
        )
    return rows


def tdb_response(r: SubResult, explain: ExplanationLookup | None = None) -> s.TdbSubResponse:
    return s.TdbSubResponse(
        token_ids=r.tokens,
        token_strings=r.token_strings,
        read_position=r.read_position,
        direction_value=r.direction_value,
        bias_direct_effect=r.bias_direct_effect,
        trace_description=r.trace_description,
        node_table=node_table(r, explain),
        token_sums={key: s.TokenSums(**sums) for key, sums in r.token_sums.items()},
        top_output_tokens=scored(r.top_logits),
        bottom_output_tokens=scored(r.bottom_logits),
        target_tokens=scored(r.target_logits),
        distractor_tokens=scored(r.distractor_logits),
    )


def query(m: s.ProcessingSpec, model: HookedTransformer) -> Query:
    if isinstance(m, s.DerivedScalarsSpec):
        kind = node_type(model, m.node_type, m.layer_index, m.autoencoder_side)
        return DerivedScalarsQuery(kind, m.metric, m.layer_index, m.component_indices)
    if isinstance(m, s.TopKSpec):
        types: list[NodeType] = []
        for name in m.node_types:
            present = [t for t in node_types() if describe(t).api_name == name]
            if len(present) > 1:  # latents of every side the model holds
                present = [t for t in present if describe(t).layers(model)]
                if not present:
                    raise RequestError("node_types", f"no autoencoder is loaded ({HOW_TO_LOAD})")
            types += present
        return TopKQuery(tuple(dict.fromkeys(types)), tuple(m.metrics), m.k)
    if isinstance(m, s.ScoredTokensSpec):
        nodes = []
        for i, n in enumerate(m.nodes):
            with at("nodes", i):
                nodes.append(node_index(n, model))
        return ScoredTokensQuery(nodes, m.k)
    return TokenPairQuery(m.layer_index, m.query_token_index, m.direction)


def query_result(spec: s.ProcessingSpec, r: QueryResult) -> s.ProcessingResult:
    return s.ProcessingResult(
        spec_type=spec.spec_type,
        values=r.values,
        node_table=node_table(r.result) if r.result is not None else None,
        token_views=[token_views(v) for v in r.token_views] if r.token_views else None,
    )


def autoencoder_info(ae: SparseAutoencoder) -> s.AutoencoderInfo:
    cfg = ae.cfg
    assert cfg.layer is not None and cfg.side is not None  # attach_autoencoder checked it
    return s.AutoencoderInfo(
        name=cfg.hook_name,
        hook_name=cfg.hook_name,
        layer_index=cfg.layer,
        autoencoder_side=cfg.side,
        n_latents=cfg.n_latents,
        d_in=cfg.d_in,
        activation=cfg.activation,
        k=cfg.k,
        input_normalization=cfg.normalize,
        format=str(cfg.metadata.get("format", "native")),
        source=cfg.metadata.get("source"),
    )


def node_type_info(node_type: NodeType, model: HookedTransformer | None) -> s.NodeTypeInfo:
    """A node type's description as the UI reads it; with a model, where its nodes are."""
    desc = describe(node_type)
    layers = desc.layers(model) if model is not None else None
    return s.NodeTypeInfo(
        name=desc.name,
        node_type=desc.api_name,
        autoencoder_side=desc.autoencoder_side,
        label=desc.label,
        short_name=desc.short_name,
        key=desc.key,
        writes=desc.writes,
        per_token_pair=desc.per_token_pair,
        traceable=desc.trace is not None,
        replaces=desc.replaces.value if desc.replaces is not None else None,
        dataset_metric=desc.dataset_metric,  # type: ignore[arg-type]
        metrics=[
            s.MetricInfo.model_validate(
                {
                    "name": m,
                    "signed": scalar(node_type, m).signed,
                    "ranked": scalar(node_type, m).ranked,
                }
            )
            for m in METRICS
        ],
        layers=layers,
        widths=None if model is None or layers is None else [desc.width(model, L) for L in layers],
    )


def node_type_infos(model: HookedTransformer | None) -> list[s.NodeTypeInfo]:
    return [node_type_info(t, model) for t in node_types()]


def worker_request(j: JobStatus) -> s.WorkerRequest:
    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")

    return s.WorkerRequest(
        endpoint=j.info.endpoint,
        request_id=j.info.request_id,
        sub_requests=j.info.sub_requests,
        queued_at=iso(j.queued_at),
        started_at=None if j.started_at is None else iso(j.started_at),
        seconds_waiting=round(j.seconds_waiting, 3),
        seconds_running=None if j.seconds_running is None else round(j.seconds_running, 3),
        abandoned=j.abandoned,
    )
