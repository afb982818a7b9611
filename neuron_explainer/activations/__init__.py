"""The request engine: derived scalars, ablations, tracing and token-space views
(docs/engine.md). Importing it registers every node type (`activations/node_types/`)."""

from neuron_explainer.activations.derived_scalars import (
    METRICS,
    REGISTRY,
    PassState,
    derived_scalar,
)
from neuron_explainer.activations.engine import Engine, run_debugger_request
from neuron_explainer.activations.nodes import (
    AttentionTraceType,
    FieldPath,
    NodeAblation,
    NodeIndex,
    NodeToTrace,
    NodeType,
    NodeTypeDescription,
    PromptTooLongError,
    RequestError,
    describe,
    node_types,
)
from neuron_explainer.activations.request import SubRequest, SubResult
from neuron_explainer.activations.token_views import NodeTokenViews, ScoredKeyToken, ScoredToken

__all__ = [
    "METRICS",
    "REGISTRY",
    "AttentionTraceType",
    "Engine",
    "FieldPath",
    "NodeAblation",
    "NodeIndex",
    "NodeToTrace",
    "NodeTokenViews",
    "NodeType",
    "NodeTypeDescription",
    "PassState",
    "PromptTooLongError",
    "RequestError",
    "ScoredKeyToken",
    "ScoredToken",
    "SubRequest",
    "SubResult",
    "derived_scalar",
    "describe",
    "node_types",
    "run_debugger_request",
]
