"""One model, one batch at a time: a queue in front of the engine.

Requests run on a single worker thread (so the event loop keeps answering `/health` and reads
while a long request computes). Debugger requests that are waiting together are merged into one
engine batch, kept apart by group ids so each gets exactly the result it would get alone; if a
merged batch fails (one request invalid, or the merged batch too large for memory), its requests
are rerun one by one so each gets its own result or error. Nothing is dropped or mixed.

Abandoned work is not done (docs/api.md, "Concurrency"). A request is abandoned when its client
disconnects or its deadline (`request_timeout_s` after it was queued) passes: a queued request is
dropped from the queue, and a running batch whose requests are all abandoned is stopped through the
engine's cancel token (models/cancellation.py) at its next check: the next block of a forward, the
next gradient of a backward, the next layer or chunk of ranking and token views, the next
generation step. The waiting caller gets `ClientGone` or `RequestTimedOut` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from neuron_explainer.activations import Engine, SubRequest, SubResult
from neuron_explainer.models.cancellation import Cancelled, CancelToken

log = logging.getLogger("activation_server")
T = TypeVar("T")
DEFAULT_REQUEST_TIMEOUT_S = 600.0


class RequestAbandoned(Exception):
    """The worker no longer waits for this request's result (its work is dropped or stopped)."""


class ClientGone(RequestAbandoned):
    """The request's client disconnected before its result was ready."""


class RequestTimedOut(RequestAbandoned):
    """The request ran past its deadline: `limit_s` after it was queued, of which it waited
    `waited_s` in the queue and ran `ran_s` (None: it never started)."""

    def __init__(self, limit_s: float, waited_s: float, ran_s: float | None) -> None:
        super().__init__(f"past its deadline of {limit_s:g} s")
        self.limit_s, self.waited_s, self.ran_s = limit_s, waited_s, ran_s


@dataclass(frozen=True)
class JobInfo:
    """What `/health` says of a request the worker holds."""

    endpoint: str = ""
    request_id: str = ""
    sub_requests: int = 1


@dataclass(frozen=True)
class JobStatus:
    info: JobInfo
    queued_at: float  # Unix time
    started_at: float | None  # Unix time; None while queued
    seconds_waiting: float  # in the queue
    seconds_running: float | None
    abandoned: bool  # its client went away or its deadline passed; it is being stopped


