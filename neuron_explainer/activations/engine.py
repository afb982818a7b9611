"""The request engine: one batched forward and one backward for a debugger request
(docs/engine.md §2).

`Engine(model).run(sub_requests)` checks every sub-request (validation.py), right-pads their
prompts into one batch, adds each row's interventions (interventions.py: ablations, autoencoder
splices, norm scales held fixed), runs one forward, computes each row's direction of interest `D`
(a loss on the logits, or a traced node's pre-activation), runs one backward on ΣD (rows never
mix), then ranks the derived scalars layer by layer into node tables (topk.py) and adds token-space
views (token_views.py). What each node type contributes comes from its description (nodes.py);
nothing here names a node type.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from neuron_explainer.activations import limits
from neuron_explainer.activations.derived_scalars import (
    DerivedScalar,
    PassState,
    hook_names_for,
    scalar,
)
from neuron_explainer.activations.interventions import (
    ablation_hooks,
    intervention_hooks,
    live_hook_names,
    modules_to_splice,
    norm_hooks,
    splice_hooks,
)
from neuron_explainer.activations.nodes import (
    AttentionTraceType,
    NodeAblation,
    NodeIndex,
    NodeType,
    RequestError,
    at,
    describe,
)
from neuron_explainer.activations.request import SubRequest, SubResult, describe_trace, loss_value
from neuron_explainer.activations.token_views import node_token_views, scored, scored_ids
from neuron_explainer.activations.topk import KEEP_BUDGET, gather, rank
from neuron_explainer.activations.validation import (
    Row,
    check_component,
    check_finite_logits,
    check_layer,
    check_prompt_size,
    prepare_row,
    prompt_tokens,
    trace_cut,
    validate_node,
)
from neuron_explainer.models.cancellation import CancelToken
from neuron_explainer.models.hooks import BackwardHookFn, ForwardHookFn, HookPoint, NameFilter
from neuron_explainer.models.transformer import HookedTransformer, pad_right

BackwardHooks = list[tuple[NameFilter, BackwardHookFn]]


class Engine:
    """Runs debugger requests on one model. `max_prompt_tokens` defaults to the context length.

    Limits (docs/engine.md §9), checked before a batch runs: `max_result_bytes` caps the result's
    estimated size as JSON (None: no cap; `result_limit_name` is how messages name the cap), and
    the estimated memory must stay within `memory_fraction` of what is available."""

    def __init__(
        self,
        model: HookedTransformer,
        max_prompt_tokens: int | None = None,
        max_result_bytes: int | None = None,
        result_limit_name: str = "max_result_bytes",
        memory_fraction: float = 0.9,
    ) -> None:
        self.model = model
        self.max_prompt_tokens = min(max_prompt_tokens or model.cfg.n_ctx, model.cfg.n_ctx)
        self.max_result_bytes = max_result_bytes
        self.result_limit_name = result_limit_name
        self.memory_fraction = memory_fraction
        # Seconds per phase of the last run (forward, backward, metrics, gather, token_views).
        self.last_timings: dict[str, float] = {}
        self.last_estimate: limits.Estimate | None = None  # of the last batch that ran
        self._cancel: CancelToken | None = None

    # ---- cancellation (models/cancellation.py) ---------------------------------------------------

    @contextmanager
    def cancellable(self, token: CancelToken) -> Iterator[None]:
        """Within the block, runs of this engine (and any forward of its model) check `token` at
        every block of a forward, at every gradient recorded in a backward, and between the
        layers and chunks of ranking and token views, and raise `Cancelled` (or
        `DeadlineExceeded`) once it is set. For one thread at a time, like the engine."""
        self._cancel = token
        try:
            with self.model.hooks(fwd=token.forward_hooks()):
                yield
        finally:
            self._cancel = None

    def check_cancelled(self) -> None:
        """Raise if the token of the enclosing `cancellable` block is set (no-op outside one)."""
        if self._cancel is not None:
            self._cancel.check()

    # ---- checks on this engine's model (validation.py; paths relative to the value given) -------

    def prompt_tokens(self, req: SubRequest) -> list[int]:
        return prompt_tokens(self.model, req, self.max_prompt_tokens)

    def check_prompt_size(
        self, prompt: str | Sequence[int], prepend_bos: bool | None = None
    ) -> None:
        """A 413 (PromptTooLongError) for a prompt that cannot fit, without tokenizing it: a
        check cheap enough for a server to run before the request waits for the model."""
        check_prompt_size(self.model, prompt, prepend_bos, self.max_prompt_tokens)

    def n_components(self, node_type: NodeType, layer: int) -> int:
        """Components of a node type in a layer (0 where it has none)."""
        return describe(node_type).width(self.model, layer)

    def check_layer(self, node_type: NodeType, layer: int) -> None:
        check_layer(self.model, node_type, layer)

    def check_component(self, node_type: NodeType, layer: int, index: int) -> None:
        check_component(self.model, node_type, layer, index)

    def validate_node(self, node: NodeIndex, n_tokens: int) -> None:
        validate_node(self.model, node, n_tokens)

    def ablation_hooks(
        self, ablations_by_row: Sequence[Sequence[NodeAblation]]
    ) -> list[tuple[NameFilter, ForwardHookFn]]:
        """Every forward hook the (validated) ablations need, splices included (generation)."""
        return intervention_hooks(self.model, ablations_by_row)

    # ---- the pass ------------------------------------------------------------------------------

    def run(
        self,
        sub_requests: Sequence[SubRequest],
        groups: Sequence[int] | None = None,
        inspect: Callable[[PassState], None] | None = None,
        extra: Sequence[limits.ResultSize] = (),
    ) -> list[SubResult]:
        """Run the sub-requests in one batch. Errors name their field from the sub-request's
        index on: `(1, "target_tokens", 0)`.

        `groups` (one id per sub-request) keeps independent requests apart in a merged batch: the
        node table is the union of selected nodes within a group only, so each group's results
        equal those of running it alone. `inspect` is called with the pass state before it is
        dropped, for callers that read further derived scalars or token views; `extra` sizes what
        they add to the result, for the limits checked before anything runs.
        """
        if not sub_requests:
            raise RequestError((), "at least one sub-request is needed")
        if groups is not None and len(groups) != len(sub_requests):
            raise ValueError("groups needs one id per sub-request")
        rows = []
        for i, req in enumerate(sub_requests):
            with at(i):
                rows.append(prepare_row(self.model, req, self.max_prompt_tokens))
        scalars = self._scalars(rows)
        spliced = modules_to_splice(self.model, rows, {s.node_type for s in scalars})
        row_groups = list(groups) if groups is not None else [0] * len(rows)
        n_latents = sum(module.n_latents for _, module in spliced)
        self.last_estimate = self._check_limits(rows, row_groups, n_latents, extra)
        self.check_cancelled()
        self.last_timings = {}
        clock = time.perf_counter()
        model, cfg, dev = self.model, self.model.cfg, self.model.device
        tokens, mask = pad_right([r.tokens for r in rows], device=dev)
        read_pos = torch.tensor([len(r.tokens) - 1 for r in rows], device=dev)
        needs_backward = any(
            r.request.loss_fn != "zero" or r.request.upstream_node_to_trace is not None
            for r in rows
        )
        act_names, grad_names = self._recorded(rows, scalars, needs_backward)
        act_names |= {module.hook_name for _, module in spliced}  # each splice's input x
        act_names = {n for n in act_names if n in model.hook_points()}
        live_names = live_hook_names(model, rows)

        acts: dict[str, torch.Tensor] = {}
        live: dict[str, torch.Tensor] = {}
        grads: dict[str, torch.Tensor] = {}

        def record(x: torch.Tensor, hook: HookPoint) -> None:
            if hook.name in act_names:
                acts[hook.name] = x.detach()
            if hook.name in live_names:
                live[hook.name] = x

        def record_grad(g: torch.Tensor, hook: HookPoint) -> None:
            self.check_cancelled()  # the backward's checkpoints: one or more per layer
            grads[hook.name] = g.detach()

        ablations = [r.request.node_ablations for r in rows]
        fwd = ablation_hooks(model, ablations) + norm_hooks(model, rows)
        fwd += [(n, record) for n in sorted(act_names | live_names)]
        # After the recording hooks, which so see (and trace from) the splices' inputs.
        fwd += splice_hooks(model, spliced, ablations, acts, grads if needs_backward else None)
        bwd: BackwardHooks = [(n, record_grad) for n in sorted(grad_names)]
        with torch.enable_grad(), model.hooks(fwd=fwd, bwd=bwd):
            logits = model(tokens, mask, logits_positions=read_pos)  # [b, V]
            directions = [self._direction(i, row, logits, live) for i, row in enumerate(rows)]
            total = sum(
                (d for d in directions if d.requires_grad), start=torch.zeros((), device=dev)
            )
            self.last_timings["forward"] = time.perf_counter() - clock
            clock = time.perf_counter()
            if needs_backward and total.requires_grad:
                total.backward()
        logits = logits.detach()
        self.last_timings["backward"] = time.perf_counter() - clock
        self.check_cancelled()
        d_values = [float(d.detach()) for d in directions]
        for i, row in enumerate(rows):
            with at(i):
                check_finite_logits(model, logits[i], bool(row.request.node_ablations), d_values[i])

        g = torch.zeros(len(rows), tokens.shape[1], cfg.d_model, device=dev, dtype=model.dtype)
        for i, row in enumerate(rows):
            if row.cut_hook in grads:
                g[i] = grads[row.cut_hook][i]
        state = PassState(
            model, acts, grads, g if needs_backward else None, [r.cut for r in rows], tokens
        )
        results = self._collect(rows, state, logits, d_values, row_groups)
        if inspect is not None:
            inspect(state)
        return results

    def _scalars(self, rows: Sequence[Row]) -> list[DerivedScalar]:
        """The derived scalars a batch computes: every metric asked for, of every node type of
        its tables, and the extra scalars asked for."""
        types = {t for r in rows for t in r.node_types}
        metrics = {m for r in rows for m in r.request.metrics}
        out = [scalar(t, m) for t in types for m in metrics]
        return out + [scalar(t, m) for r in rows for t, m in r.request.extra_scalars]

    def _recorded(
        self, rows: Sequence[Row], scalars: Sequence[DerivedScalar], needs_backward: bool
    ) -> tuple[set[str], set[str]]:
        """(activation, gradient) hook names the scalars and the token views read."""
        model = self.model
        act_names: set[str] = {"hook_embed"}
        grad_names: set[str] = set()
        if needs_backward:
            grad_names = {"hook_embed"} | {r.cut_hook for r in rows}
        if model.cfg.post_norms:  # writes through post-norms are scaled by them (§3.7)
            act_names |= {n for n in model.hook_names() if "_post.hook_scale" in n}
        for s in scalars:
            reads, read_grads = hook_names_for(s, model, describe(s.node_type).layers(model))
            act_names |= reads
            if needs_backward:
                grad_names |= read_grads
        view_types = {
            t
            for r in rows
            if r.request.token_views
            for t in (*r.node_types, *r.request.extra_view_types)
        }
        for node_type in view_types:
            desc = describe(node_type)
            for layer in desc.layers(model):
                act_names |= desc.view_hooks(model, layer)
        # What an ablation sets is recorded as set (scalars read it instead of recomputing it
        # from its inputs, as they do for attention patterns).
        for row in rows:
            for abl in row.request.node_ablations:
                ablation = describe(abl.node.node_type).ablation
                if ablation is not None:
                    act_names |= set(ablation.hooks(model, abl.node))
        return act_names, grad_names

    def estimated_bytes(self, n_rows: int, n_tokens: int, n_latents: int = 0) -> int:
        """Peak extra memory of a request, an upper bound of bench/request.py's measurements on
        SmolLM2 (561 MiB and 1.42 GiB at 256 and 1024 tokens): per-token activations and
        gradients (~6 values per MLP and residual width per layer); attention patterns of one
        layer at a time (recomputed from queries and keys when ranked: the pattern, its gradient
        and the metrics derived from them, ~8 copies of n²·H); the metric tensors ranking keeps
        for the table's values (topk.KEEP_BUDGET); for `n_latents` latents of spliced
        autoencoders, 4 float32 copies (latents, their clean copy, gradient, a temporary)."""
        cfg = self.model.cfg
        elem = torch.finfo(self.model.dtype).bits // 8
        quadratic = 8 * n_tokens**2 * cfg.n_heads
        linear = 6 * n_tokens * (cfg.d_mlp + cfg.d_model) * cfg.n_layers
        latents = 4 * 4 * n_tokens * n_latents
        return int(n_rows * ((quadratic + linear) * elem + latents) + KEEP_BUDGET)

    def estimate(
        self,
        sub_requests: Sequence[SubRequest],
        groups: Sequence[int] | None = None,
        extra: Sequence[limits.ResultSize] = (),
    ) -> limits.Estimate:
        """What `run` with these arguments would take (limits.py), without running anything."""
        rows = []
        for i, req in enumerate(sub_requests):
            with at(i):
                rows.append(prepare_row(self.model, req, self.max_prompt_tokens))
        spliced = modules_to_splice(self.model, rows, {s.node_type for s in self._scalars(rows)})
        n_latents = sum(module.n_latents for _, module in spliced)
        return self._estimate(rows, list(groups or [0] * len(rows)), n_latents, extra)

    def _estimate(
        self,
        rows: Sequence[Row],
        groups: Sequence[int],
        n_latents: int,
        extra: Sequence[limits.ResultSize],
    ) -> limits.Estimate:
        n_tokens = max(len(r.tokens) for r in rows)
        pass_bytes = self.estimated_bytes(len(rows), n_tokens, n_latents)
        return limits.estimate(self.model, rows, groups, pass_bytes, extra)

    def _check_limits(
        self,
        rows: Sequence[Row],
        groups: Sequence[int],
        n_latents: int,
        extra: Sequence[limits.ResultSize],
    ) -> limits.Estimate:
        """The batch's estimate, or a `LimitError` (413) when it is over a limit."""
        est = self._estimate(rows, groups, n_latents, extra)
        device = self.model.device
        limits.check(
            est,
            device,
            self.max_result_bytes,
            self.result_limit_name,
            self.memory_fraction,
            free_device=available_memory(device),
            free_host=available_memory(torch.device("cpu")),
        )
        return est

    def _direction(
        self, i: int, row: Row, logits: torch.Tensor, live: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Row i's direction of interest D (a scalar with graph when a backward is needed)."""
        req = row.request
        up, down = req.upstream_node_to_trace, req.downstream_node_to_trace
        if up is None:
            return loss_value(req.loss_fn, logits[i], row.targets, row.distractors)
        trace = describe(up.node.node_type).trace
        assert trace is not None
        if up.attention_trace_type != AttentionTraceType.VALUE:
            return trace.pre_activation(self.model, live, i, up)
        # Through the value: the pair's direct effect on a downstream gradient (the loss's, or a
        # downstream node's pre-activation's), with the pattern held fixed.
        if down is None:
            objective = loss_value(req.loss_fn, logits[i], row.targets, row.distractors)
        else:
            down_trace = describe(down.node.node_type).trace
            assert down_trace is not None
            objective = down_trace.pre_activation(self.model, live, i, down)
        resid = live[trace_cut(self.model, down)[1]]
        (g_down,) = torch.autograd.grad(objective, resid, retain_graph=True)
        assert trace.value is not None
        return trace.value(self.model, live, i, up.node, g_down[i, up.node.token])

    # ---- collecting results --------------------------------------------------------------------

    def _collect(
        self,
        rows: Sequence[Row],
        state: PassState,
        logits: torch.Tensor,
        directions: list[float],
        groups: list[int],
    ) -> list[SubResult]:
        model = self.model
        clock = time.perf_counter()
        ranking = rank(model, rows, state, groups, check=self.check_cancelled)
        self.last_timings["metrics"] = time.perf_counter() - clock
        clock = time.perf_counter()
        values_by_row = gather(rows, state, ranking, groups, check=self.check_cancelled)
        self.last_timings["gather"] = time.perf_counter() - clock
        clock = time.perf_counter()
        tok = model.tokenizer
        results = []
        for i, row in enumerate(rows):
            nodes = ranking.nodes_of[groups[i]]
            strings = tok.display_tokens(row.tokens) if tok else [str(t) for t in row.tokens]
            views = {}
            if row.request.token_views and nodes:
                in_prompt = [nd for nd in nodes if nd.token < len(row.tokens)]
                views = node_token_views(
                    model, state, i, in_prompt, row.request.token_view_k, self.check_cancelled
                )
            probs = logits[i].float().softmax(-1)
            k = max(row.request.token_view_k, 1)
            up = row.request.upstream_node_to_trace
            results.append(
                SubResult(
                    tokens=row.tokens,
                    token_strings=strings,
                    read_position=up.node.token if up is not None else len(row.tokens) - 1,
                    direction_value=directions[i],
                    bias_direct_effect=self._bias_direct_effect(i, row, state),
                    nodes=nodes,
                    metrics=values_by_row[i],
                    token_sums=ranking.token_sums[i],
                    top_logits=scored(model, logits[i], probs, k, largest=True),
                    bottom_logits=scored(model, logits[i], probs, k, largest=False),
                    target_logits=scored_ids(model, logits[i], probs, row.targets),
                    distractor_logits=scored_ids(model, logits[i], probs, row.distractors),
                    token_views=views,
                    trace_description=describe_trace(
                        up, row.request.downstream_node_to_trace, strings if tok else None
                    ),
                )
            )
        self.last_timings["token_views"] = time.perf_counter() - clock
        return results

    def _bias_direct_effect(self, i: int, row: Row, state: PassState) -> float:
        """Σ over layers before the cut of (b_O + b_out)·g: the part of D written by biases
        (through a frozen post-norm, b ⊙ w / s)."""
        if state.g is None:
            return 0.0
        total = 0.0
        for layer, block in enumerate(self.model.blocks):
            for bias, writes, position in (
                (block.attn.o_proj.bias, "attention", 2 * layer + 1),
                (block.mlp.w_out.bias, "mlp", 2 * layer + 2),
            ):
                if bias is not None and position <= row.cut:
                    # biases are written at every token; g is per token
                    g_sum = state.gradient_at_write(layer, writes, position)[i].sum(0)
                    total += float(bias @ g_sum)
        return total


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (None where unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_debugger_request(
    model: HookedTransformer,
    sub_requests: Sequence[SubRequest],
    max_prompt_tokens: int | None = None,
) -> list[SubResult]:
    """Run a batch of sub-requests with one forward and one backward; see `Engine`."""
    return Engine(model, max_prompt_tokens).run(sub_requests)
