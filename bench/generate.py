"""Generation with the key/value cache vs rerunning the whole prefix at every step, in the same run.

Greedy continuations of a short prompt on the default model, N new tokens each (the end-of-sequence
token does not stop them). The baseline is what `generate(..., use_cache=False)` does for each new
token: a forward of the prompt and everything generated so far. The cached path is what
`generate(...)` does: the prompt once, then one position per token. Both run side by side, one step
of each in turn (`next_token_logits`, the step both use), so that a change in the machine's load
hits both alike; each path's seconds are the sum of its steps. Prints seconds, tokens/s and their
ratio for each N, checks that both choose the same tokens, and times one whole cached `generate`
call as a check of the per-step sum.

    python bench/generate.py [--model smollm2-135m] [--lengths 256 512] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from neuron_explainer.models import HookedTransformer, KVCache, generate, load_model
from neuron_explainer.models.generation import next_token_logits

PROMPT = "Once upon a time, in a small village by the sea,"


@torch.no_grad()
def side_by_side(
    model: HookedTransformer, prompt: torch.Tensor, n: int
) -> tuple[float, float, bool]:
    """(seconds rerunning the prefix, seconds with the cache, same tokens) for n greedy tokens."""
    seq, cache = prompt, KVCache()
    rerun_s = cached_s = 0.0
    same = True
    for _ in range(n):
        start = time.perf_counter()
        rerun = next_token_logits(model, seq, None)
        middle = time.perf_counter()
        cached = next_token_logits(model, seq, cache)
        rerun_s, cached_s = rerun_s + middle - start, cached_s + time.perf_counter() - middle
        next_id = int(cached.argmax())
        same &= int(rerun.argmax()) == next_id
        seq = torch.cat([seq, seq.new_tensor([next_id])])
    return rerun_s, cached_s, same


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model, device=args.device)
    assert model.tokenizer is not None
    prompt = torch.tensor(model.tokenizer.encode(PROMPT), device=model.device)
    side_by_side(model, prompt, 4)  # warm-up
    print(
        f"model {model.cfg.name} on {model.device}; prompt {len(prompt)} tokens; greedy; "
        f"torch {torch.__version__}; {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )
    print(
        "\n| new tokens | rerun the prefix | cached | ratio | same tokens | one cached generate |"
    )
    print("|---|---|---|---|---|---|")
    for n in args.lengths:
        rerun_s, cached_s, same = side_by_side(model, prompt, n)
        start = time.perf_counter()
        generate(model, prompt, n, stop_at_eos=False)
        whole_s = time.perf_counter() - start
        print(
            f"| {n} | {rerun_s:.1f} s ({n / rerun_s:.2f} tok/s) | {cached_s:.1f} s "
            f"({n / cached_s:.1f} tok/s) | {rerun_s / cached_s:.1f}× | {'yes' if same else 'NO'} "
            f"| {whole_s:.1f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
