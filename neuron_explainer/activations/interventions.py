"""The forward hooks a debugger request adds to the model (docs/engine.md §2, §4, §5): ablations,
splices of autoencoders (whose latents exist only while spliced in), and norm scales held fixed
for the backward pass. Each node type's description says where its nodes live; nothing here names
a node type.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from neuron_explainer.activations.nodes import (
    NodeAblation,
    NodeIndex,
    NodeToTrace,
    NodeType,
    Recorded,
    describe,
)
from neuron_explainer.activations.validation import Row, trace_cut
from neuron_explainer.models.autoencoders import SparseAutoencoder
from neuron_explainer.models.hooks import ForwardHookFn, HookPoint, NameFilter
from neuron_explainer.models.transformer import HookedTransformer

Hooks = list[tuple[NameFilter, ForwardHookFn]]
# A module spliced into the pass for the nodes of a type.
Spliced = tuple[NodeType, SparseAutoencoder]


def _ablate(items: list[tuple[int, NodeAblation]]) -> ForwardHookFn:
    def ablate(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        x = x.clone()
        for row, abl in items:
            ablation = describe(abl.node.node_type).ablation
            assert ablation is not None
            ablation.set(x, row, abl.node, abl.value)
        return x

    return ablate


def ablation_hooks(
    model: HookedTransformer, ablations_by_row: Sequence[Sequence[NodeAblation]]
) -> Hooks:
    """Forward hooks applying each batch row's (validated) ablations of nodes that live in the
    model itself; ablations of spliced nodes happen in their splice (`splice_hooks`)."""
    by_hook: dict[str, list[tuple[int, NodeAblation]]] = {}
    for row, ablations in enumerate(ablations_by_row):
        for abl in ablations:
            ablation = describe(abl.node.node_type).ablation
            if ablation is None:
                continue
            for name in ablation.hooks(model, abl.node):
                by_hook.setdefault(name, []).append((row, abl))
    return [(name, _ablate(items)) for name, items in by_hook.items()]


def spliced_module(model: HookedTransformer, node: NodeIndex) -> SparseAutoencoder | None:
    """The module a (validated) node of a spliced type belongs to; None for other types."""
    splice = describe(node.node_type).splice
    return None if splice is None else splice.module(model, node.layer)


def modules_to_splice(
    model: HookedTransformer, rows: Sequence[Row], scalar_types: Iterable[NodeType]
) -> list[Spliced]:
    """What a batch splices in: every module of a type whose scalars it computes (in a table or
    asked for), and the modules of ablated or traced nodes of spliced types; by hook point."""
    wanted: dict[str, Spliced] = {}
    for node_type in set(scalar_types):
        splice = describe(node_type).splice
        if splice is not None:
            for layer in describe(node_type).layers(model):
                module = splice.module(model, layer)
                assert module is not None
                wanted[module.hook_name] = (node_type, module)
    nodes = [a.node for r in rows for a in r.request.node_ablations]
    nodes += [t.node for r in rows for t in traces(r)]
    for node in nodes:
        module = spliced_module(model, node)
        if module is not None:
            wanted[module.hook_name] = (node.node_type, module)
    return [wanted[name] for name in sorted(wanted)]


def splice_hooks(
    model: HookedTransformer,
    spliced: Sequence[Spliced],
    ablations_by_row: Sequence[Sequence[NodeAblation]],
    acts: Recorded | None = None,
    grads: Recorded | None = None,
) -> Hooks:
    """Forward hooks splicing each module in at its hook point with each row's ablations of its
    nodes; the module's latents (after ablation) go to `acts` and, when `grads` is given, their
    gradients to `grads`, under the name the node type's splice gives them."""
    hooks: Hooks = []
    for node_type, module in spliced:
        splice = describe(node_type).splice
        assert splice is not None
        items = [
            (row, a)
            for row, abls in enumerate(ablations_by_row)
            for a in abls
            if spliced_module(model, a.node) is module
        ]
        hooks.append((module.hook_name, splice.hook(module, items, acts, grads)))
    return hooks


def intervention_hooks(
    model: HookedTransformer, ablations_by_row: Sequence[Sequence[NodeAblation]]
) -> Hooks:
    """Every hook the ablations need, outside a debugger pass (generation): in-model ablations,
    then the splices of ablated spliced nodes."""
    spliced: dict[str, Spliced] = {}
    for abls in ablations_by_row:
        for a in abls:
            module = spliced_module(model, a.node)
            if module is not None:
                spliced[module.hook_name] = (a.node.node_type, module)
    ordered = [spliced[name] for name in sorted(spliced)]
    return ablation_hooks(model, ablations_by_row) + splice_hooks(model, ordered, ablations_by_row)


def traces(row: Row) -> list[NodeToTrace]:
    """The row's upstream and downstream trace targets, where given."""
    req = row.request
    return [t for t in (req.upstream_node_to_trace, req.downstream_node_to_trace) if t is not None]


def _detach_rows(row_ids: list[int]) -> ForwardHookFn:
    def detach_rows(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        mask = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        mask[row_ids] = True
        return torch.where(mask.view(-1, *([1] * (x.ndim - 1))), x.detach(), x)

    return detach_rows


def norm_hooks(model: HookedTransformer, rows: Sequence[Row]) -> Hooks:
    """Hold norm scales fixed in the backward pass: the final norm and the final logit soft-cap
    (always) and, per row, the norm in front of each traced node (docs/engine.md §2, §5).
    Forward values are unchanged."""
    hooks: Hooks = [("ln_final.hook_scale", lambda x, h: x.detach())]
    if model.cfg.final_softcap:
        hooks.append(("logit_softcap.hook_scale", lambda x, h: x.detach()))
    per_layer: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        for trace in traces(row):
            ln = "ln1" if describe(trace.node.node_type).writes == "attention" else "ln2"
            per_layer.setdefault(f"blocks.{trace.node.layer}.{ln}.hook_scale", []).append(i)
    for name, row_ids in per_layer.items():
        hooks.append((name, _detach_rows(row_ids)))
    return hooks


def live_hook_names(model: HookedTransformer, rows: Sequence[Row]) -> set[str]:
    """Hook values each row's D needs with their graph: what its traced nodes' pre-activations
    read, and the residual stream where a value trace reads its downstream gradient."""
    names: set[str] = set()
    for row in rows:
        for trace in traces(row):
            spec = describe(trace.node.node_type).trace
            assert spec is not None
            names |= spec.hooks(model, trace)
        req = row.request
        if req.upstream_node_to_trace is not None:
            # A value trace differentiates its objective w.r.t. the residual stream in front of
            # the downstream node, or at the end of the model.
            names.add(trace_cut(model, req.downstream_node_to_trace)[1])
    return names
