"""The progress line of long jobs (collation, autoencoder training, explanation): tokens (or
nodes), their rate, ETA."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

# (tokens done, tokens in total, tokens/s since this run started), after every update.
ProgressCallback = Callable[[int, int, float], None]


@dataclass
class Progress:
    """A one-line report on stderr, `label: done/total tokens (x%) rate tok/s ETA ...`: rewritten
    in place on a terminal, a new line every `interval` seconds otherwise. `callback` (if any)
    gets every update, printed or not."""

    label: str
    total: int
    done: int
    enabled: bool = True
    interval: float = 10.0
    callback: ProgressCallback | None = None
    unit: str = "tokens"  # what is counted, and its rate's unit
    rate_unit: str = "tok/s"

    def __post_init__(self) -> None:
        self.start_done, self.start = self.done, time.monotonic()
        self.last_print = 0.0
        self.tty = sys.stderr.isatty()

    def update(
        self, done: int, note: str = "", force: bool = False, rate: float | None = None
    ) -> None:
        """`rate`: the rate to show when the caller knows it better (the sum of the rates of
        parallel workers, whose counts can go back when one restarts from its last commit);
        default: done since this report started, per second."""
        self.done = done
        now = time.monotonic()
        if rate is None:
            rate = (done - self.start_done) / max(now - self.start, 1e-9)
        if self.callback is not None:
            self.callback(done, self.total, rate)
        if not self.enabled or not (force or self.tty or now - self.last_print >= self.interval):
            return
        self.last_print = now
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        line = (
            f"{self.label}: {done:,}/{self.total:,} {self.unit} "
            f"({100 * done / max(self.total, 1):.1f}%) {rate:,.0f} {self.rate_unit} "
            f"ETA {duration(eta)}{note}"
        )
        print(
            ("\r" + line + "\033[K") if self.tty else line,
            end="" if self.tty else "\n",
            file=sys.stderr,
            flush=True,
        )

    def finish(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


def duration(seconds: float) -> str:
    """`4m05s`, `1h02m`, or `?` when not finite."""
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def at_most_every(seconds: float, report: ProgressCallback) -> ProgressCallback:
    """`report`, called at most once every `seconds` (always for the last update, done == total):
    for reports that cost something (a line on stdout, a message to another process)."""
    last = 0.0

    def throttled(done: int, total: int, rate: float) -> None:
        nonlocal last
        now = time.monotonic()
        if done < total and now - last < seconds:
            return
        last = now
        report(done, total, rate)

    return throttled
