"""General requests: one engine pass per batch, then named queries answered from its state.

This is the library side of the server's `/batched`, `/derived_scalars`,
`/derived_attention_scalars` and `/generate`. A `BatchedSubRequest` is a `SubRequest` (prompt, `D`,
ablations, trace) plus queries answered from the same forward/backward pass:

- `DerivedScalarsQuery`: every value of one derived scalar in one layer;
- `TopKQuery`: the node table (the engine's own top/bottom-k selection);
- `ScoredTokensQuery`: token-space views of chosen nodes;
- `TokenPairQuery`: token-pair attribution of a residual direction at one query token.

Errors name their field from the sub-request's index on: `(0, "request", "prompt")` for the request,
`(0, "queries", NAME, "layer")` for a query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from neuron_explainer.activations.derived_scalars import METRICS, PassState, scalar
from neuron_explainer.activations.engine import Engine
from neuron_explainer.activations.limits import LimitError, ResultSize
from neuron_explainer.activations.node_types.attention_head import token_pair_attribution
from neuron_explainer.activations.nodes import (
    FieldPath,
    NodeAblation,
    NodeIndex,
    NodeType,
    RequestError,
    at,
    describe,
)
from neuron_explainer.activations.request import NODE_TYPES, SubRequest, SubResult
from neuron_explainer.activations.token_views import NodeTokenViews, node_token_views
from neuron_explainer.activations.validation import check_finite_logits
from neuron_explainer.models import generation


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
class BatchedSubRequest:
    request: SubRequest
    queries: dict[str, Query]


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise RequestError("metric", f"unknown metric {metric!r}; use one of {METRICS}")


def _plan(engine: Engine, sub: BatchedSubRequest) -> SubRequest:
    """The engine request answering a sub-request's queries (paths relative to its queries)."""
    cfg = engine.model.cfg
    top_ks = [q for q in sub.queries.values() if isinstance(q, TopKQuery)]
    if len(top_ks) > 1:
        raise RequestError((), "at most one top_k query per sub-request")
    extra: list[tuple[NodeType, str]] = []
    view_types: list[NodeType] = []
    for name, q in sub.queries.items():
        with at(name):
            if isinstance(q, DerivedScalarsQuery):
                engine.check_layer(q.node_type, q.layer)
                _check_metric(q.metric)
                for c in q.components or ():
                    with at("components"):
                        engine.check_component(q.node_type, q.layer, c)
                extra.append((q.node_type, q.metric))
            elif isinstance(q, ScoredTokensQuery):
                for j, nd in enumerate(q.nodes):
                    if describe(nd.node_type).per_token_pair and nd.attended_token is None:
                        raise RequestError(("nodes", j, "attended_token"), "a pair needs one")
                    view_types.append(nd.node_type)
            elif isinstance(q, TokenPairQuery):
                engine.check_layer(NodeType.ATTENTION_HEAD, q.layer)
                if len(q.direction) != cfg.d_model:
                    raise RequestError(
                        "direction", f"needs {cfg.d_model} values (d_model), got {len(q.direction)}"
                    )
                extra.append((NodeType.ATTENTION_HEAD, "write_magnitude"))  # records A and v
            else:
                for m in q.metrics:
                    with at("metrics"):
                        _check_metric(m)
    top = top_ks[0] if top_ks else None
    return replace(
        sub.request,
        top_and_bottom_k=top.k if top else 0,
        node_types=tuple(top.node_types) if top else (),
        metrics=tuple(top.metrics) if top else (),
        token_views=bool(view_types) or (top is not None and sub.request.token_views),
        extra_scalars=tuple(dict.fromkeys(extra)),
        extra_view_types=tuple(dict.fromkeys(view_types)),
    )


def run_batched(
    engine: Engine, subs: Sequence[BatchedSubRequest]
) -> list[tuple[SubResult, dict[str, QueryResult]]]:
    """Run every sub-request in one batch and answer its queries from the shared pass."""
    requests = []
    lengths = []
    for i, sub in enumerate(subs):
        with at(i, "queries"):
            requests.append(_plan(engine, sub))
        with at(i, "request"):
            lengths.append(len(engine.prompt_tokens(requests[-1])))
    answers: list[dict[str, QueryResult]] = [{} for _ in subs]
    extra = [
        _result_size(engine, q, lengths[i], (i, "queries", name))
        for i, sub in enumerate(subs)
        for name, q in sub.queries.items()
    ]

    def inspect(state: PassState) -> None:
        for i, sub in enumerate(subs):
            for name, q in sub.queries.items():
                engine.check_cancelled()
                with at(i, "queries", name):
                    answers[i][name] = _answer(engine, state, i, lengths[i], q)

    def path(p: FieldPath) -> FieldPath | None:
        """An engine path as this request names it (None: a field it does not have)."""
        if not (p and isinstance(p[0], int)) or p[1:2] == ("queries",):
            return p
        if p[1:] == ("top_and_bottom_k",):  # set by the row's top_k query
            top_k = [n for n, q in subs[p[0]].queries.items() if isinstance(q, TopKQuery)]
            return (p[0], "queries", top_k[0], "k") if top_k else None
        if p[1:] == ("token_view_k",):
            return None  # the top_k query's views have the default k
        return (p[0], "request", *p[1:])  # the engine names the row's request

    try:
        results = engine.run(requests, inspect=inspect, extra=extra)
    except RequestError as e:
        if isinstance(e, LimitError):
            e.lower = tuple(p for p in map(path, e.lower) if p is not None)
        e.path = path(e.path) or (e.lower[0] if isinstance(e, LimitError) and e.lower else ())
        raise
    for i, sub in enumerate(subs):
        for name, q in sub.queries.items():
            if isinstance(q, TopKQuery):
                answers[i][name] = QueryResult(result=results[i])
    return list(zip(results, answers, strict=True))


