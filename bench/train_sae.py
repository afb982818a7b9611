"""Autoencoder training throughput against the bare forward pass it rides on.

    python bench/train_sae.py --layers 0-29 --latents 4096 --k 32 --steps 6

Each step runs one batch of default-corpus windows through the model up to the last hooked layer
(the baseline: what `tdb train-sae` costs with no autoencoder), then one training step of every
layer's autoencoder on the captured activations. Both are timed in the same loop, so a busy machine
slows both alike. Prints tokens/s of each, their ratio, the autoencoder step per layer, and the
projected time of a training budget (--budget tokens).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from neuron_explainer.datasets.collate import parse_layers
from neuron_explainer.datasets.corpus import default_corpus, tokenize
from neuron_explainer.models import load_model
from neuron_explainer.training.autoencoders import LayerTrainer, TrainingConfig, capture


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hook", default="blocks.{L}.hook_mlp_out")
    p.add_argument("--layers", default="0-29")
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32, help="windows of 64 tokens per step")
    p.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--budget", type=int, default=500_000, help="tokens, for the projection")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model("smollm2-135m", device="cpu")
    assert model.tokenizer is not None
    windows = tokenize(default_corpus(), model.tokenizer, 64)
    layers = parse_layers(args.layers, model.cfg.n_layers)
    config = TrainingConfig(
        hook=args.hook, layers=tuple(layers), n_latents=args.latents, k=args.k, n_tokens=1
    )
    names = [config.hook_name(layer) for layer in layers]
    first = _per_token(capture(model, _batch(windows.tokens, 0, args.batch_size), names))
    trainers = {}
    for layer, name in zip(layers, names, strict=True):
        trainers[name] = LayerTrainer(config, layer, first[name].shape[-1], model.device)
        trainers[name].initialize(first[name])

    forward_s, train_s = [], []
    tokens = args.batch_size * 64
    for step in range(args.steps + 1):
        batch = _batch(windows.tokens, (step + 1) * args.batch_size, args.batch_size)
        start = time.perf_counter()
        values = _per_token(capture(model, batch, names))
        middle = time.perf_counter()
        for name, trainer in trainers.items():
            trainer.step(values[name])
        end = time.perf_counter()
        if step:  # the first step warms up allocators and caches
            forward_s.append(middle - start)
            train_s.append(end - middle)

    fwd, sae = statistics.median(forward_s), statistics.median(train_s)
    print(
        f"{model.cfg.name}, {args.hook} x {len(layers)} layers, {args.latents} latents, "
        f"k={args.k}, {tokens} tokens/step, {torch.get_num_threads()} threads"
    )
    print(f"forward to the last hooked layer : {tokens / fwd:8.0f} tok/s (baseline)")
    print(f"forward + autoencoder steps      : {tokens / (fwd + sae):8.0f} tok/s")
    print(f"ratio                            : {fwd / (fwd + sae):8.2f} of the bare forward")
    print(f"autoencoder step per layer       : {1e6 * sae / tokens / len(layers):8.1f} us/token")
    hours = args.budget * (fwd + sae) / tokens / 3600
    print(f"projected for {args.budget:,} tokens   : {60 * hours:8.1f} min (plus evaluation)")


def _batch(tokens: np.ndarray, start: int, size: int) -> torch.Tensor:
    return torch.from_numpy(tokens[start : start + size].astype(np.int64))


def _per_token(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """[b, n, ...] -> [b * (n - 1), features]: the attention sink left out, as in training."""
    return {name: v[:, 1:].reshape(-1, math.prod(v.shape[2:])) for name, v in values.items()}


if __name__ == "__main__":
    main()
