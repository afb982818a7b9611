"""`tdb` commands about the model itself: demo, top-tokens, generate, info, export-hf."""

from __future__ import annotations

import argparse
import json
from typing import Any

from neuron_explainer.models import HookedTransformer, generate, load_model_reporting
from neuron_explainer.models.registry import DEFAULT_MODEL

DEMO_PROMPTS = (
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "The opposite of hot is",
)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name, HF folder or .gguf file")
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)"
    )
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")


def load_from_args(args: argparse.Namespace) -> HookedTransformer:
    """The model named by `--model`/`--device`/`--dtype` (every command that loads one)."""
    return load_model_reporting(args.model, device=args.device, dtype=args.dtype)


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
    new = generate(
        model,
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


def add_parser(sub: Any) -> None:
    """Register demo, top-tokens, generate, info and export-hf (each sets `fn`)."""
    p = sub.add_parser("demo", help="load the default model and show its top next tokens")
    add_model_args(p)
    p.add_argument("--prompt", action="append", help="prompt (repeatable)")
    p.add_argument("-k", type=int, default=5)
    p.set_defaults(fn=cmd_top_tokens)

    p = sub.add_parser("top-tokens", help="top next tokens for prompts")
    add_model_args(p)
    p.add_argument("prompt", nargs="+")
    p.add_argument("-k", type=int, default=10)
    p.set_defaults(fn=cmd_top_tokens)

    p = sub.add_parser("generate", help="greedy or sampled continuation of a prompt")
    add_model_args(p)
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("info", help="print a model's config (and hook points with --hooks)")
    add_model_args(p)
    p.add_argument("--hooks", action="store_true")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("export-hf", help="write a model as a Hugging Face folder")
    p.add_argument("model", help="registry name, HF folder or .gguf file")
    p.add_argument("out_dir")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.set_defaults(fn=cmd_export_hf)
