"""Background jobs: `tdb collate` or `tdb explain` in a child process, with its progress for a
server to show.

    job = CollationJob.for_default_store("smollm2-135m", n_tokens=65_536)
    await job.start()          # returns at once; job.status() says how far it got
    ...
    await job.stop()           # the child is terminated; rerunning resumes from its last commit

`CollationJob.for_baseline_explanations(store)` explains every component of a store with the no-LLM
baseline (`tdb explain STORE`): what `--auto-dataset` runs once the default store is complete, so a
new user's node table carries explanations with no set-up. Both commands resume where they stopped.

A child process, not a thread: collation hooks the model, and a second model in the same process
would share its hook points with the server's requests. The child runs at a lower priority
(`nice`), and the server pauses it while its model runs a request (`pause`/`resume`: SIGSTOP and
SIGCONT to the child's process group): a lower priority alone does not keep a request's speed,
since the request's torch threads wait for each other and one of them preempted by the child stalls
them all (bench/server.py --while-collating measures both). It prints progress as JSON lines
(`tdb collate --progress-json`); its stderr is kept as a short log tail for error messages.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import datetime
import json
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BUDGET_TOKENS = 65_536
PR_SET_PDEATHSIG = 1  # prctl option: the signal a child gets when its parent dies


def datasets_dir() -> Path:
    """Where stores built for the server live: $TDB_CACHE/datasets, else ~/.cache/tdb/datasets."""
    base = os.environ.get("TDB_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "tdb") / "datasets"


def default_store_path(model_name: str, n_tokens: int) -> Path:
    """The store `--auto-dataset` builds for a model: default corpus, `n_tokens` tokens."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)
    return datasets_dir() / f"{safe}.default.{n_tokens}.sqlite"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass
class JobStatus:
    """A job as the API reports it (API field names)."""

    id: str
    kind: str  # "collate" or "explain": the `tdb` command the child runs
    description: str
    status: str  # "queued", "running", "done", "failed" or "stopped"
    output: str
    unit: str = "tokens"  # what tokens/totalTokens/tokensPerSecond count: tokens or components
    tokens: int = 0
    totalTokens: int | None = None
    tokensPerSecond: float | None = None
    etaSeconds: float | None = None
    startedAt: str | None = None
    finishedAt: str | None = None
    message: str | None = None
    log: list[str] = field(default_factory=list)


class CollationJob:
    def __init__(
        self,
        job_id: str,
        args: list[str],
        output: Path,
        description: str,
        nice: int = 10,
        kind: str = "collate",
        unit: str = "tokens",
    ) -> None:
        self.args = args
        self.nice = nice
        self.state = JobStatus(job_id, kind, description, "queued", str(output), unit)
        self._log: collections.deque[str] = collections.deque(maxlen=40)
        # Started once this job is done (not when it failed or was stopped): the next job.
        self.then: Callable[[], Awaitable[None]] | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = 0.0
        self._paused = False

    @classmethod
    def for_default_store(
        cls,
        model: str,
        n_tokens: int = DEFAULT_BUDGET_TOKENS,
        out: Path | None = None,
        device: str | None = None,
        extra: list[str] | None = None,
    ) -> CollationJob:
        """Collate the default corpus for `model` (all layers, neurons and heads)."""
        out = out or default_store_path(model, n_tokens)
        args = ["--model", model, "--corpus", "default", "--out", str(out)]
        args += ["--tokens", str(n_tokens), "--commit-seconds", "20"]
        if device:
            args += ["--device", device]
        description = f"collate {n_tokens:,} tokens of the default corpus for {model}"
        return cls("collate-default", args + (extra or []), out, description)

    @classmethod
    def for_baseline_explanations(cls, store: Path) -> CollationJob:
        """Explain and score every component of `store` with the no-LLM baseline, into it."""
        description = f"explain every component of {store.name} with the no-LLM baseline"
        return cls(
            "explain-default", [str(store)], store, description, kind="explain", unit="components"
        )

    def status(self) -> JobStatus:
        state = self.state
        state.log = list(self._log)[-10:]
        return state

    async def start(self) -> None:
        """Start the child process and return; progress updates as it runs."""
        self.state.status = "running"
        self.state.startedAt = _now()
        self._started = time.monotonic()
        command = [sys.executable, "-m", "neuron_explainer.cli", self.state.kind, *self.args]
        command += ["--progress-json"]
        Path(self.state.output).parent.mkdir(parents=True, exist_ok=True)
        self._process = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=self._lower_priority,
        )
        self._task = asyncio.create_task(self._watch(self._process))

    def _lower_priority(self) -> None:
        """In the child before exec: its own process group (what `pause` stops, with any process
        it starts), lower priority, and die with the server (Linux; SIGKILL, which also ends a
        paused child, and the child's store is safe at any point: a rerun resumes it)."""
        os.setpgrp()
        with contextlib.suppress(OSError):
            os.nice(self.nice)
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(None, use_errno=True)
                libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None and process.stderr is not None

        async def progress(stream: asyncio.StreamReader) -> None:
            async for raw in stream:
                line = raw.decode("utf-8", "replace").strip()
                try:
                    update: dict[str, Any] = json.loads(line)
                except ValueError:
                    self._log.append(line)
                    continue
                self._update(update)

        async def log(stream: asyncio.StreamReader) -> None:
            async for raw in stream:
                for part in raw.decode("utf-8", "replace").split("\r"):
                    if part.strip():
                        self._log.append(part.rstrip())

        await asyncio.gather(progress(process.stdout), log(process.stderr))
        code = await process.wait()
        state = self.state
        state.finishedAt = _now()
        if state.status == "stopped":
            return
        if code == 0:
            if self.then is not None:  # registered before this one is done: no gap between
                try:
                    await self.then()
                except Exception as e:  # the next job could not start; this one still succeeded
                    self._log.append(f"the next job did not start: {e!r}")
            state.status = "done"
            state.etaSeconds = 0.0
            if state.totalTokens is not None:
                state.tokens = state.totalTokens
        else:
            state.status = "failed"
            last = self._log[-1] if self._log else ""
            state.message = f"tdb {state.kind} exited with status {code}: {last}".strip()

    def _update(self, update: dict[str, Any]) -> None:
        state = self.state
        state.tokens = int(update.get("tokens", state.tokens))
        state.totalTokens = int(update.get("totalTokens", state.totalTokens or 0))
        rate = float(update.get("tokensPerSecond", 0.0))
        state.tokensPerSecond = rate
        remaining = (state.totalTokens or 0) - state.tokens
        state.etaSeconds = remaining / rate if rate > 0 else None

    def pause(self) -> None:
        """Stop the child where it is (SIGSTOP to its process group) until `resume`: its work,
        its commits and its progress wait; nothing is lost."""
        self._signal(signal.SIGSTOP, paused=True)

    def resume(self) -> None:
        self._signal(signal.SIGCONT, paused=False)

    def _signal(self, sig: signal.Signals, paused: bool) -> None:
        process = self._process
        if process is None or process.returncode is not None or self._paused == paused:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
            self._paused = paused

    async def wait(self) -> JobStatus:
        if self._task is not None:
            await self._task
        return self.status()

    async def stop(self) -> None:
        """Terminate the child (a rerun resumes from its last commit)."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        self.state.status = "stopped"
        self.state.message = "stopped with the server; it resumes on the next start"
        process.terminate()
        self.resume()  # a stopped process takes its SIGTERM once it runs again
        try:
            await asyncio.wait_for(process.wait(), timeout=10)
        except TimeoutError:
            process.kill()
            await process.wait()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