@dataclass
class _Job:
    future: asyncio.Future[Any]
    info: JobInfo
    deadline: float | None  # time.monotonic()
    # Either a debugger request (mergeable) or an arbitrary call on the model.
    sub_requests: list[SubRequest] | None = None
    call: Callable[[], Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    queued: float = field(default_factory=time.monotonic)
    queued_wall: float = field(default_factory=time.time)
    started: float | None = None
    abandoned: str | None = None  # why nobody waits for it any more

    def status(self, now: float) -> JobStatus:
        waited = (self.started if self.started is not None else now) - self.queued
        return JobStatus(
            info=self.info,
            queued_at=self.queued_wall,
            started_at=None if self.started is None else self.queued_wall + waited,
            seconds_waiting=waited,
            seconds_running=None if self.started is None else now - self.started,
            abandoned=self.abandoned is not None,
        )


class ModelWorker:
    """`request_timeout_s`: every request must be answered within this many seconds of being
    queued (None: no deadline)."""

    def __init__(
        self,
        engine: Engine,
        max_merged_rows: int = 16,
        request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> None:
        self.engine = engine
        self.max_merged_rows = max(1, max_merged_rows)
        self.request_timeout_s = request_timeout_s
        self._pending: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._token: CancelToken | None = None  # of the running batch
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._task: asyncio.Task[None] | None = None
        # Counters, for /health, tests and benchmarks.
        self.batches_run = 0  # engine passes completed
        self.requests_merged = 0
        self.requests_cancelled = 0  # abandoned by their clients (queued or running)
        self.requests_timed_out = 0  # past their deadline (queued or running)
        self.runs_stopped = 0  # model runs stopped early because nobody waited for them
        # Called with True when the model starts running requests and False when none is left:
        # the server pauses its background jobs meanwhile (jobs.py).
        self.on_busy: Callable[[bool], None] = lambda busy: None

    @property
    def queued(self) -> int:
        return len(self._pending)

    def status(self) -> tuple[list[JobStatus], list[JobStatus]]:
        """(the requests running now, those queued behind them in order)."""
        now = time.monotonic()
        return [j.status(now) for j in self._running], [j.status(now) for j in self._pending]

    def start(self) -> None:
        tok = self.engine.model.tokenizer
        if tok is not None:
            # Every token's display string, cached now: filled lazily during a large request, the
            # cache's entries would be long-lived objects scattered among its millions of
            # short-lived ones, and would keep their memory from being given back after it.
            tok.display_tokens(range(tok.vocab_size))
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._token is not None:
            self._token.cancel("the server is shutting down")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def run_tdb(
        self,
        sub_requests: list[SubRequest],
        info: JobInfo | None = None,
        client_gone: Awaitable[Any] | None = None,
    ) -> tuple[list[SubResult], dict[str, float]]:
        """A debugger request; may share an engine pass with other waiting requests. Raises
        `ClientGone` once `client_gone` completes first, `RequestTimedOut` past the deadline."""
        job = self._job(info or JobInfo(sub_requests=len(sub_requests)))
        job.sub_requests = sub_requests
        result: list[SubResult] = await self._submit(job, client_gone)
        return result, job.timings

    async def call(
        self,
        fn: Callable[[], T],
        info: JobInfo | None = None,
        client_gone: Awaitable[Any] | None = None,
    ) -> T:
        """Run `fn` alone on the model thread (generation, general queries, ...), under the
        engine's cancel token (`Engine.cancellable`)."""
        job = self._job(info or JobInfo())
        job.call = fn
        result: T = await self._submit(job, client_gone)
        return result

    def _job(self, info: JobInfo) -> _Job:
        timeout = self.request_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        return _Job(asyncio.get_running_loop().create_future(), info, deadline)

    async def _submit(self, job: _Job, client_gone: Awaitable[Any] | None) -> Any:
        self._pending.append(job)
        self._wakeup.set()
        gone = asyncio.ensure_future(client_gone) if client_gone is not None else None
        waiting: set[asyncio.Future[Any]] = {job.future} if gone is None else {job.future, gone}
        timeout = None if job.deadline is None else max(0.0, job.deadline - time.monotonic())
        try:
            done, _ = await asyncio.wait(
                waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:  # the handler itself was cancelled (shutdown)
            self._abandon(job, "the request was cancelled")
            raise
        finally:
            if gone is not None:
                gone.cancel()
        if job.future in done:
            return job.future.result()
        if gone is not None and gone in done:
            self.requests_cancelled += 1
            self._abandon(job, "the client disconnected")
            raise ClientGone("the client disconnected")
        self.requests_timed_out += 1
        self._abandon(job, "the request ran past its deadline")
        now = time.monotonic()
        waited = (job.started if job.started is not None else now) - job.queued
        assert self.request_timeout_s is not None
        raise RequestTimedOut(
            self.request_timeout_s, waited, None if job.started is None else now - job.started
        )

    def _abandon(self, job: _Job, reason: str) -> None:
        """Nobody waits for `job` any more: drop it from the queue, or stop the running batch
        once every request of it is abandoned."""
        job.abandoned = reason
        if not job.future.done():
            job.future.cancel()
        if job in self._pending:
            self._pending.remove(job)
            log.info(
                "%s %s dropped from the queue: %s", job.info.endpoint, job.info.request_id, reason
            )
        elif job in self._running and self._token and all(j.abandoned for j in self._running):
            # Stopped only when nobody waits: a merged batch runs on for its other requests.
            self._token.cancel(reason)
            log.info("%s %s stopping: %s", job.info.endpoint, job.info.request_id, reason)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self.on_busy(False)
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            self.on_busy(True)
            batch = [self._pending.popleft()]
            if batch[0].sub_requests is not None:
                rows = len(batch[0].sub_requests)
                while self._pending and self._pending[0].sub_requests is not None:
                    more = len(self._pending[0].sub_requests or ())
                    if rows + more > self.max_merged_rows:
                        break
                    batch.append(self._pending.popleft())
                    rows += more
            batch = [j for j in batch if not j.future.done() and j.abandoned is None]
            if not batch:
                continue
            token = CancelToken()
            now = time.monotonic()
            for job in batch:
                job.started = now
            self._running, self._token = batch, token
            try:
                outcomes = await loop.run_in_executor(self._executor, self._execute, batch, token)
            finally:
                self._running, self._token = [], None
            for job, (ok, value) in zip(batch, outcomes, strict=True):
                if job.future.done():
                    continue
                if ok:
                    job.future.set_result(value)
                else:
                    job.future.set_exception(value)
            # Not kept while waiting for the next request: results can be gigabytes.
            del batch, outcomes, job, value

    def _execute(self, batch: list[_Job], token: CancelToken) -> list[tuple[bool, Any]]:
        """Runs on the model thread. Returns (ok, result or exception) per job."""
        try:
            with self.engine.cancellable(token):
                return self._run(batch)
        except Cancelled as e:
            self.runs_stopped += 1
            log.info("stopped a run of %d request(s): %s", len(batch), e)
            return [(False, e) for _ in batch]
        finally:
            release_memory()  # what the pass used, back to the system (see release_memory)

    def _run(self, batch: list[_Job]) -> list[tuple[bool, Any]]:
        if len(batch) > 1:
            subs = [s for job in batch for s in job.sub_requests or ()]
            groups = [g for g, job in enumerate(batch) for _ in job.sub_requests or ()]
            try:
                results = self.engine.run(subs, groups=groups)
            except Cancelled:
                raise
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
        return [
            (False, Cancelled(job.abandoned)) if job.abandoned else self._run_one(job)
            for job in batch
        ]

    def _run_one(self, job: _Job) -> tuple[bool, Any]:
        try:
            if job.call is not None:
                return True, job.call()
            assert job.sub_requests is not None
            results = self.engine.run(job.sub_requests)
            job.timings = dict(self.engine.last_timings)
            self.batches_run += 1
            return True, results
        except Cancelled:
            raise
        except Exception as e:
            return False, e


class BoundWorker:
    """The worker as one HTTP request's handler uses it: its jobs carry the request's endpoint
    and id (for /health) and are abandoned when `client_gone()` completes (the client hung up)."""

    def __init__(
        self,
        worker: ModelWorker,
        endpoint: str,
        request_id: str,
        client_gone: Callable[[], Awaitable[Any]],
    ) -> None:
        self.worker = worker
        self.engine = worker.engine
        self._endpoint, self._request_id = endpoint, request_id
        self._client_gone = client_gone

    def _info(self, sub_requests: int) -> JobInfo:
        return JobInfo(self._endpoint, self._request_id, sub_requests)

    async def run_tdb(
        self, sub_requests: list[SubRequest]
    ) -> tuple[list[SubResult], dict[str, float]]:
        info = self._info(len(sub_requests))
        return await self.worker.run_tdb(sub_requests, info, self._client_gone())

    async def call(self, fn: Callable[[], T], sub_requests: int = 1) -> T:
        return await self.worker.call(fn, self._info(sub_requests), self._client_gone())


_LIBC: Any = None


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc's `malloc_trim(0)`; nothing elsewhere).

    A large request leaves the heap holding gigabytes of freed chunks between live ones, which
    glibc keeps for reuse: the process's RSS stays at its peak. Trimming returns the free pages;
    it takes well under a millisecond on a small heap (README "Performance" has the effect)."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
            if _LIBC and not hasattr(_LIBC, "malloc_trim"):
                _LIBC = False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
