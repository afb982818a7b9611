"""Between wire schemas and the library's request/result objects. No math here.

On the wire every latent is node type "autoencoder_latent" with an `autoencoderSide`; the library
has one node type per side (mlp_autoencoder_latent, attention_autoencoder_latent). Requests may
leave the side out where the layer holds one autoencoder only (`latent_node_type` resolves it).
"""

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
from neuron_explainer.activations.engine import LATENT_TYPES, ScoredKeyToken, latent_node_type
from neuron_explainer.activations.processing import (
    DerivedScalarsQuery,
    Query,
    QueryResult,
    ScoredTokensQuery,
    TokenPairQuery,
    TopKQuery,
)
from neuron_explainer.models import HookedTransformer
from neuron_explainer.models.autoencoders import SparseAutoencoder


def node_type(
    model: HookedTransformer,
    name: str,
    layer: int,
    side: s.AutoencoderSideName | None,
    fld: str,
) -> NodeType:
    """The library's node type for a wire node type (and side, for latents). `fld` is the
    prefix of the node's fields in the request."""
    if name == "autoencoder_latent":
        return latent_node_type(model, layer, side, fld)
    if side is not None:
        raise RequestError(
            f"{fld}.autoencoderSide" if fld else "autoencoderSide",
            "only autoencoder latents have one",
        )
    return NodeType(name)


def node_index(m: s.NodeIndexModel, fld: str, model: HookedTransformer) -> NodeIndex:
    return NodeIndex(
        node_type(model, m.node_type, m.layer_index, m.autoencoder_side, fld),
        m.layer_index,
        m.token_index,
        m.component_index,
        m.attended_token_index,
    )


def node_model(n: NodeIndex) -> s.NodeIndexModel:
    latent = n.node_type.is_latent
    return s.NodeIndexModel(
        node_type="autoencoder_latent" if latent else n.node_type.value,  # type: ignore[arg-type]
        layer_index=n.layer,
        token_index=n.token,
        component_index=n.component,
        attended_token_index=n.attended_token,
        autoencoder_side=n.node_type.autoencoder_side if latent else None,
    )


def _trace(m: s.NodeToTraceModel | None, fld: str, model: HookedTransformer) -> NodeToTrace | None:
    if m is None:
        return None
    kind = AttentionTraceType(m.attention_trace_type) if m.attention_trace_type else None
    return NodeToTrace(node_index(m.node, f"{fld}.node", model), kind)


def sub_request(m: s.InferenceRequestSpec, fld: str, model: HookedTransformer) -> SubRequest:
    req = SubRequest(
        prompt=m.prompt,
        target_tokens=list(m.target_tokens),
        distractor_tokens=list(m.distractor_tokens),
        loss_fn=m.loss_fn,
        node_ablations=[
            NodeAblation(node_index(a.node, f"{fld}.nodeAblations[{i}].node", model), a.value)
            for i, a in enumerate(m.node_ablations)
        ],
        upstream_node_to_trace=_trace(
            m.upstream_node_to_trace, f"{fld}.upstreamNodeToTrace", model
        ),
        downstream_node_to_trace=_trace(
            m.downstream_node_to_trace, f"{fld}.downstreamNodeToTrace", model
        ),
        prepend_bos=m.prepend_bos,
    )
    if isinstance(m, s.TdbSubRequest):
        req.component_type_for_mlp = m.component_type_for_mlp
        req.component_type_for_attention = m.component_type_for_attention
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
        token_pair_attributions=[key_token(a) for a in v.token_pair_attributions],
    )


def key_token(a: ScoredKeyToken) -> s.ScoredKeyTokenModel:
    return s.ScoredKeyTokenModel(
        key_token_index=a.key_token_index, token=a.token, text=a.text, score=a.score
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


def query(m: s.ProcessingSpec, fld: str, model: HookedTransformer) -> Query:
    if isinstance(m, s.DerivedScalarsSpec):
        kind = node_type(model, m.node_type, m.layer_index, m.autoencoder_side, fld)
        return DerivedScalarsQuery(kind, m.metric, m.layer_index, m.component_indices)
    if isinstance(m, s.TopKSpec):
        types: list[NodeType] = []
        for t in m.node_types:
            if t != "autoencoder_latent":
                types.append(NodeType(t))
                continue
            held = {ae.cfg.side for ae in model.autoencoders.values()}
            if not held:
                raise RequestError(f"{fld}.nodeTypes", "no autoencoder is loaded (--autoencoder)")
            types += [LATENT_TYPES[side] for side in ("mlp", "attention") if side in held]
        return TopKQuery(tuple(dict.fromkeys(types)), tuple(m.metrics), m.k)
    if isinstance(m, s.ScoredTokensSpec):
        return ScoredTokensQuery(
            [node_index(n, f"{fld}.nodes[{i}]", model) for i, n in enumerate(m.nodes)], m.k
        )
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
