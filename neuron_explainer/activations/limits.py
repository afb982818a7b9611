"""What a request will cost, estimated before any of it runs (docs/engine.md §9).

Three parts, each an upper bound computed from the request alone:

- the forward/backward pass: `pass_bytes` (`Engine.estimated_bytes`, fitted to bench/request.py);
- the node table: a row selects at most k nodes per unsigned and 2k per signed metric for each of
  its node types (fewer where the prompt has fewer nodes), and every row of a group reports the
  union of its group's selections (at most the sum over the group's rows);
- the token views: every node of the table, in every row that asks for views, holds up to
  `token_view_lists` lists of `token_view_k` scored tokens.

From the counts come the result's size as JSON (`result_bytes`, what a server sends) and the memory
the result takes while it exists as Python objects, response models and JSON at once
(`result_memory_bytes`, measured at about 12 bytes per byte of JSON). `check` refuses, with a
`LimitError` naming the fields to lower, a request whose result is over `max_result_bytes` or whose
memory is over `memory_fraction` of what is available.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from neuron_explainer.activations.derived_scalars import scalar
from neuron_explainer.activations.nodes import (
    FieldPath,
    NodeType,
    PromptTooLongError,
    describe,
    format_path,
)
from neuron_explainer.activations.validation import Row, in_table
from neuron_explainer.models.transformer import HookedTransformer

# Bytes of the result as JSON: a scored token ({"token", "text", "score", "probability"}; ~80 on
# SmolLM2's vocabulary, rounded up), a node-table row without its token views (~280), a number of
# a list (values, token sums), a prompt token (id and display string), a sub-response's fixed part.
ENTRY_JSON_BYTES = 96
NODE_JSON_BYTES = 320
VALUE_JSON_BYTES = 24
TOKEN_JSON_BYTES = 32
SUB_RESPONSE_JSON_BYTES = 2048
# Peak memory per byte of JSON while a result exists as the engine's objects, the server's response
# models and the JSON text at once (measured with bench/request.py's prompt: ~230 + ~780 + ~80
# bytes per scored token), rounded up.
MEMORY_PER_JSON_BYTE = 14
# The token views project node directions onto the vocabulary this many bytes of scores at a time
# (token_views.py); the estimate counts twice that (the scores and the ranking's temporaries).
VIEW_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ResultSize:
    """A part of a result computed beside the engine's own (a query answered from the pass):
    `values` numbers and `entries` scored tokens. `field`: what sets its size, named relative to
    what the caller passed the engine, for the error message."""

    values: int = 0
    entries: int = 0
    field: FieldPath = ()


@dataclass(frozen=True)
class Estimate:
    """Upper bounds for one batch (docs/engine.md §9). Bytes unless said otherwise."""

    rows: int
    tokens: int  # the longest prompt
    pass_bytes: int  # forward and backward (device memory on a GPU)
    views_bytes: int  # working memory of the token views' projection (same device)
    table_rows: int  # node-table rows over all sub-results
    view_entries: int  # scored tokens in all token views
    result_bytes: int  # the result as JSON
    result_memory_bytes: int  # host memory while the result exists as objects and JSON
    # The fields of the sub-request (or extra part) contributing most to the result, whose smaller
    # values would shrink it most: paths like those of RequestError, largest contribution first.
    lower: tuple[FieldPath, ...] = ()


class LimitError(PromptTooLongError):
    """A request over a size or memory limit (kind "too_large"). `lower`: the fields whose smaller
    values would bring it under, as paths like `path` (a server names them in its own terms);
    `alternative`: what else would ("send fewer sub-requests"), or ""."""

    def __init__(
        self,
        path: FieldPath | str,
        message: str,
        lower: Sequence[FieldPath] = (),
        alternative: str = "",
    ) -> None:
        super().__init__(path, message)
        self.lower = tuple(tuple(p) for p in lower)
        self.alternative = alternative

    def advice(self, name: Callable[[FieldPath], str] = format_path) -> str:
        """ "; lower A or B, or send fewer sub-requests" with the fields named by `name`."""
        lower = " or ".join(name(p) for p in self.lower)
        text = f"; lower {lower}" if lower else ""
        if self.alternative:
            text += f", or {self.alternative}" if lower else f"; {self.alternative}"
        return text

    def __str__(self) -> str:
        return super().__str__() + self.advice()


def table_bound(
    model: HookedTransformer, row: Row
) -> tuple[dict[NodeType, int], dict[NodeType, int]]:
    """Per node type of a row's table: (the most nodes its selection can hold, the nodes there are
    in the row's prompt and layers)."""
    k = row.request.top_and_bottom_k
    n = min(len(row.tokens), row.upstream_token_limit)
    selected: dict[NodeType, int] = {}
    present: dict[NodeType, int] = {}
    for node_type in row.node_types:
        desc = describe(node_type)
        per_component = n * (n + 1) // 2 if desc.per_token_pair else n
        present[node_type] = sum(
            desc.width(model, layer) * per_component
            for layer in desc.layers(model)
            if in_table(model, row.node_types, node_type, layer)
        )
        picks = 0
        for metric in row.request.metrics:
            s = scalar(node_type, metric)
            if s.ranked:
                picks += k * (2 if s.signed else 1)
        selected[node_type] = min(picks, present[node_type])
    return selected, present


