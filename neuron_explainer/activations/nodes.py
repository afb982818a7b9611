"""The vocabulary of a debugger request (docs/terminology.md): node types and their descriptions,
nodes, ablations, trace targets, and the errors the library raises for bad input.

A node index is (node type, layer, token index, [attended-to token index], component index), used
verbatim in requests, responses, URLs and tables.

**Each node type is described once**, by a `NodeTypeDescription` registered from its own module in
`activations/node_types/` together with its math (derived scalars, token views): what it is
called, where it writes, how wide a layer of it is, which hook points an ablation, a trace and its
token views read, how it is collated into datasets and how the API names it. The engine, token
views, general queries, the server's conversion, dataset families and the UI (through
`/model_info`) all read the description; none of them names a node type. docs/node-types.md lists
what adding one takes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import torch

from neuron_explainer.models.autoencoders import AutoencoderSide, SparseAutoencoder
from neuron_explainer.models.hooks import ForwardHookFn
from neuron_explainer.models.transformer import HookedTransformer


class NodeType(StrEnum):
    """The node types, in the order of node tables. Each has a description (`describe`)."""

    EMBEDDING = "embedding"
    MLP_NEURON = "mlp_neuron"
    ATTENTION_HEAD = "attention_head"
    # Latents of the autoencoder a block holds for its attention output (hook_attn_out) or for
    # its MLP (hook_mlp_out or mlp.hook_post): (side, layer) names the autoencoder. On the wire
    # both are "autoencoder_latent" with an `autoencoderSide`.
    ATTENTION_AUTOENCODER_LATENT = "attention_autoencoder_latent"
    MLP_AUTOENCODER_LATENT = "mlp_autoencoder_latent"

    @property
    def description(self) -> NodeTypeDescription:
        return describe(self)

    @property
    def is_latent(self) -> bool:
        """Whether nodes of this type are latents of a spliced autoencoder."""
        return describe(self).splice is not None

    @property
    def autoencoder_side(self) -> AutoencoderSide:
        """The side of the block a latent type's autoencoder reads (latent types only)."""
        side = describe(self).autoencoder_side
        if side is None:
            raise ValueError(f"{self.value} is not an autoencoder latent type")
        return side

    @property
    def writes_after_attention(self) -> bool:
        """True for node types written by a block's attention (heads, attention-side latents)."""
        return describe(self).writes == "attention"


class AttentionTraceType(StrEnum):
    """Which side of an attention head pair a trace goes through."""

    QUERY = "query"
    KEY = "key"
    QUERY_AND_KEY = "query_and_key"
    VALUE = "value"


# ---- errors ----------------------------------------------------------------------------------------

FieldPath = tuple[str | int, ...]
ErrorKind = Literal["invalid", "too_large"]


class RequestError(ValueError):
    """Input the library rejects. `path` names the offending field relative to what the caller
    passed, in the library's own names: `(1, "node_ablations", 0, "node", "layer")` is the layer of
    the first ablation of sub-request 1. `kind` says what is wrong: "invalid" (a value the model
    cannot take) or "too_large" (over a limit: prompt length, memory). A server maps both to its
    own field names and status codes."""

    kind: ErrorKind = "invalid"

    def __init__(self, path: FieldPath | str, message: str) -> None:
        self.path: FieldPath = (path,) if isinstance(path, str) else tuple(path)
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return f"{format_path(self.path)}: {self.message}" if self.path else self.message


class PromptTooLongError(RequestError):
    kind: ErrorKind = "too_large"


