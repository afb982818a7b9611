"""Forward-pass throughput of the hooked model vs Hugging Face `transformers`, and hook overhead.

All figures come from this run, on the same weights and the same token batch:
1. tokens/s of our forward vs `transformers` (the model exported with `export_hf` and loaded with
   AutoModelForCausalLM, or, for a GGUF family export does not write, such as Gemma 3,
   `transformers`' own loading of the same GGUF file; fp32, eval, no grad; both use PyTorch's
   fused attention);
2. the cost of hook points with nothing attached: the normal model vs the same model with every
   HookPoint call replaced by the identity at the class level (the hook points "compiled out");
3. the cost of a no-op function attached to every hook point vs none attached. Observing
   `hook_pattern` switches attention from the fused kernel to the explicit one, so this figure
   includes that switch.

    python bench/forward.py [--model smollm2-135m | gemma3-270m] [--batch 4] [--seq 128]
                            [--repeats 10] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from neuron_explainer.models import HookedTransformer, export_hf, load_model
from neuron_explainer.models.hooks import HookPoint

TEXT = (
    "It was a bright cold day in early spring, and the river ran high with melted snow. On the "
    "far bank the mill wheel turned slowly, and the miller's daughter counted sacks of flour by "
    "the door. Travellers crossing the bridge stopped to watch the water, talked about the price "
    "of grain and the weather in the hills, and went on toward the market before the bells rang. "
)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turn within each round (after a warm-up round), so
    a machine shared with other work slows all of them alike rather than whichever ran last."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def make_batch(model: HookedTransformer, batch: int, seq: int) -> torch.Tensor:
    assert model.tokenizer is not None
    ids = model.tokenizer.encode(TEXT)
    ids = (ids * (batch * seq // len(ids) + 2))[: batch * seq + batch]
    return torch.tensor([ids[i * seq + i : (i + 1) * seq + i] for i in range(batch)])


def reference_model(model: HookedTransformer) -> transformers.PreTrainedModel:
    """The same weights in `transformers`: its GGUF loading where export_hf does not cover the
    family, else our export of the model."""
    source = Path(model.cfg.extra.get("source", ""))
    if source.suffix == ".gguf" and model.cfg.architecture not in ("llama", "qwen2", "gpt2"):
        return transformers.AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        ).eval()
    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, folder)
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model, device="cpu")
    tokens = make_batch(model, args.batch, args.seq)
    n_tokens = tokens.numel()
    hf = reference_model(model)
    print(
        f"model {model.cfg.name}; batch {args.batch} x {args.seq} tokens; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs; medians of {args.repeats}"
    )

    with torch.no_grad():
        assert (model(tokens) - hf(input_ids=tokens).logits).abs().max() < 1e-3  # same model
        pair = interleaved_medians(
            {"ours": lambda: model(tokens), "theirs": lambda: hf(input_ids=tokens)}, args.repeats
        )
        ours, theirs = pair["ours"], pair["theirs"]

        original_call = HookPoint.__call__
        HookPoint.__call__ = lambda self, x: x  # type: ignore[method-assign, assignment]
        try:
            bypassed = median_seconds(lambda: model(tokens), args.repeats)
        finally:
            HookPoint.__call__ = original_call  # type: ignore[method-assign]
        with model.hooks(fwd=[(lambda name: True, lambda x, hook: None)]):
            attached = median_seconds(lambda: model(tokens), args.repeats)
    n_hooks = len(model.hook_names())

    rows = [
        ("transformers forward", theirs, "baseline"),
        ("our forward", ours, f"{theirs / ours:.2f}x transformers' tokens/s"),
        ("hook points compiled out", bypassed, "baseline for hook cost"),
        ("hook points, none attached", ours, f"overhead ratio {ours / bypassed:.3f}"),
        (
            f"no-op hook on all {n_hooks} points",
            attached,
            f"ratio {attached / ours:.3f} vs none attached",
        ),
    ]
    print(f"\n{'':38} {'seconds':>8} {'tokens/s':>9}")
    for name, seconds, note in rows:
        print(f"{name:38} {seconds:>8.3f} {n_tokens / seconds:>9.0f}   {note}")


if __name__ == "__main__":
    main()
