"""Nodes, ablations and trace targets: the vocabulary of a debugger request (terminology.md).

A node index is (node type, layer, token index, [attended-to token index], component index), used
verbatim in requests, responses, URLs and tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class NodeType(StrEnum):
    EMBEDDING = "embedding"
    MLP_NEURON = "mlp_neuron"
    ATTENTION_HEAD = "attention_head"
    # Latents of the autoencoder a block holds for its MLP (at hook_mlp_out or mlp.hook_post) or
    # for its attention output (hook_attn_out): (side, layer) names the autoencoder. On the wire
    # both are "autoencoder_latent" with an `autoencoderSide`.
    MLP_AUTOENCODER_LATENT = "mlp_autoencoder_latent"
    ATTENTION_AUTOENCODER_LATENT = "attention_autoencoder_latent"

    @property
    def is_latent(self) -> bool:
        return self in (NodeType.MLP_AUTOENCODER_LATENT, NodeType.ATTENTION_AUTOENCODER_LATENT)

    @property
    def autoencoder_side(self) -> Literal["mlp", "attention"]:
        """The side of the block a latent type's autoencoder reads (latent types only)."""
        if self == NodeType.MLP_AUTOENCODER_LATENT:
            return "mlp"
        if self == NodeType.ATTENTION_AUTOENCODER_LATENT:
            return "attention"
        raise ValueError(f"{self.value} is not an autoencoder latent type")

    @property
    def writes_after_attention(self) -> bool:
        """True for node types written by a block's attention (heads, attention-side latents)."""
        return self in (NodeType.ATTENTION_HEAD, NodeType.ATTENTION_AUTOENCODER_LATENT)


LATENT_TYPES = {
    "mlp": NodeType.MLP_AUTOENCODER_LATENT,
    "attention": NodeType.ATTENTION_AUTOENCODER_LATENT,
}


class AttentionTraceType(StrEnum):
    """Which side of an attention head pair a trace goes through."""

    QUERY = "query"
    KEY = "key"
    QUERY_AND_KEY = "query_and_key"
    VALUE = "value"


class RequestError(ValueError):
    """Invalid input to the engine. `field` names the offending field (camelCase, API style)."""

    status_code = 400

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class PromptTooLongError(RequestError):
    status_code = 413


@dataclass(frozen=True, order=True)
class NodeIndex:
    node_type: NodeType
    layer: int
    token: int
    component: int = 0
    attended_token: int | None = None  # attention head pairs only: the key token

    def __str__(self) -> str:
        if self.node_type == NodeType.ATTENTION_HEAD:
            return f"attn L{self.layer} H{self.component} ({self.token}->{self.attended_token})"
        if self.node_type == NodeType.MLP_NEURON:
            return f"mlp L{self.layer} #{self.component} ({self.token})"
        if self.node_type.is_latent:
            side = self.node_type.autoencoder_side
            return f"{'attn' if side == 'attention' else 'mlp'} latent L{self.layer} #{self.component} ({self.token})"
        return f"embedding ({self.token})"

    @property
    def write_position(self) -> int:
        """Where in the residual stream the node writes: 0 embeddings, 2L+1 attention (heads,
        attention-side latents), 2L+2 MLP (neurons, MLP-side latents)."""
        if self.node_type == NodeType.EMBEDDING:
            return 0
        return 2 * self.layer + (1 if self.node_type.writes_after_attention else 2)


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
