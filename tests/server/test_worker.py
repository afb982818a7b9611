"""The model worker (activation_server/worker.py) with a real engine on the default model.

Merging is observed deterministically: a call holds the worker's single model thread until the
test releases it, so every request submitted meanwhile is known to be waiting in the queue, and the
engine passes that follow are exactly those the worker chose, not the ones a race allowed. For
abandoned requests a forward hook holds the model thread inside a pass (a `Gate`), so a request is
known to be running when its client hangs up; what was dropped or stopped is read from the
worker's counters and from which hook points ran, never from durations."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest

from activation_server.worker import ClientGone, JobInfo, ModelWorker, RequestTimedOut
from neuron_explainer.activations import (
    Engine,
    NodeAblation,
    NodeIndex,
    NodeToTrace,
    NodeType,
    RequestError,
    SubRequest,
    SubResult,
)
from neuron_explainer.models import HookedTransformer
from tests.server.gates import Gate, gated, until

NAMES = ["Mary", "Anna", "Paul", "Lucy", "Tom", "Kate", "Jack", "Emma"]
PLACES = ["store", "park", "school", "beach", "train station"]


def ioi(i: int) -> SubRequest:
    """An indirect-object prompt, different for each i (names, place and length vary)."""
    a, b = NAMES[i % 8], NAMES[(i + 3) % 8]
    place = PLACES[i % len(PLACES)]
    prompt = f"When {a} and {b} went to the {place}, {b} gave a drink to"
    return SubRequest(prompt, [f" {a}"], [f" {b}"], top_and_bottom_k=5)


@pytest.fixture(scope="module")
def engine(default_model: HookedTransformer) -> Engine:
    return Engine(default_model)


@asynccontextmanager
async def model_thread_held(worker: ModelWorker) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Starts `worker` with a call holding its model thread, so that requests wait in its queue;
    yields `release` (lets the holding call end and awaits it). On exit the thread is released
    whatever happened (never left blocked when an assert failed) and the worker stopped."""
    started, release_event = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release_event.wait()

    worker.start()
    holding = asyncio.ensure_future(worker.call(hold))

    async def release() -> None:
        release_event.set()
        await holding

    try:
        assert await asyncio.to_thread(started.wait, 300), "the model thread never ran"
        yield release
    finally:
        release_event.set()
        await worker.stop()


def run_while_queued(
    worker: ModelWorker, requests: Sequence[list[SubRequest]]
) -> tuple[int, list[Any]]:
    """Submits `requests` while a call holds the model thread, then releases it. Returns how many
    jobs were waiting in the queue at release, and each request's results (or its exception)."""

    async def main() -> tuple[int, list[Any]]:
        async with model_thread_held(worker) as release:
            jobs = [asyncio.ensure_future(worker.run_tdb(r)) for r in requests]
            await asyncio.sleep(0)  # each job runs up to its wait in the queue
            queued = worker.queued
            await release()
            outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        return queued, [o if isinstance(o, BaseException) else o[0] for o in outcomes]

    return asyncio.run(main())


# How far a merged result may be from the solo one (docs/engine.md §10): float32 sums rounded in
# another order, relative to the largest |value| of the quantity in the result. The `probs` loss's
# gradient is a small difference of sums over the vocabulary, so its effects round 100x coarser.
TOLERANCE = 1e-5
PROBS_TOLERANCE = 1e-3


def assert_same(got: SubResult, alone: SubResult, tol: float = TOLERANCE) -> None:
    """A result from a merged batch equals the one from running the request alone, as
    docs/engine.md §10 states: the same tokens, node table and top logits; D within
    tol·max(|D|, 1); every value of a metric (node table and token sums) within tol times the
    largest |value| of that metric in the result; the logits within tol times the largest."""
    assert got.tokens == alone.tokens
    scale = max(abs(alone.direction_value), 1.0)
    assert abs(got.direction_value - alone.direction_value) <= tol * scale
    assert got.nodes == alone.nodes
    assert got.metrics.keys() == alone.metrics.keys()
    for metric, want in alone.metrics.items():
        pairs: list[tuple[float, float]] = []
        for g, w in zip(got.metrics[metric], want, strict=True):
            assert (g is None) == (w is None), metric
            if g is not None and w is not None:
                pairs.append((g, w))
        for node_type, sums in alone.token_sums.items():
            if metric in sums:
                pairs += zip(got.token_sums[node_type][metric], sums[metric], strict=True)
        largest = max(abs(w) for _, w in pairs)
        for g, w in pairs:
            assert abs(g - w) <= tol * largest, (metric, g, w, largest)
    assert [t.token for t in got.top_logits] == [t.token for t in alone.top_logits]
    largest = max(abs(t.score) for t in alone.top_logits)
    for g_logit, w_logit in zip(got.top_logits, alone.top_logits, strict=True):
        assert abs(g_logit.score - w_logit.score) <= tol * largest


