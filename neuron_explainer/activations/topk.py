"""The node table of a pass (docs/engine.md §8): exact top and bottom k nodes per node type and
metric across all layers and tokens, their union within each group of rows, every metric for every
node of it, and per-token sums of each metric for the token-effect heat maps.

Exact and cheap: one layer's values are ranked at a time, keeping k candidates per layer and side,
then the candidates of all layers are ranked together. Nodes whose value is exactly zero are never
selected (e.g. direct effects at tokens D does not read).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from neuron_explainer.activations.derived_scalars import METRICS, PassState, scalar
from neuron_explainer.activations.nodes import NodeIndex, NodeType, describe, node_types
from neuron_explainer.activations.validation import Row, in_table
from neuron_explainer.models.transformer import HookedTransformer

Candidates = tuple[torch.Tensor, torch.Tensor]  # (values [c], flat indices [c]) into one layer
# Bytes of per-layer metric tensors kept from ranking for gathering the table's values.
KEEP_BUDGET = 256 * 2**20


def top_candidates(
    values: torch.Tensor, k: int, signed: bool
) -> tuple[Candidates, Candidates | None]:
    """Top-k and (when signed) bottom-k candidates of one layer's values ([t, C] per-token, or
    [H, t, t] token pairs), as flat indices into `values`.

    Rows are all but the last dimension; an element of the top k lies in one of the k rows with
    the largest maxima (otherwise k larger elements exist), so one reduction picks k rows and only
    those are ranked.
    """
    rows = values.reshape(-1, values.shape[-1])

    def side(largest: bool) -> Candidates:
        extreme = rows.amax(dim=1) if largest else rows.amin(dim=1)
        picked = extreme.topk(min(k, rows.shape[0]), largest=largest).indices
        best = rows[picked].topk(min(k, rows.shape[1]), dim=1, largest=largest)
        return best.values.flatten(), (best.indices + picked[:, None] * rows.shape[1]).flatten()

    return side(True), side(False) if signed else None


def unflatten(node_type: NodeType, layer: int, flat: int, t: int, width: int) -> NodeIndex:
    """The node at flat index `flat` of one layer's values: [H, t, t] for token-pair types,
    else [t, width]."""
    if describe(node_type).per_token_pair:
        component, rest = divmod(flat, t * t)
        q, key = divmod(rest, t)
        return NodeIndex(node_type, layer, q, component, key)
    token, component = divmod(flat, width)
    return NodeIndex(node_type, layer, token, component)


def select(
    cand: list[tuple[Candidates, Candidates | None, int]],
    k: int,
    node_type: NodeType,
    t: int,
    width: Callable[[int], int],
) -> set[NodeIndex]:
    """Exact top-k (largest positive) and bottom-k (most negative) across layers from the
    per-layer candidates (with their layer); nodes whose value is exactly zero are never
    selected. `t` is the number of tokens the flat indices were computed over; `width(layer)`
    the components of a layer."""
    out: set[NodeIndex] = set()
    for side, largest in ((0, True), (1, False)):
        parts = [(c[side], c[2]) for c in cand if c[side] is not None]
        if not parts:
            continue
        values = torch.cat([p[0] for p, _ in parts])  # type: ignore[index]
        flat = torch.cat([p[1] for p, _ in parts])  # type: ignore[index]
        layers = torch.cat([torch.full_like(p[1], layer) for p, layer in parts])  # type: ignore[index]
        best = values.topk(min(k, values.numel()), largest=largest)
        for v, j in zip(best.values.tolist(), best.indices.tolist(), strict=True):
            if (v > 0) if largest else (v < 0):
                layer = int(layers[j])
                out.add(unflatten(node_type, layer, int(flat[j]), t, width(layer)))
    return out


def node_sort_key(node: NodeIndex) -> tuple[int, int, int, int, int]:
    return (
        node_types().index(node.node_type),
        node.layer,
        node.token,
        -1 if node.attended_token is None else node.attended_token,
        node.component,
    )


def sum_keys(node_type: NodeType) -> list[str]:
    """The per-token sum keys of a node type: token-pair types sum per query token (attended
    from) and per key token (attended to)."""
    if describe(node_type).per_token_pair:
        return [f"{node_type.value}_attended_from", f"{node_type.value}_attended_to"]
    return [node_type.value]


@dataclass
class Ranking:
    nodes_of: dict[int, list[NodeIndex]]  # group -> its node table's nodes, in table order
    token_sums: list[dict[str, dict[str, list[float]]]]  # per row: key -> metric -> per token
    kept: dict[tuple[NodeType, str, int], torch.Tensor]  # scalar values reused by `gather`


def rank(
    model: HookedTransformer,
    rows: Sequence[Row],
    state: PassState,
    groups: Sequence[int],
    check: Callable[[], None] = lambda: None,
) -> Ranking:
    """Select each group's nodes and sum every metric per token, one layer at a time. `check` is
    called before each layer (it raises to stop the work: a cancellation)."""
    n = max(len(r.tokens) for r in rows)
    sum_dtype = torch.promote_types(model.dtype, torch.float32)  # bf16 models sum in fp32
    types = [t for t in node_types() if any(t in r.node_types for r in rows)]
    metrics = [m for m in METRICS if any(m in r.request.metrics for r in rows)]
    selected: dict[int, set[NodeIndex]] = {g: set() for g in groups}
    token_sums: list[dict[str, dict[str, list[float]]]] = [{} for _ in rows]
    kept: dict[tuple[NodeType, str, int], torch.Tensor] = {}
    budget = KEEP_BUDGET
    for node_type in types:
        desc = describe(node_type)
        pairs = desc.per_token_pair
        wants = [node_type in r.node_types for r in rows]
        # Layer by layer, every metric of a layer in turn (they share what is derived from the
        # layer's activations, such as a recomputed attention pattern: PassState.per_layer).
        cand: dict[str, list[list[tuple[Candidates, Candidates | None, int]]]] = {
            m: [[] for _ in rows] for m in metrics
        }
        sums = {
            m: torch.zeros(len(rows), 2, n, device=model.device, dtype=sum_dtype) for m in metrics
        }
        for layer in desc.layers(model):
            here = [
                w and in_table(model, r.node_types, node_type, layer)
                for w, r in zip(wants, rows, strict=True)
            ]
            if not any(here):
                continue  # every row has other node types in place of these
            position = NodeIndex(node_type, layer, 0).write_position
            for metric in metrics:
                fn = scalar(node_type, metric)
                check()
                values = fn.fn(state, layer)  # [b, n, C] or [b, H, n, n]
                if values.numel() * 4 <= budget:
                    budget -= values.numel() * 4
                    kept[(node_type, metric, layer)] = values
                for i, row in enumerate(rows):
                    if not here[i] or metric not in row.request.metrics:
                        continue
                    if row.request.upstream_node_to_trace is not None and position > row.cut:
                        continue  # not upstream of the traced node
                    # Nodes of this row: its real tokens (up to the traced token). Pads are
                    # trailing and pairs with k > q are exact zeros, so slicing suffices.
                    t = min(len(row.tokens), row.upstream_token_limit)
                    if pairs:
                        v = values[i, :, :t, :t]
                        sums[metric][i, 0, :t] += v.sum(dim=(0, 2))  # attended from (per query)
                        sums[metric][i, 1, :t] += v.sum(dim=(0, 1))  # attended to (per key)
                    else:
                        v = values[i, :t]
                        sums[metric][i, 0, :t] += v.sum(dim=1)
                    k = row.request.top_and_bottom_k
                    if k and fn.ranked:
                        cand[metric][i].append((*top_candidates(v, k, fn.signed), layer))
        for metric in metrics:
            for i, row in enumerate(rows):
                if not wants[i] or metric not in row.request.metrics:
                    continue
                for side, key in enumerate(sum_keys(node_type)):
                    # One value per token of the row's own prompt, not of the padded batch.
                    row_sums = sums[metric][i, side, : len(row.tokens)].tolist()
                    token_sums[i].setdefault(key, {})[metric] = row_sums
                if cand[metric][i]:
                    t = min(len(row.tokens), row.upstream_token_limit)
                    width = lambda layer, d=desc: d.width(model, layer)  # noqa: E731
                    selected[groups[i]] |= select(
                        cand[metric][i], row.request.top_and_bottom_k, node_type, t, width
                    )
    nodes_of = {g: sorted(sel, key=node_sort_key) for g, sel in selected.items()}
    return Ranking(nodes_of, token_sums, kept)


def gather(
    rows: Sequence[Row],
    state: PassState,
    ranking: Ranking,
    groups: Sequence[int],
    check: Callable[[], None] = lambda: None,
) -> list[dict[str, list[float | None]]]:
    """Every metric a row asked for, for every node of its group's table (None where the node is
    not in that row's prompt), one layer's values at a time (`check` is called before each)."""
    values_by_row: list[dict[str, list[float | None]]] = []
    by_layer: dict[tuple[NodeType, int], list[tuple[int, int, NodeIndex]]] = {}
    for i, row in enumerate(rows):
        nodes = ranking.nodes_of[groups[i]]
        metrics = [m for m in METRICS if m in row.request.metrics]
        values_by_row.append({m: [None] * len(nodes) for m in metrics})
        for j, node in enumerate(nodes):
            if node.token < len(row.tokens):
                by_layer.setdefault((node.node_type, node.layer), []).append((i, j, node))
    for (node_type, layer), all_items in by_layer.items():
        for metric in METRICS:  # a layer's metrics in turn (they share PassState.per_layer)
            items = [item for item in all_items if metric in values_by_row[item[0]]]
            if not items:
                continue
            check()
            values = ranking.kept.get((node_type, metric, layer))
            if values is None:
                values = scalar(node_type, metric).fn(state, layer)
            pairs = describe(node_type).per_token_pair
            for i, j, node in items:
                if pairs:
                    value = values[i, node.component, node.token, node.attended_token]
                else:
                    value = values[i, node.token, node.component]
                values_by_row[i][metric][j] = float(value)
    return values_by_row
