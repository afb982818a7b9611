"""Between wire schemas and the library's request/result objects. No math here."""

from __future__ import annotations

from activation_server import schemas as s
from neuron_explainer.activations import (
    AttentionTraceType,
    NodeAblation,
    NodeIndex,
    NodeTokenViews,
    NodeToTrace,
    NodeType,
    RequestError,
    ScoredToken,
    SubRequest,
    SubResult,
)
from neuron_explainer.activations.processing import (
    DerivedScalarsQuery,
    Query,
    QueryResult,
    ScoredTokensQuery,
    TokenPairQuery,
    TopKQuery,
)

AUTOENCODER_HINT = (
    "no autoencoder is loaded for this layer type; start the server with --autoencoder PATH"
)


def node_index(m: s.NodeIndexModel, fld: str) -> NodeIndex:
    if m.node_type == "autoencoder_latent":
        raise RequestError(f"{fld}.nodeType", AUTOENCODER_HINT)
    return NodeIndex(
        NodeType(m.node_type),
        m.layer_index,
        m.token_index,
        m.component_index,
        m.attended_token_index,
    )


def node_model(n: NodeIndex) -> s.NodeIndexModel:
    node_type: s.NodeTypeName = "autoencoder_latent" if n.node_type.is_latent else n.node_type.value  # type: ignore[assignment]
    return s.NodeIndexModel(
        node_type=node_type,
        layer_index=n.layer,
        token_index=n.token,
        component_index=n.component,
        attended_token_index=n.attended_token,
    )


def _trace(m: s.NodeToTraceModel | None, fld: str) -> NodeToTrace | None:
    if m is None:
        return None
    kind = AttentionTraceType(m.attention_trace_type) if m.attention_trace_type else None
    return NodeToTrace(node_index(m.node, f"{fld}.node"), kind)


def sub_request(m: s.InferenceRequestSpec, fld: str) -> SubRequest:
    req = SubRequest(
        prompt=m.prompt,
        target_tokens=list(m.target_tokens),
        distractor_tokens=list(m.distractor_tokens),
        loss_fn=m.loss_fn,
        node_ablations=[
            NodeAblation(node_index(a.node, f"{fld}.nodeAblations[{i}].node"), a.value)
            for i, a in enumerate(m.node_ablations)
        ],
        upstream_node_to_trace=_trace(m.upstream_node_to_trace, f"{fld}.upstreamNodeToTrace"),
        downstream_node_to_trace=_trace(m.downstream_node_to_trace, f"{fld}.downstreamNodeToTrace"),
        prepend_bos=m.prepend_bos,
    )
    if isinstance(m, s.TdbSubRequest):
        if m.component_type_for_mlp == "autoencoder_latent":
            raise RequestError(f"{fld}.componentTypeForMlp", AUTOENCODER_HINT)
        if m.component_type_for_attention == "autoencoder_latent":
            raise RequestError(f"{fld}.componentTypeForAttention", AUTOENCODER_HINT)
        req.top_and_bottom_k = m.top_and_bottom_k_for_node_table
        req.token_views = m.token_views
        req.token_view_k = m.token_view_k
    return req


def scored(tokens: list[ScoredToken]) -> list[s.ScoredTokenModel]:
    return [
        s.ScoredTokenModel(token=t.token, text=t.text, score=t.score, probability=t.probability)
        for t in tokens
    ]


def token_views(v: NodeTokenViews) -> s.NodeTokenViewsModel:
    return s.NodeTokenViewsModel(
        upvoted_output_tokens=scored(v.upvoted_output_tokens),
        downvoted_output_tokens=scored(v.downvoted_output_tokens),
        upvoting_input_tokens=scored(v.upvoting_input_tokens),
        downvoting_input_tokens=scored(v.downvoting_input_tokens),
        upvoting_key_tokens=scored(v.upvoting_key_tokens),
        downvoting_key_tokens=scored(v.downvoting_key_tokens),
    )


def node_table(r: SubResult) -> list[s.NodeRow]:
    rows = []
    for j, node in enumerate(r.nodes):
        values = {metric: r.metrics[metric][j] for metric in r.metrics}
        views = r.token_views.get(node)
        rows.append(
            s.NodeRow(
                node=node_model(node),
                token_views=token_views(views) if views is not None else None,
                **values,
            )
        )
    return rows


def tdb_response(r: SubResult) -> s.TdbSubResponse:
    return s.TdbSubResponse(
        token_ids=r.tokens,
        token_strings=r.token_strings,
        read_position=r.read_position,
        direction_value=r.direction_value,
        bias_direct_effect=r.bias_direct_effect,
        trace_description=r.trace_description,
        node_table=node_table(r),
        token_sums={key: s.TokenSums(**sums) for key, sums in r.token_sums.items()},
        top_output_tokens=scored(r.top_logits),
        bottom_output_tokens=scored(r.bottom_logits),
        target_tokens=scored(r.target_logits),
        distractor_tokens=scored(r.distractor_logits),
    )


def query(m: s.ProcessingSpec, fld: str) -> Query:
    if isinstance(m, s.DerivedScalarsSpec):
        return DerivedScalarsQuery(
            NodeType(m.node_type), m.metric, m.layer_index, m.component_indices
        )
    if isinstance(m, s.TopKSpec):
        return TopKQuery(tuple(NodeType(t) for t in m.node_types), tuple(m.metrics), m.k)
    if isinstance(m, s.ScoredTokensSpec):
        return ScoredTokensQuery(
            [node_index(n, f"{fld}.nodes[{i}]") for i, n in enumerate(m.nodes)], m.k
        )
    return TokenPairQuery(m.layer_index, m.query_token_index, m.direction)


def query_result(spec: s.ProcessingSpec, r: QueryResult) -> s.ProcessingResult:
    return s.ProcessingResult(
        spec_type=spec.spec_type,
        values=r.values,
        node_table=node_table(r.result) if r.result is not None else None,
        token_views=[token_views(v) for v in r.token_views] if r.token_views else None,
    )
