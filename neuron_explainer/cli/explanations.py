"""`tdb explain`: explain and score the components of a store, writing the results into it.

tdb explain smollm2.sqlite                               # the no-LLM baseline, every component
tdb explain smollm2.sqlite --families mlp_neuron --layers 0-3 --limit 200
tdb explain smollm2.sqlite --explainer local --limit 20  # the default model, in this process
tdb explain smollm2.sqlite --explainer http://127.0.0.1:8000/v1 --limit 20   # any OpenAI API
tdb export-explanations smollm2.sqlite explanations/     # TDB's <family>/<layer>/<index>.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from neuron_explainer.models.registry import DEFAULT_MODEL


def _cache_dir() -> Path:
    base = os.environ.get("TDB_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "tdb") / "llm-cache"


def cmd_explain(args: argparse.Namespace) -> int:
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
        AllAtOnceSimulator,
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
    explainer_name = args.explainer
    if explainer_name == "openai":
        explainer_name = os.environ.get("OPENAI_BASE_URL", "")
        if not explainer_name:
            raise ValueError("--explainer openai needs OPENAI_BASE_URL (or pass the URL itself)")
    workers = 1
    try:
        if explainer_name == "baseline":
            explainer: Any = BaselineExplainer()
            simulator: Any = BaselineSimulator()
            method, limits = BASELINE_METHOD, ALL_EXCERPTS
        elif explainer_name == "local":
            from neuron_explainer.cli.models import load_from_args

            backend: Any = LocalBackend(load_from_args(args))
            explainer, simulator = LLMExplainer(backend), AllAtOnceSimulator(backend)
            method, limits = llm_method(backend), LLM_LIMITS
        elif explainer_name.startswith(("http://", "https://")):
            backend = OpenAIBackend(
                explainer_name,
                model=args.llm_model or "",
                api_key=args.api_key or "",
                concurrency=args.concurrency,
                cache_dir=None if args.no_cache else _cache_dir(),
            )
            backend.check()
            explainer, simulator = LLMExplainer(backend), AllAtOnceSimulator(backend)
            method, limits, workers = llm_method(backend), LLM_LIMITS, args.concurrency
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
            progress=not args.quiet,
        )
    except BackendUnreachableError as e:
        print(f"tdb: error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.store}: {summary.explained + summary.failed:,} components explained "
        f"({summary.failed:,} failed), {summary.skipped:,} already done, method "
        f"{method.label()}, {summary.seconds:.1f}s",
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
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(fn=cmd_explain)

    p = subparsers.add_parser(
        "export-explanations",
        help="write a store's explanations in TDB's layout (<family>/<layer>/<index>.jsonl)",
    )
    p.add_argument("store")
    p.add_argument("out_dir")
    p.set_defaults(fn=cmd_export)
