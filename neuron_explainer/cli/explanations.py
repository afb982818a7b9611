"""`tdb explain`: explain and score the components of a store, writing the results into it.

tdb explain smollm2.sqlite                               # the no-LLM baseline, every component
tdb explain smollm2.sqlite --families mlp_neuron --layers 0-3 --limit 200
tdb explain smollm2.sqlite --explainer local --limit 20  # the default model, in this process
tdb explain smollm2.sqlite --explainer http://127.0.0.1:8000/v1 --limit 20   # any OpenAI API
tdb explain smollm2.sqlite --explainer local --simulator text --limit 5   # no log-probabilities
tdb explain /shared/smollm2.sqlite --explainer local --ray   # one task per 256 components
tdb judge smollm2.sqlite --judge local --limit 20       # delphi's detection and fuzzing
tdb export-explanations smollm2.sqlite explanations/     # TDB's <family>/<layer>/<index>.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_explainer.models.registry import DEFAULT_MODEL

if TYPE_CHECKING:  # imported lazily at run time (the CLI starts fast)
    from neuron_explainer.explanations.batch import BatchSummary


def _cache_dir() -> Path:
    base = os.environ.get("TDB_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "tdb") / "llm-cache"


def cmd_explain(args: argparse.Namespace) -> int:
    from neuron_explainer.cli.datasets import json_progress
    from neuron_explainer.datasets.collate import parse_layers
    from neuron_explainer.datasets.store import DatasetStore
    from neuron_explainer.explanations import (
        ALL_EXCERPTS,
        BASELINE_METHOD,
        BackendUnreachableError,
        BaselineExplainer,
        BaselineSimulator,
        explain_store,
    )
    from neuron_explainer.explanations.llm import (
        LLM_LIMITS,
        LLMExplainer,
        LocalBackend,
        OpenAIBackend,
        llm_method,
    )

    # Everything that can fail without the model or the endpoint fails first, writing nothing.
    with DatasetStore(args.store) as store:
        meta = store.metadata()
        families = [f.strip() for f in args.families.split(",")] if args.families else None
        for family in families or []:
            if family not in meta.families:
                raise ValueError(
                    f"--families: {args.store} has no {family!r} components (it holds "
                    f"{', '.join(meta.families)})"
                )
        layers = parse_layers(args.layers, meta.model["nLayers"]) if args.layers else None
    if args.simulator not in SIMULATORS:
        raise ValueError(f"--simulator {args.simulator!r}: one of {', '.join(SIMULATORS)}")
    if args.explainer == "baseline" and args.simulator not in ("auto", "baseline"):
        raise ValueError(
            f"--simulator {args.simulator} needs an LLM --explainer (local or a URL); the "
            "baseline explainer is scored by its own simulator"
        )
    explainer_name = args.explainer
    if explainer_name == "openai":
        explainer_name = os.environ.get("OPENAI_BASE_URL", "")
        if not explainer_name:
            raise ValueError("--explainer openai needs OPENAI_BASE_URL (or pass the URL itself)")
    if args.ray is not None:
        return _explain_on_ray(args, explainer_name, families, layers)
    workers = 1
    try:
        if explainer_name == "baseline":
            explainer: Any = BaselineExplainer()
            simulator: Any = BaselineSimulator()
            method, limits = BASELINE_METHOD, ALL_EXCERPTS
        elif explainer_name == "local":
            import torch

            from neuron_explainer.cli.models import load_from_args

            if args.threads:
                torch.set_num_threads(args.threads)

            backend: Any = LocalBackend(load_from_args(args))
            simulator, simulator_name = _llm_simulator(args.simulator, backend)
            explainer, method = LLMExplainer(backend), llm_method(backend, simulator_name)
            limits = LLM_LIMITS
        elif explainer_name.startswith(("http://", "https://")):
            backend = OpenAIBackend(
                explainer_name,
                model=args.llm_model or "",
                api_key=args.api_key or "",
                concurrency=args.concurrency,
                cache_dir=None if args.no_cache else _cache_dir(),
            )
            backend.check()
            simulator, simulator_name = _llm_simulator(args.simulator, backend)
            explainer, method = LLMExplainer(backend), llm_method(backend, simulator_name)
            limits = LLM_LIMITS
            workers = args.concurrency
        else:
            raise ValueError(
                f"--explainer {args.explainer!r}: 'baseline', 'local', 'openai' or an "
                "http(s) URL of an OpenAI-compatible API (ending in /v1)"
            )
        summary = explain_store(
            args.store,
            explainer,
            simulator,
            method,
            limits=limits,
            families=families,
            layers=layers,
            limit=args.limit,
            chunk=args.chunk,
            workers=workers,
            progress=not (args.quiet or args.progress_json),
            on_progress=json_progress() if args.progress_json else None,
        )
    except BackendUnreachableError as e:
        print(f"tdb: error: {e}", file=sys.stderr)
        return 2
    print_summary(args.store, summary, method.label())
    return 0


def _explain_on_ray(
    args: argparse.Namespace, explainer: str, families: list[str] | None, layers: list[int] | None
) -> int:
    """`tdb explain --ray`: one Ray task per part of --chunk components; the rows are written
    here (explanations/distributed.py)."""
    from neuron_explainer.cli.datasets import json_progress, shared_path
    from neuron_explainer.datasets.distributed import connect, task_resources
    from neuron_explainer.explanations import BackendUnreachableError
    from neuron_explainer.explanations.distributed import ExplainerSpec, explain_store_on_ray
    from neuron_explainer.explanations.llm import OpenAIBackend

    if explainer not in ("baseline", "local") and not explainer.startswith(("http://", "https://")):
        raise ValueError(
            f"--explainer {args.explainer!r}: 'baseline', 'local', 'openai' or an "
            "http(s) URL of an OpenAI-compatible API (ending in /v1)"
        )
    if explainer != "baseline" and args.simulator == "baseline":
        raise ValueError("--simulator baseline goes with --explainer baseline only")
    ray = connect(args.ray, "tdb explain")
    if explainer == "baseline":
        spec = ExplainerSpec("baseline")
        resources = task_resources(ray, "cpu", None)
    elif explainer == "local":
        resources = task_resources(ray, args.device, args.threads)
        # The local backend answers log-probabilities: `auto` is all at once.
        simulator = "all_at_once" if args.simulator == "auto" else args.simulator
        spec = ExplainerSpec(
            "local",
            simulator=simulator,
            model=shared_path(args.model),
            device=resources.device,
            dtype=args.dtype,
            threads=args.threads,
        )
    else:
        resources = task_resources(ray, "cpu", None)
        try:  # reached from here first: an endpoint that cannot be reached writes nothing
            probe = OpenAIBackend(
                explainer, model=args.llm_model or "", api_key=args.api_key or "", concurrency=1
            )
            probe.check()
            _, simulator = _llm_simulator(args.simulator, probe)
        except BackendUnreachableError as e:
            print(f"tdb: error: {e}", file=sys.stderr)
            return 2
        spec = ExplainerSpec(
            "url",
            simulator=simulator,
            model=probe.model,
            url=explainer,
            api_key=probe.api_key,
            cache_dir=None if args.no_cache else str(_cache_dir()),
        )
    try:
        summary = explain_store_on_ray(
            args.store,
            spec,
            resources,
            families=families,
            layers=layers,
            limit=args.limit,
            chunk=args.chunk,
            concurrency=args.concurrency,
            progress=not (args.quiet or args.progress_json),
            on_progress=json_progress() if args.progress_json else None,
        )
    except BackendUnreachableError as e:
        print(f"tdb: error: {e}", file=sys.stderr)
        return 2
    print_summary(args.store, summary, spec.method().label(), " on Ray")
    return 0


SIMULATORS = ("auto", "all_at_once", "text", "baseline")


def _llm_simulator(choice: str, backend: Any) -> tuple[Any, str]:
    """The simulator --simulator names for an LLM backend, and its name as the method records
    it; `auto`: all at once when the backend answers prompt log-probabilities, else the
    text-only one (said on stderr)."""
    from neuron_explainer.explanations.llm import AllAtOnceSimulator
    from neuron_explainer.explanations.text_simulator import TextSimulator, supports_logprobs

    if choice == "baseline":
        raise ValueError("--simulator baseline goes with --explainer baseline only")
    if choice == "auto":
        if supports_logprobs(backend):
            choice = "all_at_once"
        else:
            print(
                f"tdb: {backend.name} answers without prompt log-probabilities: simulating with "
                "the text-only simulator",
                file=sys.stderr,
            )
            choice = "text"
    if choice == "all_at_once":
        return AllAtOnceSimulator(backend), choice
    return TextSimulator(backend), choice


def cmd_judge(args: argparse.Namespace) -> int:
    from neuron_explainer.datasets.collate import parse_layers
    from neuron_explainer.datasets.store import DatasetStore
    from neuron_explainer.explanations import BackendUnreachableError
    from neuron_explainer.explanations.judge import Judge, judge_store
    from neuron_explainer.explanations.llm import LocalBackend, OpenAIBackend

    with DatasetStore(args.store) as store:
        meta = store.metadata()
        layers = parse_layers(args.layers, meta.model["nLayers"]) if args.layers else None
    families = [f.strip() for f in args.families.split(",")] if args.families else None
    explainers = [e.strip() for e in args.explainers.split(",")] if args.explainers else None
    if args.n < 1:
        raise ValueError(f"--n {args.n}: at least 1")
    name = args.judge
    if name == "openai":
        name = os.environ.get("OPENAI_BASE_URL", "")
        if not name:
            raise ValueError("--judge openai needs OPENAI_BASE_URL (or pass the URL itself)")
    try:
        backend: Any
        if name == "local":
            from neuron_explainer.cli.models import load_from_args

            backend = LocalBackend(load_from_args(args))
        elif name.startswith(("http://", "https://")):
            backend = OpenAIBackend(
                name,
                model=args.llm_model or "",
                api_key=args.api_key or "",
                cache_dir=None if args.no_cache else _cache_dir(),
            )
            backend.check()
        else:
            raise ValueError(
                f"--judge {args.judge!r}: 'local', 'openai' or an http(s) URL of an "
                "OpenAI-compatible API (ending in /v1)"
            )
        judge = Judge(backend, n=args.n, seed=args.seed)
        summary = judge_store(
            args.store,
            judge,
            families=families,
            layers=layers,
            limit=args.limit,
            explainers=explainers,
            progress=not args.quiet,
        )
    except BackendUnreachableError as e:
        print(f"tdb: error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.store}: {summary.scored + summary.failed:,} judge scores ({summary.failed:,} "
        f"failed), {summary.skipped:,} already done, judge {backend.name} "
        f"({judge.prompt_version})",
        file=sys.stderr,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from neuron_explainer.explanations.tdb_format import export_explanations

    n = export_explanations(args.store, args.out_dir)
    print(f"wrote {n:,} explanation files under {args.out_dir}", file=sys.stderr)
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "explain",
        help="explain and score the components of a collated store",
        description="Write an explanation of every component of a store (or of a sample) and "
        "score it on held-out excerpts; the results go into the store, one row per component "
        "and method. Rerun the same command to resume an interrupted run. See datasets.md.",
    )
    p.add_argument("store", help="a collated store (tdb collate)")
    p.add_argument(
        "--explainer",
        default="baseline",
        help="'baseline' (no LLM: token statistics, deterministic; the default), 'local' (the "
        "--model loaded here, greedy), an OpenAI-compatible base URL such as "
        "http://127.0.0.1:8000/v1 (tdb serve has one), or 'openai' for $OPENAI_BASE_URL",
    )
    p.add_argument(
        "--simulator",
        default="auto",
        help="how an LLM explanation is scored: 'all_at_once' (next-token log-probabilities at a "
        "placeholder per token), 'text' (the model writes each token's 0-10 activation; for "
        "endpoints without log-probabilities) or 'auto' (the default: all_at_once when the "
        "endpoint answers log-probabilities, else text). The baseline has its own.",
    )
    p.add_argument("--families", default=None, help="comma-separated (default: all in the store)")
    p.add_argument("--layers", default=None, help="e.g. 0,1,5-7 (default: all)")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="explain a random sample of N components (the same N on every run)",
    )
    p.add_argument("--chunk", type=int, default=256, help="components per commit (default 256)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="--explainer local: the model to load")
    p.add_argument("--device", default=None, help="--explainer local: cpu, cuda, ...")
    p.add_argument("--dtype", default=None, help="--explainer local: float32 (default), ...")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="--explainer local: torch CPU threads (1 is often faster on a busy machine)",
    )
    p.add_argument(
        "--llm-model", default=None, help="the endpoint's model (default: the first it lists)"
    )
    p.add_argument("--api-key", default=None, help="the endpoint's key (default $OPENAI_API_KEY)")
    p.add_argument(
        "--concurrency", type=int, default=4, help="requests at once to an endpoint (default 4)"
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="do not cache the endpoint's answers ($TDB_CACHE/llm-cache by default)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="explain on a Ray cluster, one task per --chunk components, the rows written here: "
        "the cluster at ADDRESS (HOST:PORT), or without one the cluster ray.init() finds or a new "
        "local one; --concurrency then bounds an endpoint's requests cluster-wide. Needs the ray "
        "extra and the store on a filesystem every node sees; see datasets.md",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument(
        "--progress-json",
        action="store_true",
        help="progress as JSON lines on stdout (components done; what a server's job reads)",
    )
    p.set_defaults(fn=cmd_explain)

    p = subparsers.add_parser(
        "judge",
        help="score a store's explanations with an LLM judge (detection and fuzzing)",
        description="Score every stored explanation with an LLM judge, as EleutherAI's delphi "
        "does: detection (which held-out excerpts does the explanation fit) and fuzzing (are "
        "the marked tokens those it describes); accuracy and balanced accuracy go into the "
        "store's explanation_judge_scores table. Rerun to resume. See datasets.md.",
    )
    p.add_argument("store", help="a store with explanations (tdb explain)")
    p.add_argument(
        "--judge",
        default="local",
        help="'local' (the --model loaded here, greedy; the default), an OpenAI-compatible base "
        "URL such as http://127.0.0.1:8000/v1, or 'openai' for $OPENAI_BASE_URL",
    )
    p.add_argument("--families", default=None, help="comma-separated (default: all per-token)")
    p.add_argument("--layers", default=None, help="e.g. 0,1,5-7 (default: all)")
    p.add_argument("--limit", type=int, default=None, help="a sample of N components")
    p.add_argument(
        "--explainers",
        default=None,
        help="judge the explanations of these explainers only, e.g. baseline,llm (default: all)",
    )
    p.add_argument("--n", type=int, default=5, help="excerpts of each label per scorer (5)")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="--judge local: the model to load")
    p.add_argument("--device", default=None, help="--judge local: cpu, cuda, ...")
    p.add_argument("--dtype", default=None, help="--judge local: float32 (default), ...")
    p.add_argument("--llm-model", default=None, help="the endpoint's model (default: its first)")
    p.add_argument("--api-key", default=None, help="the endpoint's key (default $OPENAI_API_KEY)")
    p.add_argument("--no-cache", action="store_true", help="do not cache the endpoint's answers")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(fn=cmd_judge)

    p = subparsers.add_parser(
        "export-explanations",
        help="write a store's explanations in TDB's layout (<family>/<layer>/<index>.jsonl)",
    )
    p.add_argument("store")
    p.add_argument("out_dir")
    p.set_defaults(fn=cmd_export)


def print_summary(store: str, summary: BatchSummary, method: str, where: str = "") -> None:
    """The line `tdb explain` ends with, on stderr."""
    print(
        f"{store}: {summary.explained + summary.failed:,} components explained "
        f"({summary.failed:,} failed), {summary.skipped:,} already done, method "
        f"{method}, {summary.seconds:.1f}s{where}",
        file=sys.stderr,
    )
