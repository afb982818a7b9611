"""Stopping a computation from another thread: a `CancelToken` the computation checks.

A server gives each request a token; when the client goes away or the request's deadline passes,
the token is set and the computation raises `Cancelled` (or `DeadlineExceeded`) at its next check
instead of running to the end. Checks are cooperative: `forward_hooks()` checks at the entry of
every block of any forward pass the model runs while they are attached (a full pass, or one
generation step with a key/value cache), so a stop costs at most one layer's compute; longer
loops outside the model (ranking, token views) call `check()` themselves.
"""

from __future__ import annotations

import time

import torch

from neuron_explainer.models.hooks import ForwardHookFn, HookPoint, NameFilter


class Cancelled(Exception):
    """The computation was stopped through its token; the message says why."""


class DeadlineExceeded(Cancelled):
    """The token's deadline passed. `limit_s`: the time the computation was given."""

    def __init__(self, limit_s: float) -> None:
        super().__init__(f"ran past its deadline of {limit_s:g} s")
        self.limit_s = limit_s


class CancelToken:
    """Set once, from any thread (`cancel`); checked by the computation (`check`).

    `timeout_s`: the computation must end within this many seconds of the token's creation
    (None: no deadline); past it, `check` raises `DeadlineExceeded`."""

    def __init__(self, timeout_s: float | None = None) -> None:
        self.created = time.monotonic()
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else self.created + timeout_s
        self._reason: str | None = None  # a plain attribute write: atomic under the GIL

    def cancel(self, reason: str = "cancelled") -> None:
        if self._reason is None:
            self._reason = reason

    @property
    def cancelled(self) -> bool:
        return self._reason is not None

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def remaining_s(self) -> float | None:
        """Seconds left before the deadline (never negative; None: no deadline)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def check(self) -> None:
        """Raise `Cancelled` once the token is set, `DeadlineExceeded` once its deadline passed."""
        if self._reason is not None:
            raise Cancelled(self._reason)
        if self.deadline is not None and time.monotonic() >= self.deadline:
            assert self.timeout_s is not None
            raise DeadlineExceeded(self.timeout_s)

    def forward_hooks(self) -> list[tuple[NameFilter, ForwardHookFn]]:
        """Hooks for `model.hooks(fwd=...)` that check the token as each block starts."""

        def check(x: torch.Tensor, hook: HookPoint) -> None:
            self.check()

        return [(lambda name: name.endswith("hook_resid_pre"), check)]