def test_requests_waiting_together_share_engine_passes(engine: Engine) -> None:
    """Six debugger requests (7 sub-requests) wait while the model is busy; with at most 4 rows
    per pass they run in ceil(7 / 4) = 2 engine passes, each request getting exactly the results
    it gets alone, in its own order."""
    requests = [[ioi(i)] for i in range(5)] + [[ioi(5), ioi(6)]]
    rows = sum(len(r) for r in requests)
    worker = ModelWorker(engine, max_merged_rows=4)

    queued, outcomes = run_while_queued(worker, requests)

    assert queued == len(requests)
    assert worker.batches_run == math.ceil(rows / 4) == 2
    assert worker.requests_merged == len(requests)
    for request, results in zip(requests, outcomes, strict=True):
        assert not isinstance(results, BaseException), results
        alone = engine.run(request)
        assert len(results) == len(alone) == len(request)
        for got, want in zip(results, alone, strict=True):
            assert_same(got, want)


def test_a_merged_batch_with_an_invalid_request_runs_each_alone(engine: Engine) -> None:
    """An invalid request waiting with valid ones makes the merged pass fail: every request then
    runs alone, so the valid ones still get their results and the invalid one its own error
    (naming its own field, as if it had been sent alone)."""
    bad = SubRequest(ioi(1).prompt, [10**9], [" John"])  # a token id outside the vocabulary
    requests = [[ioi(0)], [bad], [ioi(2)]]
    with pytest.raises(RequestError) as alone_error:
        engine.run([bad])
    worker = ModelWorker(engine, max_merged_rows=16)

    queued, outcomes = run_while_queued(worker, requests)

    assert queued == len(requests)
    error = outcomes[1]
    # The same error as alone: it names sub-request 0, not its row 1 of the merged batch.
    assert type(error) is type(alone_error.value)
    assert str(error) == str(alone_error.value)
    assert error.path == alone_error.value.path == (0, "target_tokens", 0)
    for i in (0, 2):
        [got] = outcomes[i]
        [want] = engine.run(requests[i])
        assert_same(got, want)
    assert worker.batches_run == 2  # the two valid requests, each alone
    assert worker.requests_merged == 0


AUSTEN = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters."
)


def varied(i: int) -> SubRequest:
    """Request i of a spread of prompt lengths (14 to 84 tokens) and kinds: a plain one, one
    ablating a head, one with the `probs` loss, one tracing a neuron, in turn (no token views:
    they would add a third to the time, and are compared nowhere here)."""
    request = ioi(i)
    prompt = " ".join([*AUSTEN.split()[: (i * 37) % 70], str(request.prompt)])
    head = NodeIndex(NodeType.ATTENTION_HEAD, 20 + i % 9, 3, i % 9)
    neuron = NodeIndex(NodeType.MLP_NEURON, 20, 2, 100 + i)
    kinds: list[dict[str, Any]] = [
        {},
        {"node_ablations": [NodeAblation(head)]},
        {"loss_fn": "probs"},
        {"upstream_node_to_trace": NodeToTrace(neuron)},
    ]
    return replace(request, prompt=prompt, top_and_bottom_k=10, token_views=False, **kinds[i % 4])


def test_merged_results_equal_solo_ones_within_float32_rounding(engine: Engine) -> None:
    """Sixteen requests of 14 to 84 tokens, plain, ablating, tracing and with the `probs` loss,
    merged by the worker into two passes of 8: each gets the node table and top logits it gets
    alone, and numbers within the rounding docs/engine.md §10 states. Padding to the longest
    prompt and a larger batch change the order of float32 sums, so they are not bit-identical."""
    requests = [[varied(i)] for i in range(16)]
    worker = ModelWorker(engine, max_merged_rows=8)

    queued, outcomes = run_while_queued(worker, requests)

    assert queued == 16 and worker.batches_run == 2 and worker.requests_merged == 16
    lengths = [len(engine.prompt_tokens(r[0])) for r in requests]
    assert min(lengths) <= 16 and max(lengths) >= 80, lengths
    for request, results in zip(requests, outcomes, strict=True):
        assert not isinstance(results, BaseException), results
        [got], [alone] = results, engine.run(request)
        assert_same(got, alone, PROBS_TOLERANCE if request[0].loss_fn == "probs" else TOLERANCE)


# ---- abandoned requests: dropped from the queue, or stopped while they run ---------------------


