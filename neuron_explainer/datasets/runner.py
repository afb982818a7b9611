"""Running the model for collation: the forward pass that hands each (family, layer)'s activations
to a callback as soon as its hooks fire and stops after the last hook needed, and the choice of
the intra-op thread count for the accumulator updates on a CPU (timed, see `UpdateThreads`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence

import torch

from neuron_explainer.datasets.accumulators import intra_op_threads
from neuron_explainer.datasets.families import ComponentFamily
from neuron_explainer.models.hooks import HookPoint
from neuron_explainer.models.transformer import HookedTransformer


class _StopForward(Exception):
    """Raised by the last hook needed, to skip the rest of the forward pass."""


class UpdateThreads:
    """Chooses, by timing, the torch intra-op thread count of the accumulator updates and commits
    on CPU: the configured count or 1.

    Updates and commits are hundreds of small, memory-bound ops per layer. On an idle CPU the
    configured threads are faster (an MLP layer's update on the 2-core machine: ~35 ms with 2
    threads, ~65 ms with 1); on a busy one (a server beside the collation, other jobs) every op
    waits at a barrier for a thread that is not scheduled (~1 s with 2 threads, ~0.1 s with 1).
    So each count is timed on whole batches, the faster one is used, and every `explore_every`-th
    batch tries the other again. The store does not depend on the choice: selection, sampling and
    rounding are exact whatever the threads, and the moments are always summed on one thread
    (see `LayerAccumulator.update`).
    """

    def __init__(self, configured: int, explore_every: int = 8) -> None:
        self.options = [configured, 1] if configured > 1 else [configured]
        self.explore_every = explore_every
        self.seconds: dict[int, float] = {}  # the last timed batch's update seconds, per count
        self.batches = 0
        self.current = configured

    def best(self) -> int:
        return min(self.seconds, key=self.seconds.__getitem__) if self.seconds else self.current

    def next_batch(self) -> int:
        untried = [n for n in self.options if n not in self.seconds]
        if self.batches == 0 or untried:
            choice = untried[0] if self.batches and untried else self.current
        elif len(self.options) > 1 and self.batches % self.explore_every == 0:
            choice = next(n for n in self.options if n != self.best())
        else:
            choice = self.best()
        self.current = choice
        self.batches += 1
        return choice

    def record(self, seconds: float) -> None:
        if self.batches == 1:
            return  # the first batch also allocates the state: not representative
        self.seconds[self.current] = seconds  # the latest: machine load changes quickly


class ActivationRunner:
    """Runs the model on a batch and calls `on_activations(family, layer, acts [b, C, P])` for
    each requested (family, layer) as soon as its hooks have fired; stops the forward after the
    last hook needed."""

    def __init__(self, model: HookedTransformer, targets: Sequence[tuple[ComponentFamily, int]]):
        self.model = model
        order = {name: i for i, name in enumerate(model.hook_names())}
        self.finishing: dict[str, list[tuple[ComponentFamily, int]]] = {}
        names: set[str] = set()
        for family, layer in targets:
            hooks = family.hook_names(layer)
            unknown = [h for h in hooks if h not in order]
            if unknown:
                raise ValueError(f"{family.name} needs hook points {unknown} this model lacks")
            names.update(hooks)
            self.finishing.setdefault(max(hooks, key=order.__getitem__), []).append((family, layer))
        self.names = sorted(names, key=order.__getitem__)
        self.last = self.names[-1] if self.names else None

    def run(
        self,
        tokens: torch.Tensor,
        on_activations: Callable[[ComponentFamily, int, torch.Tensor], None],
        threads: int | None = None,
    ) -> float:
        """Returns the seconds spent in `on_activations`, which runs with `threads` intra-op
        threads (None: as configured; the forward and the family functions always are)."""
        cache: dict[str, torch.Tensor] = {}
        spent = 0.0

        def hook(x: torch.Tensor, hp: HookPoint) -> None:
            nonlocal spent
            cache[hp.name] = x
            for family, layer in self.finishing.get(hp.name, []):
                acts = family.activations(
                    self.model, {h: cache[h] for h in family.hook_names(layer)}, layer
                )
                start = time.perf_counter()
                with intra_op_threads(threads):
                    on_activations(family, layer, acts)
                spent += time.perf_counter() - start
            if hp.name == self.last:
                raise _StopForward

        hooks = [(name, hook) for name in self.names]
        with torch.no_grad(), self.model.hooks(fwd=hooks), contextlib.suppress(_StopForward):
            self.model(tokens.to(self.model.device))
        return spent