def _result_size(engine: Engine, q: Query, n: int, where: FieldPath) -> ResultSize:
    """An upper bound of what query `q` on an `n`-token prompt adds to the result (limits.py);
    the top_k query's table is the engine's own."""
    if isinstance(q, DerivedScalarsQuery):
        desc = describe(q.node_type)
        width = desc.width(engine.model, q.layer) if q.components is None else len(q.components)
        per_component = n * n if desc.per_token_pair else n
        return ResultSize(values=width * per_component, field=(*where, "components"))
    if isinstance(q, ScoredTokensQuery):
        lists = sum(describe(nd.node_type).token_view_lists for nd in q.nodes)
        return ResultSize(entries=lists * q.k, field=(*where, "k"))
    if isinstance(q, TokenPairQuery):
        return ResultSize(values=n, field=(*where, "query_token"))
    return ResultSize()


def _answer(engine: Engine, state: PassState, i: int, n: int, q: Query) -> QueryResult:
    if isinstance(q, DerivedScalarsQuery):
        values = scalar(q.node_type, q.metric).fn(state, q.layer)[i]
        if describe(q.node_type).per_token_pair:  # [C, q, k]
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
            with at("nodes", j):
                engine.validate_node(nd, n)
        views = node_token_views(engine.model, state, i, list(q.nodes), q.k, engine.check_cancelled)
        return QueryResult(token_views=[views[nd] for nd in q.nodes])
    if isinstance(q, TokenPairQuery):
        if not 0 <= q.query_token < n:
            raise RequestError(
                "query_token", f"token {q.query_token} is out of range for {n} tokens"
            )
        direction = torch.tensor(q.direction, device=engine.model.device)
        values = token_pair_attribution(state, q.layer, direction, q.query_token)[i]
        return QueryResult(values=values[: q.query_token + 1].float().tolist())
    return QueryResult()


# ---- one component on a prompt ---------------------------------------------------------------------


def component_values(
    engine: Engine,
    request: SubRequest,
    node_type: NodeType,
    layer: int,
    component: int,
    metric: str = "activation",
) -> tuple[SubResult, list[float] | list[list[float]]]:
    """One component's metric on a prompt: per token, or for a token-pair type the lower
    triangle of pairs, row q holding keys 0..q. Errors name `layer`, `component`, `metric`,
    `target_tokens` or the request's own fields (`prompt`)."""
    engine.check_layer(node_type, layer)
    engine.check_component(node_type, layer, component)
    _check_metric(metric)
    loss = request.loss_fn if request.target_tokens else "zero"
    if metric in ("direct_effect", "estimated_total_effect") and loss == "zero":
        raise RequestError("target_tokens", f"the {metric} needs at least one target token")
    query = DerivedScalarsQuery(node_type, metric, layer, [component])
    try:
        result, answers = run_batched(
            engine, [BatchedSubRequest(replace(request, loss_fn=loss), {"values": query})]
        )[0]
    except RequestError as e:
        e.path = e.path[2:] if e.path[:2] == (0, "request") else e.path
        raise
    values = answers["values"].values
    assert values is not None
    if describe(node_type).per_token_pair:
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
    prepend_bos: bool | None = None,
    use_cache: bool = True,
) -> list[int]:
    """A continuation of the prompt under the ablations, which name prompt positions: they apply
    while the prompt runs, and every new token reads the ablated keys and values from the cache,
    the same continuation as holding them on while rerunning the prefix (`generation.py`).
    Errors name `prompt`, `max_new_tokens` or `node_ablations`."""
    request = SubRequest(
        prompt, loss_fn="zero", node_ablations=node_ablations, prepend_bos=prepend_bos
    )
    tokens = engine.prompt_tokens(request)
    if len(tokens) + max_new_tokens > engine.model.cfg.n_ctx:
        raise RequestError(
            "max_new_tokens",
            f"{len(tokens)} prompt tokens + {max_new_tokens} exceed the context of "
            f"{engine.model.cfg.n_ctx}",
        )
    for j, abl in enumerate(node_ablations):
        with at("node_ablations", j, "node"):
            engine.validate_node(abl.node, len(tokens))
    ablated = bool(node_ablations)  # non-finite logits (an overflow) stop it: a RequestError
    check = ("hook_logits", lambda x, hook: check_finite_logits(engine.model, x, ablated))
    # The check on every step; the ablations (prompt positions) while the prompt runs.
    with engine.model.hooks(fwd=[check]):
        new = generation.generate(
            engine.model,
            torch.tensor(tokens, device=engine.model.device),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            prefill_hooks=engine.ablation_hooks([list(node_ablations)]),
            use_cache=use_cache,
        )
    return [int(t) for t in new.tolist()]
