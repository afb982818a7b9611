"""Token-space views of nodes (docs/engine.md §6): which vocabulary tokens a node's write promotes,
and which input tokens would raise its pre-activation.

- Upvoted output tokens: the node's write vector through the final norm's linear part (centering
  for LayerNorm, gain) and the unembedding, minus the vocabulary mean (a logit lens of the write).
- Input tokens that upvote a node: the gradient of the node's pre-activation with respect to its
  input residual (norm scale fixed) dotted with every token embedding. Heads: query and key sides.

Each node type registers how it queues its vectors (`@token_view`, from its module in
`activations/node_types/`); this module projects them all onto the vocabulary at once and ranks.
Nodes that share a direction up to a scalar (a neuron at different tokens) share one projection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from neuron_explainer.activations.derived_scalars import PassState
from neuron_explainer.activations.nodes import NodeIndex, NodeType
from neuron_explainer.models.transformer import HookedTransformer, Norm


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
    """Token-space views of one node; lists are ordered best first."""

    upvoted_output_tokens: list[ScoredToken] = field(default_factory=list)
    downvoted_output_tokens: list[ScoredToken] = field(default_factory=list)
    # Neurons: input tokens whose embedding raises / lowers the pre-activation. Heads: the query side.
    upvoting_input_tokens: list[ScoredToken] = field(default_factory=list)
    downvoting_input_tokens: list[ScoredToken] = field(default_factory=list)
    # Heads only: the key side of the attention score.
    upvoting_key_tokens: list[ScoredToken] = field(default_factory=list)
    downvoting_key_tokens: list[ScoredToken] = field(default_factory=list)
    # Attention-side latents only: the key tokens the latent's value came from.
    token_pair_attributions: list[ScoredKeyToken] = field(default_factory=list)


def token_text(model: HookedTransformer, token: int) -> str:
    return model.tokenizer.token_display(token) if model.tokenizer else str(token)


def scored(
    model: HookedTransformer, logits: torch.Tensor, probs: torch.Tensor, k: int, largest: bool
) -> list[ScoredToken]:
    """The top (or bottom) k logits [V] with their tokens and probabilities."""
    top = logits.float().topk(min(k, logits.numel()), largest=largest)
    return [
        ScoredToken(int(i), token_text(model, int(i)), float(v), float(probs[i]))
        for v, i in zip(top.values, top.indices, strict=True)
    ]


def scored_ids(
    model: HookedTransformer, logits: torch.Tensor, probs: torch.Tensor, ids: Sequence[int]
) -> list[ScoredToken]:
    return [ScoredToken(i, token_text(model, i), float(logits[i]), float(probs[i])) for i in ids]


def norm_linear(norm: Norm, vectors: torch.Tensor) -> torch.Tensor:
    """The norm's action on directions with its scale held fixed (up to 1/scale): center, gain."""
    if norm.kind == "layernorm":
        vectors = vectors - vectors.mean(-1, keepdim=True)
    return vectors * norm.weight


def norm_linear_transpose(norm: Norm, grads: torch.Tensor) -> torch.Tensor:
    """Pull a gradient w.r.t. the norm's output back to its input (scale fixed, up to 1/scale)."""
    grads = grads * norm.weight
    if norm.kind == "layernorm":
        grads = grads - grads.mean(-1, keepdim=True)
    return grads


class _Projector:
    """Direction vectors to project onto one vocabulary matrix, deduplicated by key."""

    def __init__(self) -> None:
        self.keys: dict[object, int] = {}
        self.vectors: list[torch.Tensor] = []
        self.refs: dict[NodeIndex, tuple[int, float]] = {}  # node -> (vector, factor)

    def add(
        self,
        node: NodeIndex,
        key: object,
        vector: torch.Tensor | Callable[[], torch.Tensor],
        factor: float,
    ) -> None:
        if key not in self.keys:
            self.keys[key] = len(self.vectors)
            self.vectors.append(vector() if callable(vector) else vector)
        self.refs[node] = (self.keys[key], factor)