def test_a_queued_request_whose_client_left_is_dropped(engine: Engine) -> None:
    """Two requests wait behind a busy model; the client of the first hangs up. It is answered
    ClientGone at once and taken out of the queue: the other runs alone, in the only pass."""
    worker = ModelWorker(engine, max_merged_rows=16)

    async def main() -> SubResult:
        async with model_thread_held(worker) as release:
            gone = asyncio.get_running_loop().create_future()
            left = asyncio.ensure_future(worker.run_tdb([ioi(0)], client_gone=gone))
            stays = asyncio.ensure_future(worker.run_tdb([ioi(1)]))
            await asyncio.sleep(0)
            assert worker.queued == 2
            gone.set_result(None)  # the client disconnects
            with pytest.raises(ClientGone):
                await left
            assert worker.queued == 1
            await release()
            [result], _ = await stays
        return result

    result = asyncio.run(main())
    assert worker.batches_run == 1 and worker.requests_merged == 0
    assert worker.requests_cancelled == 1 and worker.runs_stopped == 0
    assert_same(result, engine.run([ioi(1)])[0])


def test_a_running_request_whose_client_left_is_stopped(
    engine: Engine, default_model: HookedTransformer
) -> None:
    """The client hangs up while its pass runs (held at block 1): the pass stops at its next
    check, never reaching the last block, and the request queued behind it runs next."""
    worker = ModelWorker(engine)
    info = JobInfo("/batched_tdb", "abc123", 1)

    async def main(gate: Gate) -> SubResult:
        worker.start()
        try:
            gone = asyncio.get_running_loop().create_future()
            left = asyncio.ensure_future(worker.run_tdb([ioi(0)], info, client_gone=gone))
            assert await asyncio.to_thread(gate.reached.wait, 300), "the pass never started"
            nxt = asyncio.ensure_future(worker.run_tdb([ioi(1)]))
            await asyncio.sleep(0)
            [running], [queued] = worker.status()
            assert running.info == info and running.started_at is not None
            assert running.seconds_running is not None and not running.abandoned
            assert queued.started_at is None and queued.info.sub_requests == 1
            gone.set_result(None)
            with pytest.raises(ClientGone):
                await left
            assert worker.status()[0][0].abandoned  # being stopped
            gate.release.set()
            [result], _ = await nxt
        finally:
            await worker.stop()
        return result

    with gated(default_model) as (gate, reached_last):
        result = asyncio.run(main(gate))
    assert worker.runs_stopped == 1 and worker.requests_cancelled == 1
    assert worker.batches_run == 1  # the next request's pass only
    assert reached_last == [1]  # the stopped pass never got to the last block
    assert_same(result, engine.run([ioi(1)])[0])


def test_a_merged_pass_runs_on_for_the_requests_still_waiting(
    engine: Engine, default_model: HookedTransformer
) -> None:
    """Of two requests sharing a pass, one's client hangs up: the pass is not stopped, and the
    other gets the result it gets alone."""
    worker = ModelWorker(engine)

    async def main(gate: Gate) -> SubResult:
        async with model_thread_held(worker) as release:
            gone = asyncio.get_running_loop().create_future()
            left = asyncio.ensure_future(worker.run_tdb([ioi(2)], client_gone=gone))
            stays = asyncio.ensure_future(worker.run_tdb([ioi(3)]))
            await asyncio.sleep(0)
            await release()
            assert await asyncio.to_thread(gate.reached.wait, 300)
            assert len(worker.status()[0]) == 2  # merged
            gone.set_result(None)
            with pytest.raises(ClientGone):
                await left
            gate.release.set()
            [result], _ = await stays
        return result

    with gated(default_model) as (gate, reached_last):
        result = asyncio.run(main(gate))
    assert worker.runs_stopped == 0 and worker.batches_run == 1 and worker.requests_merged == 2
    assert reached_last == [1]
    assert_same(result, engine.run([ioi(3)])[0])


def test_requests_past_their_deadline_are_answered_and_their_work_stopped(
    engine: Engine, default_model: HookedTransformer
) -> None:
    """With a deadline of 0.5 s, a request held in its pass and one queued behind it are both
    answered RequestTimedOut (the pass is held until then, so this does not depend on how fast
    the machine is); the queued one never runs and the running one stops at its next check."""
    worker = ModelWorker(engine, request_timeout_s=0.5)

    async def main(gate: Gate) -> tuple[BaseException, BaseException]:
        worker.start()
        try:
            running = asyncio.ensure_future(worker.run_tdb([ioi(0)]))
            assert await asyncio.to_thread(gate.reached.wait, 300)
            queued = asyncio.ensure_future(worker.run_tdb([ioi(1)]))
            outcomes = await asyncio.gather(running, queued, return_exceptions=True)
            gate.release.set()
            await until(lambda: not worker.status()[0])
        finally:
            await worker.stop()
        return outcomes[0], outcomes[1]  # type: ignore[return-value]

    with gated(default_model) as (gate, reached_last):
        ran, waited = asyncio.run(main(gate))
    assert isinstance(ran, RequestTimedOut) and ran.limit_s == 0.5 and ran.ran_s is not None
    assert isinstance(waited, RequestTimedOut) and waited.ran_s is None
    assert worker.requests_timed_out == 2 and worker.runs_stopped == 1
    assert worker.batches_run == 0 and reached_last == []
