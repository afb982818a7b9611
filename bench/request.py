"""Cost of a full debugger request relative to a bare forward+backward, and its peak memory.

Time: for each prompt length, a request (one sub-request, top-k = 10, every metric for every node
type, token-space views) is divided by a bare forward+backward of the same model on the same prompt
(plain forward with the fused attention kernel, logits at the last token, backward of the logit
difference to the input embeddings), both measured in this run. Also prints where the request's
time goes, phase by phase.

Memory: each length runs in a fresh child process that loads the model, resets the kernel's peak-RSS
mark (/proc/self/clear_refs), runs one request and reports the peak resident memory above what the
loaded model alone used. Peak extra memory must grow like n·H·d + n²·H, never n²·H·d (docs/engine.md §3).

    python bench/request.py                      # both parts
    python bench/request.py --skip-memory --lengths 16 64
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from neuron_explainer.activations import Engine, SubRequest
from neuron_explainer.models import HookedTransformer, load_model

# Plain English prose written for this benchmark, repeated to reach the longer lengths.
TEXT = (
    "The harbour town woke slowly on winter mornings. Fishermen carried their nets down the stone "
    "steps while the baker opened his shutters and the smell of bread drifted across the square. "
    "Children ran to the school on the hill, and the old clock above the town hall struck eight, "
    "always a minute late. In the afternoon the wind turned, the boats came back one after another, "
    "and the gulls followed them into the harbour, crying over every basket of fish. By evening "
    "the lamps were lit along the quay, and the sailors told stories of storms they had seen and "
    "islands they had never found, while the innkeeper listened and poured another round. "
)


def prompt_tokens(model: HookedTransformer, n: int) -> list[int]:
    assert model.tokenizer is not None
    ids = model.tokenizer.encode(TEXT)
    return (ids * (n // len(ids) + 1))[:n]


def debugger_request(tokens: list[int], k: int = 10) -> SubRequest:
    return SubRequest(
        prompt=tokens, target_tokens=[" the"], distractor_tokens=[" a"], top_and_bottom_k=k
    )


def bare_forward_backward(
    model: HookedTransformer, tokens: list[int], target: int, distractor: int
) -> None:
    ids = torch.tensor([tokens], device=model.device)
    grads: list[torch.Tensor] = []
    with torch.enable_grad(), model.hooks(bwd=[("hook_embed", lambda g, h: grads.append(g))]):
        logits = model(ids, logits_positions=torch.tensor([len(tokens) - 1]))[0]
        (logits[target] - logits[distractor]).backward()
    assert grads


def median_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_part(model: HookedTransformer, lengths: list[int], repeats: int) -> None:
    assert model.tokenizer is not None
    engine = Engine(model)
    target, distractor = (
        model.tokenizer.single_token_id(" the"),
        model.tokenizer.single_token_id(" a"),
    )
    print(f"\n== request time / bare forward+backward ({repeats} repeats, medians) ==")
    print(f"{'tokens':>7} {'bare s':>8} {'request s':>10} {'ratio':>6}   phases of the request (s)")
    for n in lengths:
        tokens = prompt_tokens(model, n)
        bare = median_time(
            lambda t=tokens: bare_forward_backward(model, t, target, distractor), repeats
        )
        phases: list[dict[str, float]] = []

        def request(t: list[int] = tokens, out: list[dict[str, float]] = phases) -> None:
            engine.run([debugger_request(t)])
            out.append(dict(engine.last_timings))

        full = median_time(request, repeats)
        phase = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
        detail = "  ".join(f"{k} {v:.3f}" for k, v in phase.items())
        print(f"{n:>7} {bare:>8.3f} {full:>10.3f} {full / bare:>6.2f}   {detail}")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_child(model_name: str, n: int) -> None:
    model = load_model(model_name, device="cpu")
    engine = Engine(model)
    tokens = prompt_tokens(model, n)
    engine.run([debugger_request(prompt_tokens(model, 8))])  # allocate lazy state once
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM)
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    engine.run([debugger_request(tokens)])
    elapsed = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    print(json.dumps({"n": n, "extra_mib": (peak - base) / 1024, "seconds": elapsed}))


def memory_part(model_name: str, lengths: list[int], model: HookedTransformer) -> None:
    cfg = model.cfg
    print("\n== peak memory of one request above the loaded model (fresh process per length) ==")
    print(f"{'tokens':>7} {'extra MiB':>10} {'seconds':>8} {'n²·H·d tensor would be MiB':>28}")
    results = []
    for n in lengths:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(n), "--model", model_name],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        naive = n * n * cfg.n_heads * cfg.d_model * 4 / 2**20
        print(f"{n:>7} {r['extra_mib']:>10.0f} {r['seconds']:>8.2f} {naive:>28.0f}")
    for a, b in itertools.pairwise(results):
        growth = b["extra_mib"] / max(a["extra_mib"], 1e-9)
        ratio = b["n"] / a["n"]
        print(
            f"growth {a['n']}->{b['n']} tokens (x{ratio:.0f}): memory x{growth:.1f} "
            f"(linear x{ratio:.0f}, quadratic x{ratio**2:.0f}); one n²·H·d tensor per layer "
            f"alone would need {b['n'] ** 2 * cfg.n_heads * cfg.d_model * 4 / 2**30:.1f} GiB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        memory_child(args.model, args.memory_child)
        return
    model = load_model(args.model, device="cpu")
    print(
        f"model {model.cfg.name}: {model.cfg.n_layers} layers, d {model.cfg.d_model}, "
        f"{model.cfg.n_heads} heads; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs"
    )
    if not args.skip_time:
        time_part(model, args.lengths, args.repeats)
    if not args.skip_memory:
        memory_part(args.model, args.memory_lengths, model)


if __name__ == "__main__":
    main()
