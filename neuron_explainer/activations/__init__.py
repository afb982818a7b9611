"""The request engine: derived scalars, ablations, tracing and token-space views."""

from neuron_explainer.activations.derived_scalars import (
    METRICS,
    REGISTRY,
    PassState,
    derived_scalar,
)
from neuron_explainer.activations.engine import (
    Engine,
    NodeTokenViews,
    ScoredToken,
    SubRequest,
    SubResult,
    run_debugger_request,
)
from neuron_explainer.activations.nodes import (
    AttentionTraceType,
    NodeAblation,
    NodeIndex,
    NodeToTrace,
    NodeType,
    PromptTooLongError,
    RequestError,
)

__all__ = [
    "METRICS",
    "REGISTRY",
    "AttentionTraceType",
    "Engine",
    "NodeAblation",
    "NodeIndex",
    "NodeToTrace",
    "NodeTokenViews",
    "NodeType",
    "PassState",
    "PromptTooLongError",
    "RequestError",
    "ScoredToken",
    "SubRequest",
    "SubResult",
    "derived_scalar",
    "run_debugger_request",
]
