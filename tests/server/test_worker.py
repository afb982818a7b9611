"""The model worker (activation_server/worker.py) with a real engine on the default model.

Merging is observed deterministically: a call holds the worker's single model thread until the
test releases it, so every request submitted meanwhile is known to be waiting in the queue, and the
engine passes that follow are exactly those the worker chose, not the ones a race allowed."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from activation_server.worker import ModelWorker
from neuron_explainer.activations import Engine, RequestError, SubRequest, SubResult
from neuron_explainer.models import HookedTransformer

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


def run_while_queued(
    worker: ModelWorker, requests: Sequence[list[SubRequest]]
) -> tuple[int, list[Any]]:
    """Submits `requests` while a call holds the model thread, then releases it. Returns how many
    jobs were waiting in the queue at release, and each request's results (or its exception)."""

    async def main() -> tuple[int, list[Any]]:
        started, release = threading.Event(), threading.Event()

        def hold() -> None:
            started.set()
            release.wait()

        worker.start()
        try:
            holding = asyncio.ensure_future(worker.call(hold))
            assert await asyncio.to_thread(started.wait, 300), "the model thread never ran"
            jobs = [asyncio.ensure_future(worker.run_tdb(r)) for r in requests]
            await asyncio.sleep(0)  # each job runs up to its wait in the queue
            queued = worker.queued
            release.set()
            await holding
            outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            release.set()  # never leave the model thread blocked, even when an assert failed
            await worker.stop()
        return queued, [o if isinstance(o, BaseException) else o[0] for o in outcomes]

    return asyncio.run(main())


def assert_same(got: SubResult, alone: SubResult, tol: float = 1e-4) -> None:
    """A result from a merged batch equals the one from running the request alone."""
    assert got.tokens == alone.tokens
    assert math.isclose(got.direction_value, alone.direction_value, rel_tol=tol, abs_tol=1e-5)
    assert got.nodes == alone.nodes
    assert got.metrics.keys() == alone.metrics.keys()
    for metric, want in alone.metrics.items():
        for g, w in zip(got.metrics[metric], want, strict=True):
            assert (g is None) == (w is None), metric
            if g is not None and w is not None:
                assert math.isclose(g, w, rel_tol=tol, abs_tol=1e-5), (metric, g, w)


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