def format_path(path: FieldPath) -> str:
    """(1, "node_ablations", 0, "node") -> "1.node_ablations[0].node" (for messages)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


@contextlib.contextmanager
def at(*path: str | int) -> Iterator[None]:
    """Prefix the path of any RequestError raised inside with `path` (where the checked value sits
    in the caller's input), so checks state paths relative to what they were given."""
    try:
        yield
    except RequestError as e:
        e.path = (*path, *e.path)
        raise


# ---- nodes -----------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class NodeIndex:
    node_type: NodeType
    layer: int
    token: int
    component: int = 0
    attended_token: int | None = None  # attention head pairs only: the key token

    def __str__(self) -> str:
        desc = describe(self.node_type)
        if desc.writes == "embedding":
            return f"{desc.short_name} ({self.token})"
        if desc.per_token_pair:
            where = f"({self.token}->{self.attended_token})"
            return f"{desc.short_name} L{self.layer} H{self.component} {where}"
        return f"{desc.short_name} L{self.layer} #{self.component} ({self.token})"

    @property
    def write_position(self) -> int:
        """Where in the residual stream the node writes: 0 embeddings, 2L+1 a block's attention
        (heads, attention-side latents), 2L+2 its MLP (neurons, MLP-side latents)."""
        return write_position(self.node_type, self.layer)


def write_position(node_type: NodeType, layer: int) -> int:
    writes = describe(node_type).writes
    return 0 if writes == "embedding" else 2 * layer + (1 if writes == "attention" else 2)


@dataclass(frozen=True)
class NodeAblation:
    """Set a node's activation to `value` during the forward pass.

    For an attention head with `attended_token` None, every key of the query row is set.
    For an embedding node the activation is 1, so `value` scales the embedding (0 removes it).
    """

    node: NodeIndex
    value: float = 0.0


@dataclass(frozen=True)
class NodeToTrace:
    node: NodeIndex
    attention_trace_type: AttentionTraceType | None = None  # required for attention heads


# ---- node type descriptions ------------------------------------------------------------------------

Live = dict[str, torch.Tensor]  # hook values with their graph, by hook name
Recorded = dict[str, torch.Tensor]  # hook values (or their gradients) kept for derived scalars


@dataclass(frozen=True)
class Ablation:
    """How nodes of a type are ablated in place: the hook points holding a node's activation
    (`hooks(model, node)`) and `set(x, row, node, value)` on a clone of the value there."""

    hooks: Callable[[HookedTransformer, NodeIndex], list[str]]
    set: Callable[[torch.Tensor, int, NodeIndex, float], None]


@dataclass(frozen=True)
class Trace:
    """Tracing a node upstream (docs/engine.md §5): the hook values `pre_activation` needs with
    their graph, and the node's pre-activation (a scalar with graph) in one batch row. `value`,
    for attention heads, is the pair's direct effect on a downstream gradient `g` [d] (the trace
    through the value), or None where a type has no value side."""

    hooks: Callable[[HookedTransformer, NodeToTrace], set[str]]
    pre_activation: Callable[[HookedTransformer, Live, int, NodeToTrace], torch.Tensor]
    value: (
        Callable[[HookedTransformer, Live, int, NodeIndex, torch.Tensor], torch.Tensor] | None
    ) = None


@dataclass(frozen=True)
class Splice:
    """Node types whose components exist only while a module is spliced into the forward pass
    (autoencoder latents): the module a layer holds (None: none there), and the forward hook that
    splices it in with these (batch row, ablation) pairs applied, recording the latents (and,
    with `grads`, their gradients) under `acts_name(module)`."""

    module: Callable[[HookedTransformer, int], SparseAutoencoder | None]
    hook: Callable[
        [SparseAutoencoder, list[tuple[int, NodeAblation]], Recorded | None, Recorded | None],
        ForwardHookFn,
    ]
    acts_name: Callable[[SparseAutoencoder], str]


@dataclass(frozen=True)
class NodeTypeDescription:
    """Everything the code needs to know about one node type. The math that goes with it (its
    derived scalars, its token views) is registered beside it from the same module."""

    node_type: NodeType
    label: str  # "MLP neuron": tables, messages, the UI
    short_name: str  # "mlp": names nodes, "mlp L5 #123 (4)"
    key: str  # "mlp": the UI's node keys in URLs ("mlp:5:4:123"), URL-safe
    writes: Literal["embedding", "attention", "mlp"]  # where its write enters the residual stream
    width: Callable[[HookedTransformer, int], int]  # components in a layer (0: none there)
    per_token_pair: bool = False  # one node per (query token, key token <= query) pair
    ablation: Ablation | None = None  # None: ablated through its splice
    trace: Trace | None = None  # None: nothing to trace (the embedding)
    splice: Splice | None = None
    # Hook values its token views read in a layer (docs/engine.md §6).
    view_hooks: Callable[[HookedTransformer, int], set[str]] = lambda model, layer: set()
    # How many lists a node's token views hold (each of up to tokenViewK tokens), for the size
    # estimate of a request (limits.py); the default counts every list there is.
    token_view_lists: int = 7
    # In a layer holding nodes of this type, they replace those of `replaces` in node tables
    # (latents replace the neurons / heads of their block) when a request asks for them.
    replaces: NodeType | None = None
    # The metric collated per component into datasets (None: not collated).
    dataset_metric: str | None = None
    # How the HTTP API names it: a wire node type, and an autoencoder side for latents.
    api_name: str = ""
    autoencoder_side: AutoencoderSide | None = None
    # Where a model has nodes of this type, or how to get some, for error messages.
    availability: Callable[[HookedTransformer], str] = lambda model: ""

    @property
    def name(self) -> str:
        return self.node_type.value

    def layers(self, model: HookedTransformer) -> list[int]:
        """The layers holding nodes of this type (the embedding: [0])."""
        n = 1 if self.writes == "embedding" else model.cfg.n_layers
        return [layer for layer in range(n) if self.width(model, layer) > 0]


DESCRIPTIONS: dict[NodeType, NodeTypeDescription] = {}


def register_node_type(description: NodeTypeDescription) -> NodeTypeDescription:
    DESCRIPTIONS[description.node_type] = description
    return description


def describe(node_type: NodeType) -> NodeTypeDescription:
    """The description of a node type (KeyError for one whose module was not imported)."""
    return DESCRIPTIONS[node_type]


def node_types() -> list[NodeType]:
    """The described node types, in table order."""
    return [t for t in NodeType if t in DESCRIPTIONS]


def by_api_name(api_name: str, side: AutoencoderSide | None = None) -> list[NodeType]:
    """The node types the API calls `api_name` (with `side`, when given), in table order."""
    return [
        t
        for t in node_types()
        if describe(t).api_name == api_name
        and (side is None or describe(t).autoencoder_side == side)
    ]