def estimate(
    model: HookedTransformer,
    rows: Sequence[Row],
    groups: Sequence[int],
    pass_bytes: int,
    extra: Sequence[ResultSize] = (),
) -> Estimate:
    """Upper bounds of what running `rows` (one group id per row) will take; `pass_bytes` is the
    pass's own estimate, `extra` the parts answered beside the engine's results."""
    bounds = [table_bound(model, row) for row in rows]
    union: dict[int, dict[NodeType, int]] = {}
    for g in set(groups):
        members = [b for b, gr in zip(bounds, groups, strict=True) if gr == g]
        types = {t for selected, _ in members for t in selected}
        union[g] = {
            t: min(
                sum(selected.get(t, 0) for selected, _ in members),
                max(present.get(t, 0) for _, present in members),
            )
            for t in types
        }
    table_rows = view_entries = result_bytes = 0
    contributions: list[tuple[int, tuple[FieldPath, ...]]] = []
    vocab = model.cfg.vocab_size
    for i, row in enumerate(rows):
        req, nodes = row.request, union[groups[i]]
        rows_here = sum(nodes.values())
        views = 0
        if req.token_views and req.token_view_k > 0:
            views = sum(c * describe(t).token_view_lists for t, c in nodes.items())
            views *= min(req.token_view_k, vocab)
        logits = 2 * max(req.token_view_k, 1) + len(row.targets) + len(row.distractors)
        sums = sum(
            (2 if describe(t).per_token_pair else 1) * len(req.metrics) * len(row.tokens)
            for t in row.node_types
        )
        row_bytes = rows_here * NODE_JSON_BYTES + views * ENTRY_JSON_BYTES
        fields: tuple[FieldPath, ...] = ((i, "top_and_bottom_k"),)
        if views * ENTRY_JSON_BYTES > rows_here * NODE_JSON_BYTES:
            fields = ((i, "token_view_k"), (i, "top_and_bottom_k"))
        elif views:
            fields += ((i, "token_view_k"),)
        contributions.append((row_bytes, fields if req.top_and_bottom_k else ()))
        table_rows += rows_here
        view_entries += views
        result_bytes += row_bytes + SUB_RESPONSE_JSON_BYTES
        result_bytes += logits * ENTRY_JSON_BYTES + sums * VALUE_JSON_BYTES
        result_bytes += len(row.tokens) * TOKEN_JSON_BYTES
    for part in extra:
        part_bytes = part.values * VALUE_JSON_BYTES + part.entries * ENTRY_JSON_BYTES
        contributions.append((part_bytes, (part.field,)))
        view_entries += part.entries
        result_bytes += part_bytes
    largest = max(contributions, key=lambda c: c[0], default=(0, ()))
    elem = torch.finfo(model.dtype).bits // 8
    vectors = 3 * max((sum(union[g].values()) for g in union), default=0)
    vectors += max((part.entries for part in extra), default=0)
    views_bytes = 2 * min(VIEW_CHUNK_BYTES, vectors * vocab * elem) if view_entries else 0
    return Estimate(
        rows=len(rows),
        tokens=max((len(r.tokens) for r in rows), default=0),
        pass_bytes=pass_bytes,
        views_bytes=views_bytes,
        table_rows=table_rows,
        view_entries=view_entries,
        result_bytes=result_bytes,
        result_memory_bytes=MEMORY_PER_JSON_BYTE * result_bytes,
        lower=largest[1],
    )


def format_bytes(n: float) -> str:
    """1.4 GiB, 512 MiB, 3.2 MiB: as messages give sizes."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 10 * 2**20 else f"{n / 2**20:.1f} MiB"


def check(
    est: Estimate,
    device: torch.device,
    max_result_bytes: int | None,
    result_limit_name: str,
    memory_fraction: float,
    free_device: int | None,
    free_host: int | None,
) -> None:
    """Raise `LimitError` for an estimate over a limit: the result over `max_result_bytes` (named
    `result_limit_name` in the message), or memory over `memory_fraction` of what is free (the
    pass and views on `device`, the result on the host; on a CPU both on the host). None: unknown,
    not checked."""
    what = f"{est.rows} sub-request{'s' if est.rows != 1 else ''} of up to {est.tokens} tokens"
    table = f"up to {est.table_rows:,} node-table rows and {est.view_entries:,} token-view entries"
    fewer = "send fewer sub-requests" if est.rows > 1 else ""
    path = est.lower[0] if est.lower else ()
    if max_result_bytes is not None and est.result_bytes > max_result_bytes:
        raise LimitError(
            path,
            f"the result would be up to {format_bytes(est.result_bytes)} as JSON ({what}: {table}); "
            f"the limit is {format_bytes(max_result_bytes)} ({result_limit_name})",
            est.lower,
            fewer,
        )
    on_device = est.pass_bytes + est.views_bytes
    result = f"the result as objects and JSON {format_bytes(est.result_memory_bytes)}"
    device_parts = (
        f"the pass {format_bytes(est.pass_bytes)}, token views {format_bytes(est.views_bytes)}"
    )
    if device.type == "cpu":
        parts = [(on_device + est.result_memory_bytes, free_host, "cpu", True)]
    else:
        parts = [
            (on_device, free_device, str(device), False),
            (est.result_memory_bytes, free_host, "the host", True),
        ]
    for need, free, where, holds_result in parts:
        if free is None or need <= memory_fraction * free:
            continue
        if where == "the host":
            breakdown = result
        elif holds_result:
            breakdown = f"{device_parts}, {result}"
        else:
            breakdown = device_parts
        message = (
            f"{what} would need about {format_bytes(need)} of memory on {where} ({breakdown}); the "
            f"limit is {format_bytes(memory_fraction * free)} ({memory_fraction * 100:g} % of the "
            f"{format_bytes(free)} available)"
        )
        if where == "the host" or (holds_result and est.result_memory_bytes > on_device):
            raise LimitError(path, message, est.lower, fewer)
        raise LimitError((), f"{message}. Send shorter prompts or fewer sub-requests.")
