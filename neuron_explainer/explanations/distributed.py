"""Explanation across a Ray cluster (`tdb explain --ray`): the components still to do cut into parts
of `chunk`, one Ray task per part, every row written into the store by the driver alone.

    ray = connect(None, "tdb explain")
    explain_store_on_ray("/shared/store.sqlite", ExplainerSpec("baseline"), CPU_TASK)

A task opens the store read-only at its path (on a filesystem every node sees), builds the
explainer and simulator the spec names (`local`: the model loaded once per worker process, on the
GPU Ray assigned it when the cluster has GPUs), and returns its part's rows; it writes nothing.
The driver writes each part's rows in one transaction when its result arrives, so every
component gets one row per method, once: a task Ray retries after losing its worker still returns
its rows once, and the rows' key is (component, method). An interrupted run resumes like `tdb
explain`: rerun it, and the components with a row are skipped.

An endpoint (`url`) gets at most `concurrency` requests at once from the whole cluster: the bound is
split into m tasks of c requests each (`endpoint_tasks`, m * c <= concurrency), and the tasks run in
a Ray placement group of m one-CPU bundles, so Ray itself runs no more than m of them at once,
whatever the cluster's size. The baseline and local explainers need no bound: Ray runs as many of
their tasks at once as the cluster has CPUs (or GPUs) for.
"""

from __future__ import annotations

import contextlib
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from neuron_explainer.datasets.distributed import (
    ClusterError,
    TaskResources,
    cached_model,
    import_ray,
)
from neuron_explainer.datasets.store import DatasetStore
from neuron_explainer.explanations.batch import (
    BatchSummary,
    explain_one,
    node_progress,
    select_components,
)
from neuron_explainer.explanations.llm import (
    LLM_LIMITS,
    PROMPT_VERSION,
    AllAtOnceSimulator,
    LLMExplainer,
    LocalBackend,
    OpenAIBackend,
    llm_method,
)
from neuron_explainer.explanations.methods import (
    ALL_EXCERPTS,
    BASELINE_METHOD,
    BackendUnreachableError,
    BaselineExplainer,
    BaselineSimulator,
    ExcerptLimits,
    Explainer,
    Method,
    Simulator,
)
from neuron_explainer.explanations.store import ExplanationWriter, Node, StoredExplanation
from neuron_explainer.explanations.text_simulator import TextSimulator
from neuron_explainer.models.loading import model_name
from neuron_explainer.progress import ProgressCallback

# Requests at once from one task (its thread pool) when an endpoint's bound is split into tasks.
PER_TASK = 4
# How long the cluster may take to free the CPUs of an endpoint's tasks.
PLACEMENT_TIMEOUT_S = 300


def endpoint_tasks(concurrency: int, per_task: int = PER_TASK) -> tuple[int, int]:
    """(m, c): `concurrency` requests at once as m tasks at once of c requests each, the fewest
    tasks of at most `per_task`: 4 -> (1, 4); 6 -> (2, 3); 16 -> (4, 4); 13 -> (4, 3). m * c is
    at most `concurrency` (and at least 3/4 of it)."""
    if concurrency < 1:
        raise ValueError(f"--concurrency {concurrency}: at least 1")
    m = math.ceil(concurrency / per_task)
    return m, concurrency // m


@dataclass(frozen=True)
class ExplainerSpec:
    """The explainer and simulator each task builds (picklable, unlike a loaded model):
    'baseline'; 'local', the model `model` loaded in each worker; 'url', the OpenAI-compatible
    endpoint `url` serving `model`."""

    kind: Literal["baseline", "local", "url"]
    simulator: str = "baseline"  # the LLM kinds: 'all_at_once' or 'text'
    model: str = ""
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None
    url: str = ""
    api_key: str = ""
    cache_dir: str | None = None

    def method(self) -> Method:
        """The method the rows are stored under, known without loading a model."""
        if self.kind == "baseline":
            return BASELINE_METHOD
        name = model_name(self.model) if self.kind == "local" else self.model
        return Method("llm", self.simulator, name, PROMPT_VERSION)

    def build(self, concurrency: int) -> tuple[Explainer, Simulator, ExcerptLimits]:
        """In a task: the explainer, the simulator and the excerpts they read; an endpoint's
        backend sends at most `concurrency` requests at once."""
        if self.kind == "baseline":
            return BaselineExplainer(), BaselineSimulator(), ALL_EXCERPTS
        backend: LocalBackend | OpenAIBackend
        if self.kind == "local":
            if self.threads:
                import torch

                torch.set_num_threads(self.threads)
            backend = LocalBackend(cached_model(self.model, self.device, self.dtype))
        else:
            cache = Path(self.cache_dir) if self.cache_dir else None
            backend = OpenAIBackend(
                self.url,
                model=self.model,
                api_key=self.api_key,
                concurrency=concurrency,
                cache_dir=cache,
            )
        if llm_method(backend, self.simulator) != self.method():
            raise ClusterError(f"{self.model} loads as {backend.name} on this node")
        simulator: Simulator
        if self.simulator == "all_at_once":
            simulator = AllAtOnceSimulator(backend)
        else:
            simulator = TextSimulator(backend)
        return LLMExplainer(backend), simulator, LLM_LIMITS


