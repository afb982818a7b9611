"""`tdb train-sae`: TopK sparse autoencoders trained on a model's activations
(`neuron_explainer.training.autoencoders`).

    tdb train-sae --hook 'blocks.{L}.hook_mlp_out' --layers 0-29 --latents 2048 --k 32 \\
        --tokens 400000 --out autoencoders/smollm2-mlp

Registered on the `tdb` command by `add_parser(subparsers)`; rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from neuron_explainer.cli.models import load_from_args
from neuron_explainer.models.registry import DEFAULT_MODEL


def cmd_train_sae(args: argparse.Namespace) -> int:
    import torch

    from neuron_explainer.datasets.collate import parse_layers
    from neuron_explainer.datasets.corpus import load_corpus
    from neuron_explainer.training.autoencoders import TrainingConfig, train_autoencoders

    corpus = load_corpus(args.corpus, text_field=args.text_field)  # fail fast, before the model
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_from_args(args)
    config = TrainingConfig(
        hook=args.hook,
        layers=tuple(parse_layers(args.layers, model.cfg.n_layers)),
        n_latents=args.latents,
        k=args.k,
        n_tokens=args.tokens,
        batch_size=args.batch_size,
        lr=args.lr,
        window_length=args.window_length,
        skip_positions=args.skip_positions,
        eval_windows=args.eval_windows,
        auxk_coef=args.auxk_coef,
        dead_after_tokens=args.dead_after_tokens,
        seed=args.seed,
    )
    summary = train_autoencoders(
        model,
        corpus,
        config,
        args.out,
        checkpoint_seconds=args.checkpoint_seconds,
        progress=not args.quiet,
    )
    print(
        f"{args.out}: {summary['tokens_trained']:,} tokens in {summary['train_seconds']:.0f}s "
        f"({summary['tokens_per_second']:.0f} tok/s); held-out next-token loss "
        f"{summary['eval']['loss_clean']:.4f} without autoencoders",
        file=sys.stderr,
    )
    print(f"{'hook point':<28} {'FVE':>7} {'L0':>6} {'dead':>6} {'loss +':>8}", file=sys.stderr)
    for name, m in summary["autoencoders"].items():
        print(
            f"{name:<28} {m['fraction_variance_explained']:7.3f} {m['l0']:6.1f} "
            f"{m['dead_fraction']:6.3f} {m['loss_increase']:8.4f}",
            file=sys.stderr,
        )
    return 0


def add_parser(subparsers: Any) -> None:
    """Register `train-sae` on an argparse subparsers object (sets `fn`)."""
    p = subparsers.add_parser(
        "train-sae",
        help="train TopK sparse autoencoders on a model's activations",
        description="Stream a corpus through a model once and train one TopK sparse autoencoder "
        "per layer at a hook point; writes each in the native format (<out>/<hook name>/) and "
        "<out>/metrics.json (normalized MSE, variance explained, L0, dead latents, next-token "
        "loss with each autoencoder spliced in). Rerun the same command to resume.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name, HF folder or .gguf file")
    p.add_argument(
        "--hook",
        default="blocks.{L}.hook_mlp_out",
        help="hook name with {L} for the layer, e.g. blocks.{L}.hook_mlp_out, "
        "blocks.{L}.hook_attn_out, blocks.{L}.mlp.hook_post",
    )
    p.add_argument("--layers", default="all", help="e.g. 0,5 or 0-29 (default: all)")
    p.add_argument("--latents", type=int, default=4096, help="latents per autoencoder")
    p.add_argument("--k", type=int, default=32, help="active latents per token (TopK)")
    p.add_argument("--tokens", type=int, required=True, help="corpus tokens to train on")
    p.add_argument("--out", required=True, help="output folder (rerun to resume)")
    p.add_argument(
        "--corpus",
        default="default",
        help="'default' (Jane Austen, from Debian), a .txt file, a folder of .txt, or .jsonl",
    )
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--batch-size", type=int, default=32, help="windows per training step")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--window-length", type=int, default=64, help="tokens per window")
    p.add_argument(
        "--skip-positions",
        type=int,
        default=1,
        help="leading positions of each window left out (the attention sink; default 1)",
    )
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows for metrics")
    p.add_argument("--auxk-coef", type=float, default=1 / 32, help="AuxK loss weight (0: off)")
    p.add_argument(
        "--dead-after-tokens",
        type=int,
        default=50_000,
        help="a latent with no activation in this many training tokens is dead",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-seconds", type=float, default=300.0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument("--dtype", default=None, help="model dtype: float32 (default), bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(fn=cmd_train_sae)
