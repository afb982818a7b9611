"""One model, one batch at a time: a queue in front of the engine.

Requests run on a single worker thread (so the event loop keeps answering `/health` and reads
while a long request computes). Debugger requests that are waiting together are merged into one
engine batch, kept apart by group ids so each gets exactly the result it would get alone; if a
merged batch fails (one request invalid, or the merged batch too large for memory), its requests
are rerun one by one so each gets its own result or error. Nothing is dropped or mixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from neuron_explainer.activations import Engine, SubRequest, SubResult

log = logging.getLogger("activation_server")
T = TypeVar("T")


@dataclass
class _Job:
    future: asyncio.Future[Any]
    # Either a debugger request (mergeable) or an arbitrary call on the model.
    sub_requests: list[SubRequest] | None = None
    call: Callable[[], Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)


class ModelWorker:
    def __init__(self, engine: Engine, max_merged_rows: int = 16) -> None:
        self.engine = engine
        self.max_merged_rows = max(1, max_merged_rows)
        self._pending: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._task: asyncio.Task[None] | None = None
        self.batches_run = 0  # engine passes, for tests and the throughput benchmark
        self.requests_merged = 0

    @property
    def queued(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def run_tdb(
        self, sub_requests: list[SubRequest]
    ) -> tuple[list[SubResult], dict[str, float]]:
        """A debugger request; may share an engine pass with other waiting requests."""
        job = _Job(asyncio.get_running_loop().create_future(), sub_requests=sub_requests)
        result: list[SubResult] = await self._submit(job)
        return result, job.timings

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` alone on the model thread (generation, general queries, ...)."""
        return await self._submit(_Job(asyncio.get_running_loop().create_future(), call=fn))

    async def _submit(self, job: _Job) -> Any:
        self._pending.append(job)
        self._wakeup.set()
        return await job.future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = [self._pending.popleft()]
            if batch[0].sub_requests is not None:
                rows = len(batch[0].sub_requests)
                while self._pending and self._pending[0].sub_requests is not None:
                    more = len(self._pending[0].sub_requests or ())
                    if rows + more > self.max_merged_rows:
                        break
                    batch.append(self._pending.popleft())
                    rows += more
            batch = [j for j in batch if not j.future.done()]  # the client went away
            if not batch:
                continue
            outcomes = await loop.run_in_executor(self._executor, self._execute, batch)
            for job, (ok, value) in zip(batch, outcomes, strict=True):
                if job.future.done():
                    continue
                if ok:
                    job.future.set_result(value)
                else:
                    job.future.set_exception(value)

    def _execute(self, batch: list[_Job]) -> list[tuple[bool, Any]]:
        """Runs on the model thread. Returns (ok, result or exception) per job."""
        if len(batch) > 1:
            subs = [s for job in batch for s in job.sub_requests or ()]
            groups = [g for g, job in enumerate(batch) for _ in job.sub_requests or ()]
            try:
                results = self.engine.run(subs, groups=groups)
            except Exception as e:  # one bad request, or too big together: run each alone
                log.info(
                    "merged batch of %d requests failed (%s); running them alone", len(batch), e
                )
            else:
                self.batches_run += 1
                self.requests_merged += len(batch)
                out: list[tuple[bool, Any]] = []
                start = 0
                for job in batch:
                    n = len(job.sub_requests or ())
                    job.timings = dict(self.engine.last_timings)
                    out.append((True, results[start : start + n]))
                    start += n
                return out
        return [self._execute_one(job) for job in batch]

    def _execute_one(self, job: _Job) -> tuple[bool, Any]:
        try:
            if job.call is not None:
                return True, job.call()
            assert job.sub_requests is not None
            results = self.engine.run(job.sub_requests)
            job.timings = dict(self.engine.last_timings)
            self.batches_run += 1
            return True, results
        except Exception as e:
            return False, e