def explain_part(
    path: str, nodes: list[Node], spec: ExplainerSpec, concurrency: int
) -> list[StoredExplanation]:
    """The Ray task: the rows of `nodes`, `concurrency` of them at once (threads)."""
    explainer, simulator, limits = spec.build(concurrency)
    method = spec.method()
    with DatasetStore(path) as store:

        def one(node: Node) -> StoredExplanation:
            return explain_one(store, node, explainer, simulator, method, limits)

        if concurrency == 1:
            return [one(node) for node in nodes]
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(one, nodes))


def explain_store_on_ray(
    path: str | Path,
    spec: ExplainerSpec,
    resources: TaskResources,
    families: list[str] | None = None,
    layers: list[int] | None = None,
    limit: int | None = None,
    chunk: int = 256,
    concurrency: int = 4,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
) -> BatchSummary:
    """`explain_store` with one Ray task per part of `chunk` components, on the cluster this
    process has joined (module doc). `concurrency`: an endpoint's bound, cluster-wide. Raises
    BackendUnreachableError as `explain_store` does (the parts written stay), ClusterError naming
    the parts that failed otherwise (the others are written: rerun for the rest)."""
    ray = import_ray("tdb explain")
    if chunk < 1:
        raise ValueError(f"--chunk {chunk}: at least 1")
    start = time.monotonic()
    path = Path(path).resolve()
    method = spec.method()
    with DatasetStore(path) as store:
        selected = select_components(store, families, layers, limit)
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(ExplanationWriter(path))
        method_id = writer.method_id(method)
        done = writer.done(method_id)
        todo = [n for n in selected if n not in done]
        parts = [todo[c : c + chunk] for c in range(0, len(todo), chunk)]
        options, per_task = resources.options(), 1
        if spec.kind == "url" and parts:
            m, per_task = endpoint_tasks(concurrency)
            group = _placement_group(ray, m, concurrency)
            stack.callback(ray.util.remove_placement_group, group)
            strategies = ray.util.scheduling_strategies
            in_group = strategies.PlacementGroupSchedulingStrategy(group)
            options |= {"num_cpus": 1, "scheduling_strategy": in_group}  # one bundle each
        task = ray.remote(explain_part).options(**options)
        bar = node_progress(len(selected), len(selected) - len(todo), progress, on_progress)
        pending = {task.remote(str(path), part, spec, per_task): i for i, part in enumerate(parts)}
        explained = failed = 0
        failures: dict[int, str] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=1.0)
            for ref in ready:
                part = pending.pop(ref)
                try:
                    rows: list[StoredExplanation] = ray.get(ref)
                except Exception as e:
                    cause = getattr(e, "cause", e)
                    if isinstance(cause, BackendUnreachableError):
                        for other in pending:
                            ray.cancel(other)
                        raise BackendUnreachableError(str(cause)) from None
                    failures[part] = f"{type(cause).__name__}: {cause}"
                    continue
                writer.write(method_id, rows)
                explained += sum(not r.failed for r in rows)
                failed += sum(r.failed for r in rows)
            note = f"; parts {len(parts) - len(pending)}/{len(parts)} done"
            if failures:
                note += f", {len(failures)} failed"
            bar.update(len(selected) - len(todo) + explained + failed, note, force=not pending)
        bar.finish()
    if failures:
        raise ClusterError(
            f"{len(failures)} of {len(parts)} parts failed (the other parts are written; rerun "
            "the same command for the rest):\n"
            + "\n".join(f"  part {p}: {why}" for p, why in sorted(failures.items()))
        )
    return BatchSummary(
        len(selected), len(selected) - len(todo), explained, failed, time.monotonic() - start
    )


def _placement_group(ray: Any, m: int, concurrency: int) -> Any:
    """A placement group of `m` one-CPU bundles, once the cluster has placed it."""
    group = ray.util.placement_group([{"CPU": 1}] * m)
    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        ray.util.remove_placement_group(group)
        raise ClusterError(
            f"--concurrency {concurrency} runs {m} tasks at once, and the Ray cluster did not "
            f"free {m} CPUs for them in {PLACEMENT_TIMEOUT_S} s (a lower --concurrency needs fewer)"
        )
    return group
