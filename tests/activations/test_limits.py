"""Resource limits and cancellation in the library (docs/engine.md §9): the size estimate bounds what
a request returns, a request over a limit is refused before any of it runs, and a cancelled or
expired token stops a pass or a generation at its next check. On a small random GPT-2, so that
every property is checked on exact counts; no test depends on timing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from neuron_explainer.activations import (
    Engine,
    NodeIndex,
    NodeToTrace,
    NodeType,
    PromptTooLongError,
    SubRequest,
    SubResult,
    limits,
    token_views,
)
from neuron_explainer.activations.limits import Estimate, LimitError
from neuron_explainer.activations.processing import generate
from neuron_explainer.models import HookedTransformer
from neuron_explainer.models.cancellation import Cancelled, CancelToken, DeadlineExceeded
from neuron_explainer.models.hooks import HookPoint

PROMPTS = [[5, 17, 3, 99, 42, 8, 61, 7], [5, 17, 3, 99, 42, 8, 60, 7, 11, 2]]


def request(prompt: list[int], **kw: object) -> SubRequest:
    return SubRequest(prompt, target_tokens=[3], distractor_tokens=[4], **kw)  # type: ignore[arg-type]


def entries(result: SubResult) -> int:
    """Scored tokens in a result's token views."""
    return sum(
        len(v.upvoted_output_tokens)
        + len(v.downvoted_output_tokens)
        + len(v.upvoting_input_tokens)
        + len(v.downvoting_input_tokens)
        + len(v.upvoting_key_tokens)
        + len(v.downvoting_key_tokens)
        + len(v.token_pair_attributions)
        for v in result.token_views.values()
    )


@contextmanager
def counting(model: HookedTransformer, name: str) -> Iterator[list[int]]:
    """How many times the hook point `name` runs inside the block (one element per call)."""
    calls: list[int] = []

    def count(x: torch.Tensor, hook: HookPoint) -> None:
        calls.append(1)

    with model.hooks(fwd=[(name, count)]):
        yield calls


