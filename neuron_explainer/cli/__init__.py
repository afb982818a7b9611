"""The `tdb` command line: one entry point with subcommands.

It sits above the library and the server: the subcommands wrap `neuron_explainer` (models,
datasets, training, explanations) and `activation_server` (`tdb serve`); neither imports this
package.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from activation_server.main import add_serve_args, serve
from neuron_explainer.cli import datasets, explanations, models, training
from neuron_explainer.datasets import DatasetError
from neuron_explainer.models import ModelNotFoundError, TokenizerError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tdb", description="Transformer debugger")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="start the activation server (the REST API and the UI)")
    add_serve_args(p)
    p.set_defaults(fn=serve)
    models.add_parser(sub)  # demo, top-tokens, generate, info, export-hf
    datasets.add_parser(sub)  # collate, export-tdb, merge-datasets, dataset-info
    training.add_parser(sub)  # train-sae
    explanations.add_parser(sub)  # explain, export-explanations
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (ModelNotFoundError, TokenizerError, DatasetError, ValueError) as e:
        print(f"tdb: error: {e}", file=sys.stderr)
        return 2
