"""Check the CUDA paths against the CPU: forward logits and a full debugger request (ablation and
trace included) on random GPT-2 and Llama models, run on both devices. Prints the largest
differences and the time of each request; exits non-zero if they disagree. Needs a GPU.

    python bench/cuda_check.py
"""

from __future__ import annotations

import sys
import time

import torch

from neuron_explainer.activations import (
    AttentionTraceType,
    Engine,
    NodeAblation,
    NodeIndex,
    NodeToTrace,
    NodeType,
    SubRequest,
)
from neuron_explainer.models import HookedTransformer, ModelConfig

CONFIGS = {
    "gpt2": ModelConfig.gpt2(
        n_layers=4, d_model=128, n_heads=4, d_mlp=512, vocab_size=1000, n_ctx=256
    ),
    "llama-gqa": ModelConfig(
        n_layers=4, d_model=128, n_heads=8, n_kv_heads=2, d_mlp=384, vocab_size=1000, n_ctx=256
    ),
}


def build(cfg: ModelConfig) -> HookedTransformer:
    torch.manual_seed(0)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.requires_grad_(False).eval()


def requests() -> list[SubRequest]:
    gen = torch.Generator().manual_seed(1)
    long = torch.randint(0, 1000, (200,), generator=gen).tolist()
    short = torch.randint(0, 1000, (40,), generator=gen).tolist()
    head = NodeIndex(NodeType.ATTENTION_HEAD, layer=2, token=30, component=1, attended_token=5)
    return [
        SubRequest(long, target_tokens=[1], distractor_tokens=[2]),
        SubRequest(
            short,
            target_tokens=[1],
            distractor_tokens=[2],
            node_ablations=[NodeAblation(NodeIndex(NodeType.MLP_NEURON, 1, 10, 7))],
        ),
        SubRequest(
            short, upstream_node_to_trace=NodeToTrace(head, AttentionTraceType.QUERY_AND_KEY)
        ),
    ]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ok = True
    for name, cfg in CONFIGS.items():
        cpu = build(cfg)
        gpu = build(cfg).to("cuda")
        tokens = torch.randint(0, 1000, (3, 64), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            diff = (cpu(tokens) - gpu(tokens.cuda()).cpu()).abs().max().item()
        results = {}
        for device, model in (("cpu", cpu), ("cuda", gpu)):
            engine = Engine(model)
            engine.run(requests())  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[device] = engine.run(requests())
            if device == "cuda":
                torch.cuda.synchronize()
            print(
                f"  {name} {device}: request of 3 sub-requests in {time.perf_counter() - start:.3f}s"
            )
        worst_d = max(
            abs(a.direction_value - b.direction_value)
            for a, b in zip(results["cpu"], results["cuda"], strict=True)
        )
        worst_metric = 0.0
        for a, b in zip(results["cpu"], results["cuda"], strict=True):
            shared = set(a.nodes) & set(b.nodes)
            ia, ib = {n: j for j, n in enumerate(a.nodes)}, {n: j for j, n in enumerate(b.nodes)}
            for metric in a.metrics:
                scale = max(abs(v) for v in a.metrics[metric] if v is not None) or 1.0
                for n in shared:
                    va, vb = a.metrics[metric][ia[n]], b.metrics[metric][ib[n]]
                    if va is not None and vb is not None:
                        worst_metric = max(worst_metric, abs(va - vb) / scale)
        overlap = min(
            len(set(a.nodes) & set(b.nodes)) / max(len(a.nodes), 1)
            for a, b in zip(results["cpu"], results["cuda"], strict=True)
        )
        print(
            f"{name}: logits max diff {diff:.2e}; D max diff {worst_d:.2e}; metrics max rel diff "
            f"{worst_metric:.2e}; node-table overlap {overlap:.0%}"
        )
        ok &= diff < 1e-4 and worst_d < 1e-4 and worst_metric < 1e-4 and overlap > 0.9
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
