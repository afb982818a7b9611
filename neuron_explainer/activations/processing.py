"""General requests: one engine pass per row, then named processing specs read from its state.

This is the library side of the server's `/batched`, `/derived_scalars` and
`/derived_attention_scalars`: a row is an inference spec (a `SubRequest`: prompt, `D`, ablations,
trace) plus queries answered from the same forward/backward pass:

- `DerivedScalarsQuery`: every value of one derived scalar in one layer;
- `TopKQuery`: the node table (the engine's own top/bottom-k selection);
- `ScoredTokensQuery`: token-space views of chosen nodes;
- `TokenPairQuery`: token-pair attribution of a residual direction at one query token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from neuron_explainer.activations.derived_scalars import (
    METRICS,
    REGISTRY,
    PassState,
    token_pair_attribution,
)
from neuron_explainer.activations.engine import (
    NODE_TYPES,
    Engine,
    NodeTokenViews,
    SubRequest,
    SubResult,
)
from neuron_explainer.activations.nodes import NodeAblation, NodeIndex, NodeType, RequestError
from neuron_explainer.activations.token_views import node_token_views


@dataclass(frozen=True)
class DerivedScalarsQuery:
    node_type: NodeType
    metric: str = "activation"
    layer: int = 0
    components: Sequence[int] | None = None  # None: all


@dataclass(frozen=True)
class TopKQuery:
    node_types: Sequence[NodeType] = NODE_TYPES
    metrics: Sequence[str] = METRICS
    k: int = 10


@dataclass(frozen=True)
class ScoredTokensQuery:
    nodes: Sequence[NodeIndex]
    k: int = 10


@dataclass(frozen=True)
class TokenPairQuery:
    layer: int
    query_token: int
    direction: Sequence[float]


Query = DerivedScalarsQuery | TopKQuery | ScoredTokensQuery | TokenPairQuery


@dataclass
class QueryResult:
    """`values`: nested lists (see each query); `result`: the row's engine result (top-k);
    `token_views`: one per node of a ScoredTokensQuery."""

    values: list[Any] | None = None
    result: SubResult | None = None
    token_views: list[NodeTokenViews] = field(default_factory=list)


@dataclass
class BatchedRow:
    request: SubRequest
    queries: dict[str, Query]


def run_batched(
    engine: Engine, rows: Sequence[BatchedRow], field_prefix: str = "subRequests"
) -> list[tuple[SubResult, dict[str, QueryResult]]]:
    """Run every row in one batch and answer its queries from the shared pass."""
    cfg = engine.model.cfg
    requests = []
    for i, row in enumerate(rows):
        where = f"{field_prefix}[{i}].processingRequestSpecByName"
        top_ks = [q for q in row.queries.values() if isinstance(q, TopKQuery)]
        if len(top_ks) > 1:
            raise RequestError(where, "at most one top_k spec per sub-request")
        extra: list[tuple[NodeType, str]] = []
        wants_views = False
        for name, q in row.queries.items():
            fld = f"{where}.{name}"
            if isinstance(q, DerivedScalarsQuery):
                engine.check_layer(q.node_type, q.layer, f"{fld}.layerIndex")
                _check_metric(q.metric, f"{fld}.metric")
                n_comp = engine.n_components(q.node_type, q.layer)
                for c in q.components or ():
                    if not 0 <= c < n_comp:
                        raise RequestError(
                            f"{fld}.componentIndices",
                            f"component {c} is out of range [0, {n_comp})",
                        )
                extra.append((q.node_type, q.metric))
            elif isinstance(q, ScoredTokensQuery):
                wants_views = True
                for nd in q.nodes:
                    if nd.node_type == NodeType.MLP_NEURON or nd.node_type.is_latent:
                        extra.append((nd.node_type, "activation"))
                    elif nd.node_type == NodeType.ATTENTION_HEAD:
                        extra.append((nd.node_type, "write_magnitude"))
                        if nd.attended_token is None:
                            raise RequestError(
                                f"{fld}.nodes.attendedTokenIndex", "a head pair needs one"
                            )
            elif isinstance(q, TokenPairQuery):
                engine.check_layer(NodeType.ATTENTION_HEAD, q.layer, f"{fld}.layerIndex")
                if len(q.direction) != cfg.d_model:
                    raise RequestError(
                        f"{fld}.direction",
                        f"needs {cfg.d_model} values (d_model), got {len(q.direction)}",
                    )
                extra.append((NodeType.ATTENTION_HEAD, "write_magnitude"))
            else:
                for m in q.metrics:
                    _check_metric(m, f"{fld}.metrics")
        top = top_ks[0] if top_ks else None
        requests.append(
            replace(
                row.request,
                top_and_bottom_k=top.k if top else 0,
                node_types=tuple(top.node_types) if top else (),
                metrics=tuple(top.metrics) if top else (),
                token_views=wants_views or (top is not None and row.request.token_views),
                extra_scalars=tuple(dict.fromkeys(extra)),
            )
        )

    answers: list[dict[str, QueryResult]] = [{} for _ in rows]

    lengths = [len(engine.prompt_tokens(i, r, field_prefix)) for i, r in enumerate(requests)]

    def inspect(state: PassState) -> None:
        for i, row in enumerate(rows):
            for name, q in row.queries.items():
                fld = f"{field_prefix}[{i}].processingRequestSpecByName.{name}"
                answers[i][name] = _answer(engine, state, i, lengths[i], q, fld)

    results = engine.run(requests, inspect=inspect, field_prefix=field_prefix)
    for i, row in enumerate(rows):
        for name, q in row.queries.items():
            if isinstance(q, TopKQuery):
                answers[i][name] = QueryResult(result=results[i])
    return list(zip(results, answers, strict=True))


def _answer(engine: Engine, state: PassState, i: int, n: int, q: Query, fld: str) -> QueryResult:
    if isinstance(q, DerivedScalarsQuery):
        values = REGISTRY[(q.node_type, q.metric)].fn(state, q.layer)[i]
        if q.node_type == NodeType.ATTENTION_HEAD:  # [H, q, k]
            values = values[:, :n, :n]
            if q.components is not None:
                values = values[list(q.components)]
        else:  # [n, C]
            values = values[:n]
            if q.components is not None:
                values = values[:, list(q.components)]
        return QueryResult(values=values.float().tolist())
    if isinstance(q, ScoredTokensQuery):
        for j, nd in enumerate(q.nodes):
            engine.validate_node(nd, n, f"{fld}.nodes[{j}]")
        views = node_token_views(engine.model, state, i, list(q.nodes), q.k)
        return QueryResult(token_views=[views[nd] for nd in q.nodes])
    if isinstance(q, TokenPairQuery):
        if not 0 <= q.query_token < n:
            raise RequestError(
                f"{fld}.queryTokenIndex", f"token {q.query_token} is out of range for {n} tokens"
            )
        direction = torch.tensor(q.direction, device=engine.model.device)
        values = token_pair_attribution(state, q.layer, direction, q.query_token)[i]
        return QueryResult(values=values[: q.query_token + 1].float().tolist())
    return QueryResult()


def _check_metric(metric: str, fld: str) -> None:
    if metric not in METRICS:
        raise RequestError(fld, f"unknown metric {metric!r}; use one of {METRICS}")


# ---- one component on a prompt ---------------------------------------------------------------------


def component_values(
    engine: Engine,
    request: SubRequest,
    node_type: NodeType,
    layer: int,
    component: int,
    metric: str = "activation",
) -> tuple[SubResult, list[float] | list[list[float]]]:
    """One component's metric on a prompt: per token (neurons, latents, embeddings), or for a
    head its lower triangle of pairs, row q holding keys 0..q."""
    query = DerivedScalarsQuery(node_type, metric, layer, [component])
    engine.check_layer(node_type, layer, "layerIndex")
    n_components = engine.n_components(node_type, layer)
    if node_type != NodeType.EMBEDDING and not 0 <= component < n_components:
        field_name = "headIndex" if node_type == NodeType.ATTENTION_HEAD else "componentIndex"
        raise RequestError(field_name, f"component {component} is out of range [0, {n_components})")
    loss = request.loss_fn if request.target_tokens else "zero"
    if metric in ("direct_effect", "estimated_total_effect") and loss == "zero":
        raise RequestError("targetTokens", f"the {metric} needs at least one target token")
    result, answers = run_batched(
        engine, [BatchedRow(replace(request, loss_fn=loss), {"values": query})], "request"
    )[0]
    values = answers["values"].values
    assert values is not None
    if node_type == NodeType.ATTENTION_HEAD:
        pairs = values[0]
        return result, [pairs[t][: t + 1] for t in range(len(pairs))]
    return result, [row[0] for row in values]


# ---- generation under ablations --------------------------------------------------------------------


def generate(
    engine: Engine,
    prompt: str | Sequence[int],
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    node_ablations: Sequence[NodeAblation] = (),
    prepend_bos: bool = False,
) -> list[int]:
    """A continuation of the prompt with the ablations held on every step (the positions of the
    ablated nodes are prompt positions)."""
    request = SubRequest(
        prompt, loss_fn="zero", node_ablations=node_ablations, prepend_bos=prepend_bos
    )
    tokens = engine.prompt_tokens(0, request, field_prefix="")
    if len(tokens) + max_new_tokens > engine.model.cfg.n_ctx:
        raise RequestError(
            "maxNewTokens",
            f"{len(tokens)} prompt tokens + {max_new_tokens} exceed the context of "
            f"{engine.model.cfg.n_ctx}",
        )
    for j, abl in enumerate(node_ablations):
        engine.validate_node(abl.node, len(tokens), f"nodeAblations[{j}].node")
    hooks = engine.ablation_hooks([list(node_ablations)])
    with torch.no_grad(), engine.model.hooks(fwd=hooks):
        new = engine.model.generate(
            torch.tensor(tokens, device=engine.model.device),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
    return [int(t) for t in new.tolist()]
