"""The request engine: one batched forward and one backward for a debugger request (engine.md).

`run_debugger_request(model, sub_requests)` right-pads every sub-request's prompt into one batch,
applies each row's ablations, runs one forward, computes each row's direction of interest `D` (a
loss on the logits, or a traced node's pre-activation), runs one backward on ΣD (rows never mix),
then evaluates the requested derived scalars layer by layer, keeps exact top/bottom-k per node
type and metric, and reports every metric for the union of selected nodes.

Autoencoder latents (engine.md §3): when a request involves the latents of an autoencoder the model
holds (`model.attach_autoencoder`), the hooked activation x is replaced by
`x + decode(z) - decode(z_clean)` = `decode(z) + (x - decode(z_clean))`, where z_clean = encode(x)
and z is a leaf copy of it (with that row's latent ablations applied). Without ablations the
difference is exactly zero, so outputs are unchanged; ablating latent j removes exactly its write
z_j·s·W_dec[j]; the gradient reaches z through the decoder. The encoder's input is not
differentiated through z (z is a leaf), so every other node's gradient is the unspliced model's.
In a layer holding an autoencoder, its latents replace the neurons (MLP side) or heads (attention
side) in the node table when the request asks for latents of that side; layers without one keep
their neurons or heads, so the table still covers every layer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from neuron_explainer.activations import token_views
from neuron_explainer.activations.derived_scalars import (
    METRICS,
    REGISTRY,
    PassState,
    hook_names_for,
    latent_acts_name,
    latent_layers,
)
from neuron_explainer.activations.nodes import (
    LATENT_TYPES,
    AttentionTraceType,
    NodeAblation,
    NodeIndex,
    NodeToTrace,
    NodeType,
    PromptTooLongError,
    RequestError,
)
from neuron_explainer.models.autoencoders import AutoencoderSide, SparseAutoencoder
from neuron_explainer.models.hooks import BackwardHookFn, ForwardHookFn, HookPoint, NameFilter
from neuron_explainer.models.tokenizer import TokenizerError
from neuron_explainer.models.transformer import HookedTransformer, pad_right

LossFn = Literal["logit_diff", "logit_minus_mean", "probs", "zero"]
LOSS_FNS: tuple[str, ...] = ("logit_diff", "logit_minus_mean", "probs", "zero")
NODE_TYPES = (NodeType.EMBEDDING, NodeType.MLP_NEURON, NodeType.ATTENTION_HEAD)
# Every node type, in the order of node tables.
ALL_NODE_TYPES = (
    *NODE_TYPES,
    NodeType.ATTENTION_AUTOENCODER_LATENT,
    NodeType.MLP_AUTOENCODER_LATENT,
)
ComponentTypeForMlp = Literal["neuron", "autoencoder_latent"]
ComponentTypeForAttention = Literal["attention_head", "autoencoder_latent"]


@dataclass
class SubRequest:
    prompt: str | Sequence[int]
    target_tokens: Sequence[str | int] = ()
    distractor_tokens: Sequence[str | int] = ()
    loss_fn: LossFn = "logit_diff"
    node_ablations: Sequence[NodeAblation] = ()
    upstream_node_to_trace: NodeToTrace | None = None
    downstream_node_to_trace: NodeToTrace | None = None
    top_and_bottom_k: int = 10
    node_types: Sequence[NodeType] = NODE_TYPES
    # "autoencoder_latent": the latents of the MLP-side (attention-side) autoencoders join the node
    # types and replace the neurons (heads) of the layers that hold one; other layers keep theirs.
    component_type_for_mlp: ComponentTypeForMlp = "neuron"
    component_type_for_attention: ComponentTypeForAttention = "attention_head"
    metrics: Sequence[str] = METRICS
    token_views: bool = True
    token_view_k: int = 10
    prepend_bos: bool = False
    # Further (node type, metric) scalars to compute without ranking them (read via `inspect`).
    extra_scalars: Sequence[tuple[NodeType, str]] = ()


@dataclass
class ScoredToken:
    token: int
    text: str
    score: float
    probability: float | None = None


@dataclass
class ScoredKeyToken:
    """A key (attended-to) token of the prompt with a score: its position, id and text."""

    key_token_index: int
    token: int
    text: str
    score: float


@dataclass
class NodeTokenViews:
    """Token-space views of one node (engine.md §6); lists are ordered best first."""

    upvoted_output_tokens: list[ScoredToken] = field(default_factory=list)
    downvoted_output_tokens: list[ScoredToken] = field(default_factory=list)
    # Neurons: input tokens whose embedding raises / lowers the pre-activation. Heads: the query side.
    upvoting_input_tokens: list[ScoredToken] = field(default_factory=list)
    downvoting_input_tokens: list[ScoredToken] = field(default_factory=list)
    # Heads only: the key side of the attention score.
    upvoting_key_tokens: list[ScoredToken] = field(default_factory=list)
    downvoting_key_tokens: list[ScoredToken] = field(default_factory=list)
    # Attention-side latents only: the key tokens the latent's value came from (engine.md §6).
    token_pair_attributions: list[ScoredKeyToken] = field(default_factory=list)


@dataclass
class SubResult:
    tokens: list[int]
    token_strings: list[str]
    read_position: int  # where D is read (the last token, or the traced node's token)
    direction_value: float  # D
    bias_direct_effect: float  # direct effect of the layers' output biases before the cut
    nodes: list[NodeIndex]  # the union over sub-requests and metrics (same list in every result)
    metrics: dict[str, list[float | None]]  # metric -> value per node (None: not in this prompt)
    # node type -> metric -> per-token sum over all nodes at that token (heads: two views)
    token_sums: dict[str, dict[str, list[float]]]
    top_logits: list[ScoredToken]
    bottom_logits: list[ScoredToken]
    target_logits: list[ScoredToken]
    distractor_logits: list[ScoredToken]
    token_views: dict[NodeIndex, NodeTokenViews]
    trace_description: str | None = None


@dataclass
class _Row:
    request: SubRequest
    tokens: list[int]
    targets: list[int]
    distractors: list[int]
    cut: int  # residual write position D reads (2·n_layers for the loss)
    cut_hook: str
    upstream_token_limit: int  # nodes at later tokens are not upstream of D
    node_types: tuple[NodeType, ...]  # of the node table: the request's, with latents if asked


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _field(index: int, name: str, prefix: str = "subRequests") -> str:
    return f"{prefix}[{index}].{name}" if prefix else name


class Engine:
    """Runs debugger requests on one model. `max_prompt_tokens` defaults to the context length."""

    def __init__(self, model: HookedTransformer, max_prompt_tokens: int | None = None) -> None:
        self.model = model
        self.max_prompt_tokens = min(max_prompt_tokens or model.cfg.n_ctx, model.cfg.n_ctx)
        # Seconds per phase of the last run (forward, backward, metrics, gather, token_views).
        self.last_timings: dict[str, float] = {}

    # ---- validation --------------------------------------------------------------------------

    def _token_id(self, value: str | int, fld: str) -> int:
        if isinstance(value, int):
            if not 0 <= value < self.model.cfg.vocab_size:
                raise RequestError(fld, f"token id {value} is outside the vocabulary")
            return value
        if self.model.tokenizer is None:
            raise RequestError(fld, "this model has no tokenizer; give token ids")
        try:
            return self.model.tokenizer.single_token_id(value)
        except TokenizerError as e:
            raise RequestError(fld, str(e)) from e

    def n_components(self, node_type: NodeType, layer: int) -> int:
        """Components of a node type in a layer (latents: of the layer's autoencoder; 0 if none)."""
        cfg = self.model.cfg
        if node_type.is_latent:
            ae = self.model.autoencoder(node_type.autoencoder_side, layer)
            return 0 if ae is None else ae.n_latents
        return {
            NodeType.EMBEDDING: 1,
            NodeType.MLP_NEURON: cfg.d_mlp,
            NodeType.ATTENTION_HEAD: cfg.n_heads,
        }[node_type]

    def check_layer(self, node_type: NodeType, layer: int, fld: str) -> None:
        """Raise a RequestError naming `fld` unless `node_type` has nodes in `layer`."""
        n_layers = 1 if node_type == NodeType.EMBEDDING else self.model.cfg.n_layers
        if not 0 <= layer < n_layers:
            raise RequestError(fld, f"layer {layer} is out of range [0, {n_layers})")
        if (
            node_type.is_latent
            and self.model.autoencoder(node_type.autoencoder_side, layer) is None
        ):
            raise RequestError(
                fld,
                f"layer {layer} holds no autoencoder: {autoencoder_hint(self.model, node_type)}",
            )

    def validate_node(self, node: NodeIndex, n_tokens: int, fld: str) -> None:
        if node.node_type not in ALL_NODE_TYPES:
            raise RequestError(f"{fld}.nodeType", f"unknown node type {node.node_type!r}")
        self.check_layer(node.node_type, node.layer, f"{fld}.layerIndex")
        if not 0 <= node.token < n_tokens:
            raise RequestError(
                f"{fld}.tokenIndex", f"token {node.token} is out of range for {n_tokens} tokens"
            )
        n_components = self.n_components(node.node_type, node.layer)
        if not 0 <= node.component < n_components:
            kind = "latent" if node.node_type.is_latent else "component"
            raise RequestError(
                f"{fld}.componentIndex",
                f"{kind} {node.component} is out of range [0, {n_components})",
            )
        if node.attended_token is not None:
            if node.node_type != NodeType.ATTENTION_HEAD:
                raise RequestError(f"{fld}.attendedTokenIndex", "only attention heads have one")
            if not 0 <= node.attended_token <= node.token:
                raise RequestError(
                    f"{fld}.attendedTokenIndex",
                    f"attended token {node.attended_token} must be in [0, {node.token}] (causal)",
                )

    def prompt_tokens(
        self, index: int, req: SubRequest, field_prefix: str = "subRequests"
    ) -> list[int]:
        """The sub-request's prompt as token ids, validated (empty, too long, unknown ids)."""
        fld = _field(index, "prompt", field_prefix)
        if isinstance(req.prompt, str):
            if self.model.tokenizer is None:
                raise RequestError(fld, "this model has no tokenizer")
            tokens = self.model.tokenizer.encode(req.prompt)
        else:
            tokens = [self._token_id(int(t), fld) for t in req.prompt]
        if req.prepend_bos:
            if self.model.tokenizer is None or self.model.tokenizer.bos_token_id is None:
                raise RequestError(
                    _field(index, "prependBos", field_prefix), "this tokenizer has no BOS token"
                )
            tokens = [self.model.tokenizer.bos_token_id, *tokens]
        if not tokens:
            raise RequestError(fld, "the prompt is empty")
        if len(tokens) > self.max_prompt_tokens:
            raise PromptTooLongError(
                fld, f"{len(tokens)} tokens exceed the maximum of {self.max_prompt_tokens}"
            )
        return tokens

    def _prepare(self, index: int, req: SubRequest, prefix: str = "subRequests") -> _Row:
        cfg = self.model.cfg
        tokens = self.prompt_tokens(index, req, prefix)
        if req.loss_fn not in LOSS_FNS:
            raise RequestError(
                _field(index, "lossFn", prefix),
                f"unknown loss {req.loss_fn!r}; use one of {LOSS_FNS}",
            )
        if req.top_and_bottom_k < 0:
            raise RequestError(_field(index, "topAndBottomK", prefix), "must be >= 0")
        for m in req.metrics:
            if m not in METRICS:
                raise RequestError(
                    _field(index, "metrics", prefix), f"unknown metric {m!r}; use {METRICS}"
                )
        node_types = self._table_node_types(index, req, prefix)
        targets = [
            self._token_id(t, f"{_field(index, 'targetTokens', prefix)}[{i}]")
            for i, t in enumerate(req.target_tokens)
        ]
        distractors = [
            self._token_id(t, f"{_field(index, 'distractorTokens', prefix)}[{i}]")
            for i, t in enumerate(req.distractor_tokens)
        ]
        up, down = req.upstream_node_to_trace, req.downstream_node_to_trace
        reads_loss = up is None or (
            up.attention_trace_type == AttentionTraceType.VALUE and down is None
        )
        if req.loss_fn != "zero" and reads_loss and not targets:
            raise RequestError(
                _field(index, "targetTokens", prefix), "at least one target token is needed"
            )
        for i, abl in enumerate(req.node_ablations):
            self.validate_node(
                abl.node, len(tokens), f"{_field(index, 'nodeAblations', prefix)}[{i}].node"
            )
        cut, cut_hook, limit = (
            2 * cfg.n_layers,
            f"blocks.{cfg.n_layers - 1}.hook_resid_post",
            len(tokens),
        )
        if down is not None and (up is None or up.attention_trace_type != AttentionTraceType.VALUE):
            raise RequestError(
                _field(index, "downstreamNodeToTrace", prefix),
                "a downstream node is only used when tracing an attention head through its value",
            )
        for name, trace in (("upstreamNodeToTrace", up), ("downstreamNodeToTrace", down)):
            if trace is None:
                continue
            self._validate_trace(trace, len(tokens), _field(index, name, prefix))
        if up is not None:
            cut, cut_hook = _trace_cut(up, cfg.n_layers)
            node = up.node
            limit = node.token + 1
            if down is not None and down.node.write_position <= up.node.write_position:
                raise RequestError(
                    _field(index, "downstreamNodeToTrace", prefix),
                    "the downstream node must be in a later layer than the traced head",
                )
        return _Row(req, tokens, targets, distractors, cut, cut_hook, limit, node_types)

    def _table_node_types(self, index: int, req: SubRequest, prefix: str) -> tuple[NodeType, ...]:
        """The node types of a row's table: its node_types, plus latents for component types
        "autoencoder_latent" (an error naming the field when the model holds no such autoencoder)."""
        types = list(req.node_types)
        for name, value, default, latent in (
            ("componentTypeForMlp", req.component_type_for_mlp, "neuron", LATENT_TYPES["mlp"]),
            (
                "componentTypeForAttention",
                req.component_type_for_attention,
                "attention_head",
                LATENT_TYPES["attention"],
            ),
        ):
            if value not in (default, "autoencoder_latent"):
                raise RequestError(
                    _field(index, name, prefix),
                    f"unknown component type {value!r}; use {default!r} or 'autoencoder_latent'",
                )
            if value == "autoencoder_latent":
                if not latent_layers(self.model, latent):
                    raise RequestError(
                        _field(index, name, prefix), autoencoder_hint(self.model, latent)
                    )
                types.append(latent)
        for t in types:
            if t not in ALL_NODE_TYPES:
                raise RequestError(_field(index, "nodeTypes", prefix), f"unknown node type {t!r}")
            if t.is_latent and not latent_layers(self.model, t):
                raise RequestError(
                    _field(index, "nodeTypes", prefix), autoencoder_hint(self.model, t)
                )
        return tuple(dict.fromkeys(types))

    def in_table(self, row_types: Sequence[NodeType], node_type: NodeType, layer: int) -> bool:
        """Whether a row's table has `node_type` nodes in `layer`: False for neurons (heads) of a
        layer whose latents replace them, and for latents of a layer without an autoencoder."""
        if node_type.is_latent:
            return self.model.autoencoder(node_type.autoencoder_side, layer) is not None
        if node_type == NodeType.MLP_NEURON and NodeType.MLP_AUTOENCODER_LATENT in row_types:
            return self.model.autoencoder("mlp", layer) is None
        if (
            node_type == NodeType.ATTENTION_HEAD
            and NodeType.ATTENTION_AUTOENCODER_LATENT in row_types
        ):
            return self.model.autoencoder("attention", layer) is None
        return True

    def _validate_trace(self, trace: NodeToTrace, n_tokens: int, fld: str) -> None:
        self.validate_node(trace.node, n_tokens, f"{fld}.node")
        if trace.node.node_type == NodeType.EMBEDDING:
            raise RequestError(f"{fld}.node.nodeType", "embeddings have no pre-activation to trace")
        if (
            trace.node.node_type != NodeType.ATTENTION_HEAD
            and trace.attention_trace_type == AttentionTraceType.VALUE
        ):
            raise RequestError(
                f"{fld}.attentionTraceType", "tracing through the value is for attention heads"
            )
        if trace.node.node_type == NodeType.ATTENTION_HEAD:
            if trace.attention_trace_type is None:
                raise RequestError(f"{fld}.attentionTraceType", "required for an attention head")
            if trace.node.attended_token is None:
                raise RequestError(f"{fld}.node.attendedTokenIndex", "a traced head pair needs one")

    # ---- the pass ------------------------------------------------------------------------------

    def run(
        self,
        sub_requests: Sequence[SubRequest],
        groups: Sequence[int] | None = None,
        inspect: Callable[[PassState], None] | None = None,
        field_prefix: str = "subRequests",
    ) -> list[SubResult]:
        """Run the sub-requests in one batch.

        `groups` (one id per sub-request) keeps independent requests apart in a merged batch: the
        node table is the union of selected nodes within a group only, so each group's results
        equal those of running it alone. `inspect` is called with the pass state before it is
        dropped, for callers that read further derived scalars or token views.
        """
        if not sub_requests:
            raise RequestError("subRequests", "at least one sub-request is needed")
        if groups is not None and len(groups) != len(sub_requests):
            raise ValueError("groups needs one id per sub-request")
        rows = [self._prepare(i, r, field_prefix) for i, r in enumerate(sub_requests)]
        # What to record: activations for the requested scalars, gradients where a backward runs.
        scalars = [
            REGISTRY[(t, m)]
            for t in {t for r in rows for t in r.node_types}
            for m in {m for r in rows for m in r.request.metrics}
        ]
        scalars += [REGISTRY[key] for r in rows for key in r.request.extra_scalars]
        spliced = self._autoencoders_to_splice(rows, {s.node_type for s in scalars})
        self._check_memory(rows, sum(ae.n_latents for ae in spliced))
        self.last_timings = {}
        clock = time.perf_counter()
        model, cfg, dev = self.model, self.model.cfg, self.model.device
        tokens, mask = pad_right([r.tokens for r in rows], device=dev)
        lengths = [len(r.tokens) for r in rows]
        read_pos = torch.tensor([n - 1 for n in lengths], device=dev)
        needs_backward = any(
            r.request.loss_fn != "zero" or r.request.upstream_node_to_trace is not None
            for r in rows
        )

        act_names: set[str] = {"hook_embed"}
        grad_names: set[str] = (
            {"hook_embed"} | {r.cut_hook for r in rows} if needs_backward else set()
        )
        for s in scalars:
            scalar_acts, scalar_grads = hook_names_for(s, cfg.n_layers)
            act_names |= scalar_acts
            if needs_backward:
                grad_names |= scalar_grads
        if any(r.request.token_views for r in rows):
            rot = cfg.positional == "rotary"
            for layer in range(cfg.n_layers):
                act_names |= {f"blocks.{layer}.ln1.hook_scale", f"blocks.{layer}.ln2.hook_scale"}
                act_names |= {f"blocks.{layer}.attn.hook_{'rot_' if rot else ''}{s}" for s in "qk"}
            for ae in spliced:  # what the latents' input-token and token-pair views read
                if ae.cfg.side == "mlp":
                    act_names.add(f"blocks.{ae.cfg.layer}.ln2.hook_normalized")
                else:
                    act_names |= {
                        f"blocks.{ae.cfg.layer}.attn.hook_pattern",
                        f"blocks.{ae.cfg.layer}.attn.hook_v",
                    }
        act_names |= {ae.hook_name for ae in spliced}  # the input x of each spliced autoencoder
        act_names = {n for n in act_names if n in model.hook_points()}
        live_names = self._live_hook_names(rows)

        acts: dict[str, torch.Tensor] = {}
        live: dict[str, torch.Tensor] = {}
        grads: dict[str, torch.Tensor] = {}

        def record(x: torch.Tensor, hook: HookPoint) -> None:
            if hook.name in act_names:
                acts[hook.name] = x.detach()
            if hook.name in live_names:
                live[hook.name] = x

        def record_grad(g: torch.Tensor, hook: HookPoint) -> None:
            grads[hook.name] = g.detach()

        ablations = [r.request.node_ablations for r in rows]
        fwd = self.ablation_hooks(ablations, splice=False) + self._norm_hooks(rows)
        fwd += [(n, record) for n in sorted(act_names | live_names)]
        # After the recording hooks, which so see (and trace from) the autoencoders' inputs.
        fwd += self.splice_hooks(spliced, ablations, acts, grads if needs_backward else None)
        bwd: list[tuple[NameFilter, BackwardHookFn]] = [
            (n, record_grad) for n in sorted(grad_names)
        ]
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

        g = torch.zeros(len(rows), tokens.shape[1], cfg.d_model, device=dev, dtype=model.dtype)
        for i, row in enumerate(rows):
            if row.cut_hook in grads:
                g[i] = grads[row.cut_hook][i]
        state = PassState(
            model, acts, grads, g if needs_backward else None, [r.cut for r in rows], tokens
        )
        row_groups = list(groups) if groups is not None else [0] * len(rows)
        results = self._collect(
            rows, state, logits, [float(d.detach()) for d in directions], lengths, row_groups
        )
        if inspect is not None:
            inspect(state)
        return results

    def estimated_bytes(self, n_rows: int, n_tokens: int, n_latents: int = 0) -> int:
        """Peak extra memory of a request, fitted to bench/request.py's measurements on SmolLM2
        (180 MiB, 854 MiB, 3.8 GiB at 64, 256, 1024 tokens) and rounded up: per-token activations
        and gradients (~12 values per MLP and residual width per layer), plus the attention
        patterns (~1.5 copies of n²·H per layer); for `n_latents` latents of spliced autoencoders,
        4 float32 copies (latents, their clean copy, gradient, a temporary)."""
        cfg = self.model.cfg
        elem = torch.finfo(self.model.dtype).bits // 8
        quadratic = 1.5 * n_tokens**2 * cfg.n_heads * cfg.n_layers
        linear = 12 * n_tokens * (cfg.d_mlp + cfg.d_model) * cfg.n_layers
        latents = 4 * 4 * n_tokens * n_latents
        return int(n_rows * ((quadratic + linear) * elem + latents))

    def _check_memory(self, rows: list[_Row], n_latents: int = 0) -> None:
        need = self.estimated_bytes(len(rows), max(len(r.tokens) for r in rows), n_latents)
        free = available_memory(self.model.device)
        if free is not None and need > 0.9 * free:
            raise PromptTooLongError(
                "subRequests",
                f"{len(rows)} prompt(s) of up to {max(len(r.tokens) for r in rows)} tokens would "
                f"need about {need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB is available on "
                f"{self.model.device}. Send shorter prompts or fewer sub-requests.",
            )

    def _live_hook_names(self, rows: list[_Row]) -> set[str]:
        """Hook values needed with their graph to compute each row's D."""
        names: set[str] = set()
        rotary = self.model.cfg.positional == "rotary"
        for row in rows:
            for trace in (row.request.upstream_node_to_trace, row.request.downstream_node_to_trace):
                if trace is None:
                    continue
                L = trace.node.layer
                if trace.node.node_type.is_latent:
                    names.add(_autoencoder(self.model, trace.node).hook_name)
                elif trace.node.node_type == NodeType.MLP_NEURON:
                    names |= {f"blocks.{L}.mlp.hook_pre", f"blocks.{L}.hook_resid_mid"}
                elif trace.attention_trace_type == AttentionTraceType.VALUE:
                    names |= {f"blocks.{L}.attn.hook_v", f"blocks.{L}.attn.hook_pattern"}
                else:
                    q, k = ("hook_rot_q", "hook_rot_k") if rotary else ("hook_q", "hook_k")
                    names |= {
                        f"blocks.{L}.attn.{q}",
                        f"blocks.{L}.attn.{k}",
                        f"blocks.{L}.hook_resid_pre",
                    }
            if (
                row.request.upstream_node_to_trace is not None
                and row.request.downstream_node_to_trace is None
            ):
                names.add(f"blocks.{self.model.cfg.n_layers - 1}.hook_resid_post")
        return names

    def ablation_hooks(
        self, ablations_by_row: Sequence[Sequence[NodeAblation]], splice: bool = True
    ) -> list[tuple[NameFilter, ForwardHookFn]]:
        """Forward hooks applying each batch row's node ablations (validated beforehand). Latent
        ablations splice their autoencoders in (last), unless `splice` is False."""
        by_hook: dict[str, list[tuple[int, NodeAblation]]] = {}
        for i, ablations in enumerate(ablations_by_row):
            for abl in ablations:
                n = abl.node
                if n.node_type.is_latent:
                    continue
                if n.node_type == NodeType.MLP_NEURON:
                    name = f"blocks.{n.layer}.mlp.hook_post"
                elif n.node_type == NodeType.ATTENTION_HEAD:
                    name = f"blocks.{n.layer}.attn.hook_pattern"
                else:
                    name = "hook_embed"
                by_hook.setdefault(name, []).append((i, abl))
                if n.node_type == NodeType.EMBEDDING and self.model.cfg.positional == "learned":
                    by_hook.setdefault("hook_pos_embed", []).append((i, abl))
        hooks: list[tuple[NameFilter, ForwardHookFn]] = [
            (name, _make_ablation(items)) for name, items in by_hook.items()
        ]
        if splice:
            aes = {
                _autoencoder(self.model, a.node)
                for abls in ablations_by_row
                for a in abls
                if a.node.node_type.is_latent
            }
            hooks += self.splice_hooks(sorted(aes, key=lambda ae: ae.hook_name), ablations_by_row)
        return hooks

    def splice_hooks(
        self,
        autoencoders: Sequence[SparseAutoencoder],
        ablations_by_row: Sequence[Sequence[NodeAblation]],
        acts: dict[str, torch.Tensor] | None = None,
        grads: dict[str, torch.Tensor] | None = None,
    ) -> list[tuple[NameFilter, ForwardHookFn]]:
        """Forward hooks splicing each autoencoder in at its hook point, with each row's ablations
        of its latents; the latents (after ablation) go to `acts` and, when `grads` is given,
        their gradients to `grads`, both under `{hook}.hook_sae_acts_post`."""
        hooks: list[tuple[NameFilter, ForwardHookFn]] = []
        for ae in autoencoders:
            items = [
                (i, a)
                for i, abls in enumerate(ablations_by_row)
                for a in abls
                if a.node.node_type.is_latent and _autoencoder(self.model, a.node) is ae
            ]
            hooks.append((ae.hook_name, _make_splice(ae, items, acts, grads)))
        return hooks

    def _autoencoders_to_splice(
        self, rows: list[_Row], scalar_types: set[NodeType]
    ) -> list[SparseAutoencoder]:
        """The autoencoders a batch involves: every one of a side whose latents are in a table or
        asked for as scalars, and those of ablated or traced latents."""
        sides = {t.autoencoder_side for t in scalar_types if t.is_latent}
        nodes = [a.node for r in rows for a in r.request.node_ablations]
        for r in rows:
            for trace in (r.request.upstream_node_to_trace, r.request.downstream_node_to_trace):
                if trace is not None:
                    nodes.append(trace.node)
        wanted = {ae.hook_name for ae in self.model.autoencoders.values() if ae.cfg.side in sides}
        wanted |= {_autoencoder(self.model, n).hook_name for n in nodes if n.node_type.is_latent}
        return [self.model.autoencoders[name] for name in sorted(wanted)]

    def _norm_hooks(self, rows: list[_Row]) -> list[tuple[NameFilter, ForwardHookFn]]:
        """Hold norm scales fixed in the backward pass: the final norm (always) and, per row, the
        norm in front of each traced node (engine.md §2, §5). Forward values are unchanged."""
        hooks: list[tuple[NameFilter, ForwardHookFn]] = [
            ("ln_final.hook_scale", lambda x, h: x.detach())
        ]
        per_layer: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            for trace in (row.request.upstream_node_to_trace, row.request.downstream_node_to_trace):
                if trace is not None:
                    ln = "ln1" if trace.node.node_type.writes_after_attention else "ln2"
                    per_layer.setdefault(f"blocks.{trace.node.layer}.{ln}.hook_scale", []).append(i)
        for name, row_ids in per_layer.items():
            hooks.append((name, _make_row_detach(row_ids)))
        return hooks

    def _direction(
        self, i: int, row: _Row, logits: torch.Tensor, live: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Row i's direction of interest D (a scalar with graph when a backward is needed)."""
        up = row.request.upstream_node_to_trace
        if up is None:
            return loss_value(row.request.loss_fn, logits[i], row.targets, row.distractors)
        if up.attention_trace_type != AttentionTraceType.VALUE:
            return self._pre_activation(i, up, live)
        # Through the value: the head pair's direct effect on a downstream gradient, with the
        # pattern (query and key) held fixed.
        down = row.request.downstream_node_to_trace
        if down is None:
            resid_name = f"blocks.{self.model.cfg.n_layers - 1}.hook_resid_post"
            objective = loss_value(row.request.loss_fn, logits[i], row.targets, row.distractors)
        else:
            resid_name = _trace_cut(down, self.model.cfg.n_layers)[1]
            objective = self._pre_activation(i, down, live)
        (g_down,) = torch.autograd.grad(objective, live[resid_name], retain_graph=True)
        node = up.node
        layer = node.layer
        attn = self.model.blocks[layer].attn
        kv_head = node.component // (attn.n_heads // attn.n_kv_heads)
        v = live[f"blocks.{layer}.attn.hook_v"][i, node.attended_token, kv_head]  # [dh]
        write = v @ attn.W_O[node.component]  # [d]
        a = live[f"blocks.{layer}.attn.hook_pattern"][
            i, node.component, node.token, node.attended_token
        ]
        return a.detach() * (write @ g_down[i, node.token].detach())

    def _pre_activation(
        self, i: int, trace: NodeToTrace, live: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        node = trace.node
        L = node.layer
        if node.node_type.is_latent:
            # The encoder's pre-activation of the hooked activation (MLP output, neurons or
            # attention output) recomputed with graph from the residual stream before the layer;
            # the layer's norm scale and the autoencoder's input-normalization scale held fixed.
            ae = _autoencoder(self.model, node)
            x = live[ae.hook_name][i, node.token]
            scale = ae.decode_scale(x.detach()) if ae.cfg.normalize != "none" else None
            return ae.pre_activations(x, scale=scale)[node.component]
        if node.node_type == NodeType.MLP_NEURON:
            return live[f"blocks.{L}.mlp.hook_pre"][i, node.token, node.component]
        attn = self.model.blocks[L].attn
        rotary = self.model.cfg.positional == "rotary"
        q_all = live[f"blocks.{L}.attn.{'hook_rot_q' if rotary else 'hook_q'}"]
        k_all = live[f"blocks.{L}.attn.{'hook_rot_k' if rotary else 'hook_k'}"]
        q = q_all[i, node.token, node.component]
        k = k_all[i, node.attended_token, node.component // (attn.n_heads // attn.n_kv_heads)]
        side = trace.attention_trace_type
        if side == AttentionTraceType.QUERY:
            k = k.detach()
        elif side == AttentionTraceType.KEY:
            q = q.detach()
        return (q @ k) / math.sqrt(attn.d_head)

    # ---- collecting results --------------------------------------------------------------------

    def _collect(
        self,
        rows: list[_Row],
        state: PassState,
        logits: torch.Tensor,
        directions: list[float],
        lengths: list[int],
        row_groups: list[int],
    ) -> list[SubResult]:
        cfg, model = self.model.cfg, self.model
        clock = time.perf_counter()
        n = max(lengths)
        sum_dtype = torch.promote_types(model.dtype, torch.float32)  # bf16 models sum in fp32
        node_types = [t for t in ALL_NODE_TYPES if any(t in r.node_types for r in rows)]
        metrics = [m for m in METRICS if any(m in r.request.metrics for r in rows)]
        selected: dict[int, set[NodeIndex]] = {g: set() for g in row_groups}
        token_sums: list[dict[str, dict[str, list[float]]]] = [{} for _ in rows]
        kept: dict[tuple[NodeType, str, int], torch.Tensor] = {}
        budget = 256 * 2**20  # bytes of per-layer metric tensors kept for the second pass

        for node_type in node_types:
            layers: Sequence[int] = range(1 if node_type == NodeType.EMBEDDING else cfg.n_layers)
            if node_type.is_latent:
                layers = latent_layers(model, node_type)
            for metric in metrics:
                scalar = REGISTRY[(node_type, metric)]
                cand: list[list[tuple[Candidates, Candidates | None, int]]] = [[] for _ in rows]
                sums = torch.zeros(len(rows), 2, n, device=model.device, dtype=sum_dtype)
                for layer in layers:
                    in_table = [self.in_table(r.node_types, node_type, layer) for r in rows]
                    if not any(in_table):
                        continue  # every row has latents in place of these neurons / heads
                    values = scalar.fn(state, layer)  # [b, n, C] or [b, H, n, n]
                    if values.numel() * 4 <= budget:
                        budget -= values.numel() * 4
                        kept[(node_type, metric, layer)] = values
                    write_position = NodeIndex(node_type, layer, 0).write_position
                    for i, row in enumerate(rows):
                        if not in_table[i]:
                            continue
                        if (
                            row.request.upstream_node_to_trace is not None
                            and write_position > row.cut
                        ):
                            continue  # not upstream of the traced node
                        # Nodes of this row: its real tokens (up to the traced token). Pads are
                        # trailing and head pairs with k > q are exact zeros, so slicing suffices.
                        t = min(len(row.tokens), row.upstream_token_limit)
                        if node_type == NodeType.ATTENTION_HEAD:
                            v = values[i, :, :t, :t]
                            sums[i, 0, :t] += v.sum(dim=(0, 2))  # attended from (per query token)
                            sums[i, 1, :t] += v.sum(dim=(0, 1))  # attended to (per key token)
                        else:
                            v = values[i, :t]
                            sums[i, 0, :t] += v.sum(dim=1)
                        k = row.request.top_and_bottom_k
                        wanted = metric in row.request.metrics and node_type in row.node_types
                        if wanted and k and scalar.ranked:
                            cand[i].append((*_top_candidates(v, k, scalar.signed), layer))
                for i, row in enumerate(rows):
                    key = f"{node_type.value}"
                    if node_type == NodeType.ATTENTION_HEAD:
                        token_sums[i].setdefault(f"{key}_attended_from", {})[metric] = sums[
                            i, 0
                        ].tolist()
                        token_sums[i].setdefault(f"{key}_attended_to", {})[metric] = sums[
                            i, 1
                        ].tolist()
                    else:
                        token_sums[i].setdefault(key, {})[metric] = sums[i, 0].tolist()
                    if cand[i]:
                        t = min(len(row.tokens), row.upstream_token_limit)
                        selected[row_groups[i]] |= _select(
                            cand[i], row.request.top_and_bottom_k, node_type, t, self.n_components
                        )
        nodes_of = {g: sorted(sel, key=_node_sort_key) for g, sel in selected.items()}
        self.last_timings["metrics"] = time.perf_counter() - clock
        clock = time.perf_counter()

        # Every metric for every selected node of the group, in every row of it (None where the
        # node is not in that row's prompt). One layer's values are held at a time.
        values_by_row: list[dict[str, list[float | None]]] = [
            {m: [None] * len(nodes_of[row_groups[i]]) for m in metrics} for i in range(len(rows))
        ]
        by_layer: dict[tuple[NodeType, int], list[tuple[int, int, NodeIndex]]] = {}
        for i in range(len(rows)):
            for j, node in enumerate(nodes_of[row_groups[i]]):
                if node.token < lengths[i]:
                    by_layer.setdefault((node.node_type, node.layer), []).append((i, j, node))
        for metric in metrics:
            for (node_type, layer), items in by_layer.items():
                cached = kept.get((node_type, metric, layer))
                values = (
                    cached if cached is not None else REGISTRY[(node_type, metric)].fn(state, layer)
                )
                for i, j, node in items:
                    if node_type == NodeType.ATTENTION_HEAD:
                        value = values[i, node.component, node.token, node.attended_token]
                    else:
                        value = values[i, node.token, node.component]
                    values_by_row[i][metric][j] = float(value)

        self.last_timings["gather"] = time.perf_counter() - clock
        clock = time.perf_counter()
        tok = model.tokenizer
        results = []
        for i, row in enumerate(rows):
            nodes = nodes_of[row_groups[i]]
            views: dict[NodeIndex, NodeTokenViews] = {}
            if row.request.token_views and nodes:
                views = token_views.node_token_views(
                    model,
                    state,
                    i,
                    [nd for nd in nodes if nd.token < lengths[i]],
                    row.request.token_view_k,
                )
            probs = logits[i].float().softmax(-1)
            k = max(row.request.token_view_k, 1)
            results.append(
                SubResult(
                    tokens=row.tokens,
                    token_strings=tok.display_tokens(row.tokens)
                    if tok
                    else [str(t) for t in row.tokens],
                    read_position=_read_position(row),
                    direction_value=directions[i],
                    bias_direct_effect=self._bias_direct_effect(i, row, state),
                    nodes=nodes,
                    metrics=values_by_row[i],
                    token_sums=token_sums[i],
                    top_logits=token_views.scored(model, logits[i], probs, k, largest=True),
                    bottom_logits=token_views.scored(model, logits[i], probs, k, largest=False),
                    target_logits=token_views.scored_ids(model, logits[i], probs, row.targets),
                    distractor_logits=token_views.scored_ids(
                        model, logits[i], probs, row.distractors
                    ),
                    token_views=views,
                    trace_description=_describe_trace(
                        row, tok.display_tokens(row.tokens) if tok else None
                    ),
                )
            )
        self.last_timings["token_views"] = time.perf_counter() - clock
        return results

    def _bias_direct_effect(self, i: int, row: _Row, state: PassState) -> float:
        """Σ over layers before the cut of (b_O + b_out)·g: the part of D written by biases."""
        if state.g is None:
            return 0.0
        g_sum = state.g[i].sum(0)  # biases are written at every token; g is per token
        total = 0.0
        for layer, block in enumerate(self.model.blocks):
            if block.attn.o_proj.bias is not None and 2 * layer + 1 <= row.cut:
                total += float(block.attn.o_proj.bias @ g_sum)
            if block.mlp.w_out.bias is not None and 2 * layer + 2 <= row.cut:
                total += float(block.mlp.w_out.bias @ g_sum)
        return total


# ---- helpers ---------------------------------------------------------------------------------------


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


def loss_value(
    loss_fn: str, logits: torch.Tensor, targets: list[int], distractors: list[int]
) -> torch.Tensor:
    """D for one row from its logits [V] at the read position (terminology.md)."""
    if loss_fn == "zero":
        return logits.sum().detach() * 0.0
    if loss_fn == "probs":
        return logits.softmax(-1)[targets].sum()
    target_mean = logits[targets].mean()
    if loss_fn == "logit_diff" and distractors:
        return target_mean - logits[distractors].mean()
    return target_mean - logits.mean()


def _trace_cut(trace: NodeToTrace, n_layers: int) -> tuple[int, str]:
    """(write position, hook name) of the residual stream just before the traced node."""
    L = trace.node.layer
    if trace.node.node_type.writes_after_attention:
        return 2 * L, f"blocks.{L}.hook_resid_pre"
    return 2 * L + 1, f"blocks.{L}.hook_resid_mid"


def _read_position(row: _Row) -> int:
    up = row.request.upstream_node_to_trace
    return up.node.token if up is not None else len(row.tokens) - 1


def _make_ablation(items: list[tuple[int, NodeAblation]]) -> ForwardHookFn:
    def ablate(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        x = x.clone()
        for row, abl in items:
            n = abl.node
            if hook.name.endswith("hook_pattern"):  # [b, H, q, k]
                keys = slice(0, n.token + 1) if n.attended_token is None else n.attended_token
                x[row, n.component, n.token, keys] = abl.value
            elif hook.name.endswith("mlp.hook_post"):  # [b, n, m]
                x[row, n.token, n.component] = abl.value
            else:  # embeddings [b, n, d]: the activation is 1, so the value scales the write
                x[row, n.token] = x[row, n.token] * abl.value
        return x

    return ablate


def _make_row_detach(row_ids: list[int]) -> ForwardHookFn:
    def detach_rows(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        mask = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        mask[row_ids] = True
        return torch.where(mask.view(-1, *([1] * (x.ndim - 1))), x.detach(), x)

    return detach_rows


def _autoencoder(model: HookedTransformer, node: NodeIndex) -> SparseAutoencoder:
    """The autoencoder of a (validated) latent node."""
    ae = model.autoencoder(node.node_type.autoencoder_side, node.layer)
    assert ae is not None, node
    return ae


def autoencoder_hint(model: HookedTransformer, node_type: NodeType) -> str:
    """Which layers hold an autoencoder of `node_type`'s side, for error messages."""
    side = node_type.autoencoder_side
    layers = latent_layers(model, node_type)
    if layers:
        return f"{side}-side autoencoders are loaded for layers {layers}"
    return f"no {side}-side autoencoder is loaded ({HOW_TO_LOAD})"


HOW_TO_LOAD = (
    "start the server with --autoencoder PATH, or attach one with model.attach_autoencoder"
)


def latent_node_type(
    model: HookedTransformer, layer: int, side: AutoencoderSide | None, fld: str
) -> NodeType:
    """The latent node type of the autoencoder a request names by layer and optional side (the
    wire's "autoencoder_latent"): `side` when given, else that of the layer's only autoencoder.
    RequestError naming `{fld}.nodeType` when the model holds none, `{fld}.layerIndex` when the
    layer holds none, `{fld}.autoencoderSide` when it holds one of each side."""
    if side is not None:
        return LATENT_TYPES[side]
    if not model.autoencoders:
        raise RequestError(_join(fld, "nodeType"), f"no autoencoder is loaded ({HOW_TO_LOAD})")
    sides: list[AutoencoderSide] = [s for s in ("mlp", "attention") if model.autoencoder(s, layer)]
    if not sides:
        held = sorted(
            (ae.cfg.layer, ae.cfg.side)
            for ae in model.autoencoders.values()
            if ae.cfg.layer is not None and ae.cfg.side is not None
        )
        where = ", ".join(f"{side}-side at layer {L}" for L, side in held)
        raise RequestError(
            _join(fld, "layerIndex"), f"layer {layer} holds no autoencoder (loaded: {where})"
        )
    if len(sides) > 1:
        raise RequestError(
            _join(fld, "autoencoderSide"),
            f"layer {layer} holds an MLP-side and an attention-side autoencoder: say which "
            "('mlp' or 'attention')",
        )
    return LATENT_TYPES[sides[0]]


def _make_splice(
    ae: SparseAutoencoder,
    ablations: list[tuple[int, NodeAblation]],
    acts: dict[str, torch.Tensor] | None,
    grads: dict[str, torch.Tensor] | None,
) -> ForwardHookFn:
    """x -> x + decode(z) - decode(z_clean): z_clean = encode(x) without graph, z a leaf copy
    with the ablations applied. decode(z) - decode(z_clean) = ((z - z_clean) W_dec)·s(x) (the
    biases and the normalization's shift cancel), exactly zero where nothing is ablated."""
    name = latent_acts_name(ae.hook_name)

    def splice(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        with torch.no_grad():
            clean = ae.encode(x)  # [b, n, N]
        z = clean.clone()
        for row, abl in ablations:
            z[row, abl.node.token, abl.node.component] = abl.value
        if grads is not None and torch.is_grad_enabled():
            z.requires_grad_(True)
            z.register_hook(lambda g: grads.__setitem__(name, g.detach()))
        if acts is not None:
            acts[name] = z.detach()
        delta = ((z - clean) @ ae.W_dec) * ae.decode_scale(x)
        return x + delta.to(x.dtype)

    return splice


Candidates = tuple[torch.Tensor, torch.Tensor]  # (values [c], flat indices [c]) into one layer


def _top_candidates(
    values: torch.Tensor, k: int, signed: bool
) -> tuple[Candidates, Candidates | None]:
    """Top-k and (when signed) bottom-k candidates of one layer's values ([t, C] per-token, or
    [H, t, t] head pairs), as flat indices into `values`.

    Exact and cheap: rows are all but the last dimension; an element of the top k lies in one of
    the k rows with the largest maxima (otherwise k larger elements exist), so one reduction picks
    k rows and only those are ranked.
    """
    rows = values.reshape(-1, values.shape[-1])

    def side(largest: bool) -> Candidates:
        extreme = rows.amax(dim=1) if largest else rows.amin(dim=1)
        picked = extreme.topk(min(k, rows.shape[0]), largest=largest).indices
        best = rows[picked].topk(min(k, rows.shape[1]), dim=1, largest=largest)
        return best.values.flatten(), (best.indices + picked[:, None] * rows.shape[1]).flatten()

    return side(True), side(False) if signed else None


def _select(
    cand: list[tuple[Candidates, Candidates | None, int]],
    k: int,
    node_type: NodeType,
    t: int,
    n_components: Callable[[NodeType, int], int],
) -> set[NodeIndex]:
    """Exact top-k (largest positive) and bottom-k (most negative) across layers from the
    per-layer candidates; nodes whose value is exactly zero are never selected. `t` is the number
    of tokens the candidates' flat indices were computed over; `n_components(type, layer)` the
    width of a per-token layer."""
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
                c = n_components(node_type, layer)
                out.add(_unflatten(node_type, layer, int(flat[j]), t, c))
    return out


def _unflatten(node_type: NodeType, layer: int, flat: int, t: int, c: int) -> NodeIndex:
    """The node at flat index `flat` of one layer's values: [H, t, t] for heads, else [t, c]."""
    if node_type == NodeType.ATTENTION_HEAD:  # [H, t, t]
        head, rest = divmod(flat, t * t)
        q, key = divmod(rest, t)
        return NodeIndex(node_type, layer, q, head, key)
    token, comp = divmod(flat, c)
    return NodeIndex(node_type, layer, token, comp)


def _node_sort_key(node: NodeIndex) -> tuple[int, int, int, int, int]:
    return (
        ALL_NODE_TYPES.index(node.node_type),
        node.layer,
        node.token,
        -1 if node.attended_token is None else node.attended_token,
        node.component,
    )


def _describe_trace(row: _Row, strings: list[str] | None) -> str | None:
    up = row.request.upstream_node_to_trace
    if up is None:
        return None

    def at(t: int) -> str:
        return f"{strings[t]!r} ({t})" if strings else f"({t})"

    node = up.node
    if node.node_type == NodeType.MLP_NEURON:
        text = f"What caused mlp L{node.layer} #{node.component} at {at(node.token)}?"
    elif node.node_type.is_latent:
        side = "attn" if node.node_type.writes_after_attention else "mlp"
        text = f"What caused {side} latent L{node.layer} #{node.component} at {at(node.token)}?"
    else:
        assert node.attended_token is not None
        side = {
            AttentionTraceType.QUERY: "through the query",
            AttentionTraceType.KEY: "through the key",
            AttentionTraceType.QUERY_AND_KEY: "through the query and key",
            AttentionTraceType.VALUE: "through the value",
        }[up.attention_trace_type or AttentionTraceType.QUERY_AND_KEY]
        text = (
            f"What caused attn L{node.layer} H{node.component} at {at(node.token)} to attend to "
            f"{at(node.attended_token)}, {side}?"
        )
    down = row.request.downstream_node_to_trace
    if down is not None:
        text = text[:-1] + f", as it affects {down.node}?"
    return text


def run_debugger_request(
    model: HookedTransformer,
    sub_requests: Sequence[SubRequest],
    max_prompt_tokens: int | None = None,
) -> list[SubResult]:
    """Run a batch of sub-requests with one forward and one backward; see `Engine`."""
    return Engine(model, max_prompt_tokens).run(sub_requests)