class ViewQueue:
    """What one batch row's token views project: a node type's view function queues, per node,
    the vector of its output view (`output`), of its input view (`input`; heads: the query side)
    and of a head's key side (`key_side`), each with a scalar factor (a negative factor swaps
    the up and down lists); `pairs` takes token-pair attributions, computed directly."""

    def __init__(self, model: HookedTransformer, state: PassState, row: int, k: int) -> None:
        self.model, self.state, self.row, self.k = model, state, row, k
        self.output, self.input, self.key_side = _Projector(), _Projector(), _Projector()
        self.pairs: dict[NodeIndex, list[ScoredKeyToken]] = {}
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the rotary positions of this batch in block `layer` (rotary models)."""
        rotary = self.model.rotary_for(layer)
        if id(rotary) not in self._rope:
            n = self.state.acts["hook_embed"].shape[1]
            positions = torch.arange(n, device=self.model.device)[None]
            self._rope[id(rotary)] = rotary.cos_sin(positions, self.model.dtype)
        return self._rope[id(rotary)]

    def act(self, name: str) -> torch.Tensor | None:
        """A recorded hook value, or None when it was not recorded (that view stays empty)."""
        return self.state.acts.get(name)


ViewFn = Callable[[ViewQueue, NodeIndex], None]
VIEWS: dict[NodeType, ViewFn] = {}


def token_view(node_type: NodeType) -> Callable[[ViewFn], ViewFn]:
    """Register how nodes of `node_type` queue their token views."""

    def register(fn: ViewFn) -> ViewFn:
        VIEWS[node_type] = fn
        return fn

    return register


# Per unique vector: (top scores, top ids, bottom scores, bottom ids) as Python lists.
Ranked = list[tuple[list[float], list[int], list[float], list[int]]]


# Vocabulary scores are computed this many bytes at a time (a block of vectors against the whole
# vocabulary), so memory stays bounded however many nodes have views (limits.py counts it).
SCORE_CHUNK_BYTES = 64 * 2**20


def _rank_all(
    jobs: list[tuple[_Projector, torch.Tensor, bool]],
    k: int,
    check: Callable[[], None] = lambda: None,
) -> list[Ranked]:
    """Project every projector's vectors onto its vocabulary matrix and rank them, a block of
    vectors at a time (`check` is called before each block). Projectors sharing a matrix (W_E
    and W_U are one tensor with tied embeddings) share the matmuls."""
    results: list[Ranked] = [[] for _ in jobs]
    by_matrix: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for j, (proj, matrix, _) in enumerate(jobs):
        if proj.vectors:
            key = (matrix.untyped_storage().data_ptr(), tuple(matrix.stride()))
            by_matrix.setdefault(key, []).append(j)
    for members in by_matrix.values():
        matrix = jobs[members[0]][1]
        stacked = torch.cat([torch.stack(jobs[j][0].vectors) for j in members])  # [U, d]
        # 1.0 for the rows whose scores are centred over the vocabulary (logit-lens views).
        center = torch.cat(
            [
                torch.full((len(jobs[j][0].vectors), 1), float(jobs[j][2]), device=matrix.device)
                for j in members
            ]
        )
        vocab = matrix.shape[-1]
        kk = min(k, vocab)
        block = max(1, SCORE_CHUNK_BYTES // (vocab * matrix.element_size()))
        tops, top_ids, bottoms, bottom_ids = [], [], [], []
        for lo in range(0, stacked.shape[0], block):
            check()
            scores = stacked[lo : lo + block] @ matrix  # [block, V]
            c = center[lo : lo + block].to(scores.dtype)
            if bool(c.any()):
                scores -= scores.mean(-1, keepdim=True) * c
            top, bottom = scores.topk(kk), scores.topk(kk, largest=False)
            tops.append(top.values)
            top_ids.append(top.indices)
            bottoms.append(bottom.values)
            bottom_ids.append(bottom.indices)
            del scores
        ranked = list(
            zip(
                torch.cat(tops).tolist(),
                torch.cat(top_ids).tolist(),
                torch.cat(bottoms).tolist(),
                torch.cat(bottom_ids).tolist(),
                strict=True,
            )
        )
        start = 0
        for j in members:
            n = len(jobs[j][0].vectors)
            results[j] = ranked[start : start + n]
            start += n
    return results


def _lists(
    model: HookedTransformer, ranked: Ranked, ref: tuple[int, float]
) -> tuple[list[ScoredToken], list[ScoredToken]]:
    """(up, down) lists for a unique vector scaled by a factor (a negative factor swaps them)."""
    u, factor = ref
    tv, ti, bv, bi = ranked[u]
    up = [ScoredToken(i, token_text(model, i), v * factor) for v, i in zip(tv, ti, strict=True)]
    down = [ScoredToken(i, token_text(model, i), v * factor) for v, i in zip(bv, bi, strict=True)]
    return (up, down) if factor >= 0 else (down, up)


def node_token_views(
    model: HookedTransformer,
    state: PassState,
    row: int,
    nodes: Sequence[NodeIndex],
    k: int,
    check: Callable[[], None] = lambda: None,
) -> dict[NodeIndex, NodeTokenViews]:
    """The token views of `nodes` in batch row `row`; views whose hook values were not recorded
    are left empty. `check` is called every few hundred nodes and before each block of
    vocabulary scores (it raises to stop the work: a cancellation)."""
    queue = ViewQueue(model, state, row, k)
    for n, node in enumerate(nodes):
        if n % 256 == 0:
            check()
        VIEWS[node.node_type](queue, node)
    ranked_out, ranked_in, ranked_key = _rank_all(
        [
            (queue.output, model.W_U, True),
            (queue.input, model.W_E.T, False),
            (queue.key_side, model.W_E.T, False),
        ],
        k,
        check,
    )
    views: dict[NodeIndex, NodeTokenViews] = {}
    for n, node in enumerate(nodes):
        if n % 256 == 0:
            check()
        v = NodeTokenViews()
        if node in queue.output.refs:
            v.upvoted_output_tokens, v.downvoted_output_tokens = _lists(
                model, ranked_out, queue.output.refs[node]
            )
        if node in queue.input.refs:
            v.upvoting_input_tokens, v.downvoting_input_tokens = _lists(
                model, ranked_in, queue.input.refs[node]
            )
        if node in queue.key_side.refs:
            v.upvoting_key_tokens, v.downvoting_key_tokens = _lists(
                model, ranked_key, queue.key_side.refs[node]
            )
        v.token_pair_attributions = queue.pairs.get(node, [])
        views[node] = v
    return views