TRACE = NodeToTrace(NodeIndex(NodeType.MLP_NEURON, 2, 5, 7))
CASES = {
    "one row": ([request(PROMPTS[0], top_and_bottom_k=50, token_view_k=20)], None),
    "k larger than the prompt has nodes": (
        [request(PROMPTS[0], top_and_bottom_k=1000, token_view_k=200)],
        None,
    ),
    "a group of two prompts": (
        [request(p, top_and_bottom_k=30, token_view_k=7) for p in PROMPTS],
        None,
    ),
    "two groups, one without views": (
        [
            request(PROMPTS[0], top_and_bottom_k=30),
            request(PROMPTS[1], top_and_bottom_k=30, token_views=False),
        ],
        [0, 1],
    ),
    "a trace": ([request(PROMPTS[1], top_and_bottom_k=40, upstream_node_to_trace=TRACE)], None),
    "the zero loss": ([SubRequest(PROMPTS[0], loss_fn="zero", top_and_bottom_k=40)], None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_estimate_bounds_the_node_table_and_token_views(
    model: HookedTransformer, case: str
) -> None:
    """Every count the estimate makes before running is at least what the run returns."""
    requests, groups = CASES[case]
    engine = Engine(model)
    est = engine.estimate(requests, groups)
    results = engine.run(requests, groups)
    assert est == engine.last_estimate
    assert sum(len(r.nodes) for r in results) <= est.table_rows
    assert sum(entries(r) for r in results) <= est.view_entries
    assert est.result_bytes >= est.table_rows * limits.NODE_JSON_BYTES
    assert est.result_memory_bytes == limits.MEMORY_PER_JSON_BYTE * est.result_bytes


def test_a_result_over_the_limit_is_refused_before_the_pass(model: HookedTransformer) -> None:
    """The estimate is checked before the forward: nothing runs, and the error names the limit
    as applied and the fields to lower, largest contribution first."""
    big = request(PROMPTS[0], top_and_bottom_k=1000, token_view_k=200)
    need = Engine(model).estimate([big]).result_bytes
    engine = Engine(model, max_result_bytes=need - 1, result_limit_name="the test's cap")
    with counting(model, "hook_embed") as forwards, pytest.raises(LimitError) as info:
        engine.run([request(PROMPTS[1]), big])
    assert forwards == []
    error = info.value
    assert error.kind == "too_large" and isinstance(error, PromptTooLongError)
    assert error.path == (1, "token_view_k")
    assert error.lower == ((1, "token_view_k"), (1, "top_and_bottom_k"))
    assert f"the limit is {limits.format_bytes(need - 1)} (the test's cap)" in error.message
    assert str(error).endswith(
        "; lower [1].token_view_k or [1].top_and_bottom_k, or send fewer sub-requests"
    )
    # Within the limit it runs.
    engine.max_result_bytes = need
    engine.run([big])


def estimate(**kw: int) -> Estimate:
    base = dict(
        rows=1,
        tokens=100,
        pass_bytes=2**30,
        views_bytes=0,
        table_rows=1000,
        view_entries=10**6,
        result_bytes=2**28,
        result_memory_bytes=6 * 2**30,
    )
    return Estimate(**(base | kw), lower=((0, "token_view_k"), (0, "top_and_bottom_k")))  # type: ignore[arg-type]


def test_the_memory_limit_message_states_the_limit_applied() -> None:
    """No hidden safety factor: the message gives the limit checked and where it comes from."""
    cpu = torch.device("cpu")
    limits.check(estimate(), cpu, None, "", 0.9, None, free_host=8 * 2**30)  # 7 GiB <= 7.2 GiB
    with pytest.raises(LimitError) as info:
        limits.check(estimate(), cpu, None, "", 0.9, None, free_host=7 * 2**30)
    assert info.value.message == (
        "1 sub-request of up to 100 tokens would need about 7.0 GiB of memory on cpu (the pass "
        "1.0 GiB, token views 0.0 MiB, the result as objects and JSON 6.0 GiB); the limit is 6.3 GiB "
        "(90 % of the 7.0 GiB available)"
    )
    assert info.value.path == (0, "token_view_k")  # the result is most of it: lower its fields
    # A pass too large for the device: the prompts are what to change.
    gpu = torch.device("cuda:0")
    with pytest.raises(LimitError) as info:
        limits.check(estimate(), gpu, None, "", 0.5, free_device=2**30, free_host=2**40)
    assert "the limit is 512 MiB (50 % of the 1.0 GiB available)" in info.value.message
    assert "Send shorter prompts or fewer sub-requests" in info.value.message
    assert info.value.path == () and info.value.lower == ()


def test_token_views_are_the_same_computed_a_row_at_a_time(
    model: HookedTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The vocabulary scores are computed in blocks of bounded memory; the blocks' size changes
    nothing."""
    req = [request(p, top_and_bottom_k=20, token_view_k=5) for p in PROMPTS]
    whole = Engine(model).run(req)
    monkeypatch.setattr(token_views, "SCORE_CHUNK_BYTES", 1)  # one vector per block
    blocks = Engine(model).run(req)
    for a, b in zip(whole, blocks, strict=True):
        assert a.nodes == b.nodes
        for node, view in a.token_views.items():
            other = b.token_views[node]
            for name in ("upvoted_output_tokens", "upvoting_input_tokens", "downvoting_key_tokens"):
                got, want = getattr(other, name), getattr(view, name)
                assert [t.token for t in got] == [t.token for t in want], (node, name)
                assert [t.score for t in got] == pytest.approx([t.score for t in want], rel=1e-5)


def test_a_cancelled_pass_stops_at_the_next_block(model: HookedTransformer) -> None:
    """The token is set while block 1 runs (as a server's event loop would, from another thread):
    the pass raises at block 2's entry and never reaches the last block."""
    engine = Engine(model)
    token = CancelToken()

    def cancel(x: torch.Tensor, hook: HookPoint) -> None:
        token.cancel("the client disconnected")

    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_pre"
    with (
        model.hooks(fwd=[("blocks.1.hook_resid_pre", cancel)]),
        counting(model, last) as reached,
        engine.cancellable(token),
        pytest.raises(Cancelled, match="the client disconnected"),
    ):
        engine.run([request(PROMPTS[0])])
    assert reached == []
    # Outside the block the engine runs as before; its hooks are gone.
    with counting(model, last) as reached:
        engine.run([request(PROMPTS[0])])
    assert reached == [1]


def test_a_cancelled_backward_stops_at_the_next_gradient(model: HookedTransformer) -> None:
    """Set once the forward is done, the token stops the backward at its first recorded
    gradient: the ranking after it never runs."""
    engine = Engine(model)
    token = CancelToken()

    def cancel(x: torch.Tensor, hook: HookPoint) -> None:
        token.cancel("stop")

    with (
        model.hooks(fwd=[("hook_logits", cancel)]),
        engine.cancellable(token),
        pytest.raises(Cancelled),
    ):
        engine.run([request(PROMPTS[0])])
    assert "backward" not in engine.last_timings and "forward" in engine.last_timings


def test_an_expired_deadline_stops_a_run_before_its_pass(model: HookedTransformer) -> None:
    engine = Engine(model)
    with (
        counting(model, "hook_embed") as forwards,
        engine.cancellable(CancelToken(timeout_s=0.0)),
        pytest.raises(DeadlineExceeded, match="deadline of 0 s"),
    ):
        engine.run([request(PROMPTS[0])])
    assert forwards == []


def test_a_cancelled_generation_stops_at_the_next_step(model: HookedTransformer) -> None:
    """Generation checks at every block of every step (with the key/value cache, each step runs
    one position): cancelled during step 3, it runs no step after it."""
    engine = Engine(model)
    token = CancelToken()
    steps: list[int] = []

    def count_and_cancel(x: torch.Tensor, hook: HookPoint) -> None:
        steps.append(1)
        if len(steps) == 3:
            token.cancel("stop")

    with (
        model.hooks(fwd=[("hook_logits", count_and_cancel)]),
        engine.cancellable(token),
        pytest.raises(Cancelled),
    ):
        generate(engine, PROMPTS[0], max_new_tokens=10)
    assert len(steps) == 3
    assert len(generate(engine, PROMPTS[0], max_new_tokens=10)) == 10  # not cancelled: all of it
