"""Holding the model thread inside a pass, for tests of what the server does meanwhile: a forward
hook blocks the first time its hook point runs, until the test releases it. The request is then
known to be running, at a known place of its pass; what happens next is read from counters and from
which hook points ran, never from durations."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from neuron_explainer.models import HookedTransformer
from neuron_explainer.models.hooks import HookPoint


class Gate:
    """A forward hook that holds the model thread the first time its hook point runs, until the
    test releases it: the request is then known to be running, at a known place of its pass."""

    def __init__(self) -> None:
        self.reached, self.release = threading.Event(), threading.Event()
        self._used = False

    def __call__(self, x: torch.Tensor, hook: HookPoint) -> None:
        if not self._used:
            self._used = True
            self.reached.set()
            self.release.wait(300)


@contextmanager
def gated(model: HookedTransformer) -> Iterator[tuple[Gate, list[int]]]:
    """A gate at block 1's entry, and a count of the forwards that reach the last block."""
    gate, reached_last = Gate(), []

    def count(x: torch.Tensor, hook: HookPoint) -> None:
        reached_last.append(1)

    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_pre"
    with model.hooks(fwd=[("blocks.1.hook_resid_pre", gate), (last, count)]):
        try:
            yield gate, reached_last
        finally:
            gate.release.set()


async def until(condition: Callable[[], bool]) -> None:
    """Wait (on the event loop) until `condition()` holds: an event, not a duration."""
    for _ in range(30_000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")
