"""The sentence a trace comes with (`traceDescription`): through a head's value it describes the
pair's direct effect through the value, never a pre-activation (issue 14, defect 6)."""

from __future__ import annotations

from neuron_explainer.activations.nodes import AttentionTraceType, NodeIndex, NodeToTrace, NodeType
from neuron_explainer.activations.request import describe_trace

TOKENS = ["When", " Mary", " and", " John", " to"]
HEAD = NodeIndex(NodeType.ATTENTION_HEAD, 10, 4, 2, 1)
NEURON = NodeIndex(NodeType.MLP_NEURON, 11, 4, 5)


def test_a_value_trace_names_the_value_and_what_it_affects() -> None:
    up = NodeToTrace(HEAD, AttentionTraceType.VALUE)
    to_loss = describe_trace(up, None, TOKENS)
    assert to_loss == (
        "What drives the effect of attn L10 H2 at ' to' (4) attending to ' Mary' (1) through its "
        "value on the loss?"
    )
    into = describe_trace(up, NodeToTrace(NEURON, None), TOKENS)
    assert into is not None and into.endswith("on the pre-activation of mlp L11 #5 at ' to' (4)?")
    assert "What caused" not in into and "NodeIndex" not in into


def test_other_traces_ask_what_caused_the_node() -> None:
    assert describe_trace(NodeToTrace(NEURON, None), None, TOKENS) == (
        "What caused mlp L11 #5 at ' to' (4)?"
    )
    key = describe_trace(NodeToTrace(HEAD, AttentionTraceType.KEY), None, TOKENS)
    assert key == "What caused attn L10 H2 at ' to' (4) to attend to ' Mary' (1), through the key?"
