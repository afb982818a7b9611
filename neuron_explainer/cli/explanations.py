"""`tdb explain`: explain and score the components of a store, writing the results into it.

tdb explain smollm2.sqlite                               # the no-LLM baseline, every component
tdb explain smollm2.sqlite --families mlp_neuron --layers 0-3 --limit 200
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def cmd_explain(args: argparse.Namespace) -> int:
    from neuron_explainer.datasets.collate import parse_layers
    from neuron_explainer.datasets.store import DatasetStore
    from neuron_explainer.explanations import (
        BASELINE_METHOD,
        BaselineExplainer,
        BaselineSimulator,
        explain_store,
    )

    if args.explainer != "baseline":
        raise ValueError(f"--explainer {args.explainer!r}: this build knows 'baseline' only")
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
    summary = explain_store(
        args.store,
        BaselineExplainer(),
        BaselineSimulator(),
        BASELINE_METHOD,
        families=families,
        layers=layers,
        limit=args.limit,
        chunk=args.chunk,
        progress=not args.quiet,
    )
    print(
        f"{args.store}: {summary.explained + summary.failed:,} components explained "
        f"({summary.failed:,} failed), {summary.skipped:,} already done, method "
        f"{BASELINE_METHOD.label()}, {summary.seconds:.1f}s",
        file=sys.stderr,
    )
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
        help="'baseline' (no LLM: token statistics, deterministic; the default)",
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
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(fn=cmd_explain)
