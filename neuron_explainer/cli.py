"""The `tdb` command line: one entry point with subcommands."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from neuron_explainer.models.registry import DEFAULT_MODEL

DEMO_PROMPTS = (
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "The opposite of hot is",
)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name, HF folder or .gguf file")
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)"
    )
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")


def load_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The model named by `--model`/`--device`/`--dtype`, saying on stderr what was loaded and
    how long it took (every command that loads a model does it this way)."""
    from neuron_explainer.models import load_model

    start = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    print(
        f"loaded {model.cfg.name} ({model.device}, {model.dtype}) in {time.perf_counter() - start:.1f}s",
        file=sys.stderr,
    )
    return model


def cmd_top_tokens(args: argparse.Namespace) -> int:
    import torch

    model = load_from_args(args)
    tok = model.tokenizer
    assert tok is not None
    for prompt in args.prompt or DEMO_PROMPTS:
        ids = torch.tensor(tok.encode(prompt), device=model.device)
        with torch.no_grad():
            probs = model(ids[None], logits_positions=torch.tensor([len(ids) - 1]))[0].softmax(-1)
        top = probs.topk(args.k)
        print(f"\n{prompt!r}")
        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            print(f"  {p:6.3f}  {tok.token_display(i)!r}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    model = load_from_args(args)
    assert model.tokenizer is not None
    new = model.generate(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    print(args.prompt + model.tokenizer.decode(new.tolist()))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    model = load_from_args(args)
    info = model.cfg.to_dict() | {"device": str(model.device), "dtype": str(model.dtype)}
    if args.hooks:
        info["hook_points"] = model.hook_names()
    print(json.dumps(info, indent=2))
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from neuron_explainer.models import export_hf

    model = load_from_args(args)
    out = export_hf(model, args.out_dir)
    print(f"wrote a Hugging Face folder to {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from activation_server.main import serve

    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tdb", description="Transformer debugger")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start the activation server (the REST API and the UI)")
    from activation_server.main import add_serve_args

    add_serve_args(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("demo", help="load the default model and show its top next tokens")
    _add_model_args(p)
    p.add_argument("--prompt", action="append", help="prompt (repeatable)")
    p.add_argument("-k", type=int, default=5)
    p.set_defaults(fn=cmd_top_tokens)

    p = sub.add_parser("top-tokens", help="top next tokens for prompts")
    _add_model_args(p)
    p.add_argument("prompt", nargs="+")
    p.add_argument("-k", type=int, default=10)
    p.set_defaults(fn=cmd_top_tokens)

    p = sub.add_parser("generate", help="greedy or sampled continuation of a prompt")
    _add_model_args(p)
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("info", help="print a model's config (and hook points with --hooks)")
    _add_model_args(p)
    p.add_argument("--hooks", action="store_true")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("export-hf", help="write a model as a Hugging Face folder")
    p.add_argument("model", help="registry name, HF folder or .gguf file")
    p.add_argument("out_dir")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.set_defaults(fn=cmd_export_hf)

    from neuron_explainer.datasets.cli import add_parser as add_dataset_commands

    add_dataset_commands(sub)  # collate, export-tdb, merge-datasets, dataset-info
    from neuron_explainer.models.sae_cli import add_parser as add_autoencoder_commands

    add_autoencoder_commands(sub)  # train-sae
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from neuron_explainer.datasets import DatasetError
    from neuron_explainer.models import ModelNotFoundError, TokenizerError

    try:
        return int(args.fn(args))
    except (ModelNotFoundError, TokenizerError, DatasetError, ValueError) as e:
        print(f"tdb: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
