"""Our debugger request side by side with what peers need to capture act×grad, same weights, one run.

The default model is exported once with `tdb export-hf` (a Hugging Face folder), and every method
loads that folder. The prompt is an indirect-object sentence ("When Mary and John went to the
store, John gave a drink to") after plain prose, T tokens in all; D = logit(" Mary") −
logit(" John") at the last token, read and differentiated by every method:

1. floor: bare `transformers` forward+backward (fused SDPA attention, logits at the last token
   only, parameters frozen, D back to the input embeddings);
2. `transformers` + hooks: PyTorch hooks on each block's down projection (its input is the MLP
   neuron activation) and attention module (eager attention returns the probabilities), a
   tensor hook for each gradient; act×grad for every MLP neuron and every head's (q, k) entry;
3. TransformerLens (`TransformerBridge.boot_transformers`): forward hooks and backward hooks on
   `mlp.hook_post` and `attn.hook_pattern`, the same act×grad;
4. nnsight (`TransformersModel.trace`): the down projection's input and the attention weights,
   their `.grad` inside `with d.backward():`, the same act×grad;
5. ours: a full debugger request (all four metrics for every node type, top-k 10 over 20.7 M nodes
   at T = 256, token-space views);
6. ours with token views off (`SubRequest(token_views=False)`).

Every peer runs as its users would: parameters' requires_grad off (no weight gradients), gradients
enabled only around the pass, the input embeddings the one leaf that requires grad, eager
attention only where the pattern must be captured, logits at the last position only
(`logits_to_keep=1`), the same torch threads. Our D is differentiated with the final norm's scale
held fixed (docs/engine.md), so the capturing peers hold it fixed too (TransformerLens through
`ln_final.hook_scale`, the others by replacing the final RMSNorm's output with the same values whose
scale is detached). Before timing, each peer's act×grad for every MLP neuron and head pair is
checked against our engine's estimated_total_effect (act×grad), and D against ours, so that all do
the same work.

Time: medians of `--repeats` calls after a warm-up, in `--rounds` rounds whose method order
alternates (forward, reversed, ...) so that a change in the machine's load hits all alike; the
table gives the range of the rounds' medians and of their ratio to the same round's floor.
Memory: per method and length, a fresh process loads that method, runs it once on a short prompt,
resets the peak-RSS mark (/proc/self/clear_refs) and reports the peak resident memory of one call
above what it held before.

    make bench-peers                          # builds .venv-peers, then runs this
    .venv-peers/bin/python bench/peers.py [--lengths 64 256] [--repeats 5] [--rounds 3]
                                          [--threads N] [--skip-memory] [--folder DIR]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from request import TEXT  # bench/request.py, beside this script

# Every method loads a local folder; nothing may be fetched from a hub (read when the peers'
# packages are imported, inside the functions below).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODEL = "smollm2-135m"
IOI = "When Mary and John went to the store, John gave a drink to"
TARGET, DISTRACTOR = " Mary", " John"
# The same prose as bench/request.py (imported from it: this script runs from bench/), before
# the sentence, to reach T tokens.
FILLER = TEXT
METHODS = ["floor", "hooks", "transformer_lens", "nnsight", "ours", "ours_no_views"]
PEERS = ["hooks", "transformer_lens", "nnsight"]
LABELS = {
    "floor": "bare `transformers` fwd+bwd (the floor)",
    "hooks": "`transformers` + hooks: capture act×grad",
    "transformer_lens": "TransformerLens: capture act×grad",
    "nnsight": "nnsight: capture act×grad",
    "ours": "ours: full debugger request (all metrics, top-k, token views)",
    "ours_no_views": "ours, token views off",
}
# Largest |peer − ours| allowed, relative to the largest |ours|, for act×grad and for D.
TOLERANCE = 1e-4


@dataclass
class Capture:
    """What one call leaves: D, and act×grad per layer ([T, d_mlp] neurons, [H, T, T] heads)."""

    d: float
    neurons: dict[int, torch.Tensor] = field(default_factory=dict)
    heads: dict[int, torch.Tensor] = field(default_factory=dict)


Run = Callable[[list[int]], Capture]


@dataclass
class Ids:
    mary: int
    john: int


# ---- the weights and the prompt --------------------------------------------------------------------


def export_folder(folder: Path | None) -> Path:
    """The default model as a Hugging Face folder, exported once by `tdb export-hf` (cached)."""
    if folder is None:
        cache = Path(os.environ.get("TDB_CACHE") or Path.home() / ".cache" / "tdb")
        folder = cache / "peers" / f"{MODEL}-hf"
    if not (folder / "config.json").exists():
        tmp = folder.with_name(folder.name + ".partial")
        tdb = Path(sys.executable).with_name("tdb")
        subprocess.run([str(tdb), "export-hf", MODEL, str(tmp)], check=True)
        tmp.rename(folder)
    return folder


def tokenizer_ids(folder: Path) -> tuple[Any, Ids]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    mary, john = (tok.encode(t, add_special_tokens=False) for t in (TARGET, DISTRACTOR))
    assert len(mary) == len(john) == 1, (mary, john)
    return tok, Ids(mary[0], john[0])


def prompt(tok: Any, n: int) -> list[int]:
    """n token ids: prose, then the sentence whose next token is " Mary" (no BOS: SmolLM2 adds
    none to text)."""
    ioi = tok.encode(IOI, add_special_tokens=False)
    filler = tok.encode(FILLER, add_special_tokens=False)
    filler = filler * (n // len(filler) + 1)
    return filler[: max(n - len(ioi), 0)] + ioi


# ---- the methods -----------------------------------------------------------------------------------


def _hf_model(folder: Path, attention: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attention
    )
    return model.eval().requires_grad_(False)


def rms_norm_scale_fixed(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm of x with its scale 1/rms(x) held fixed in the backward: how our D is
    differentiated (the final norm's scale is cut), so every method computes the same act×grad."""
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x * scale.detach())


def _frozen(module: torch.nn.Module) -> None:
    assert not any(p.requires_grad for p in module.parameters()), "weights would get gradients"


def load_floor(folder: Path, ids: Ids) -> Run:
    model = _hf_model(folder, "sdpa")

    def run(tokens: list[int]) -> Capture:
        with torch.enable_grad():
            emb = model.get_input_embeddings()(torch.tensor([tokens])).requires_grad_(True)
            logits = model(inputs_embeds=emb, logits_to_keep=1).logits[0, -1]
            d = logits[ids.mary] - logits[ids.john]
            d.backward()
        return Capture(d.item())

    _frozen(model)
    return run


def load_hooks(folder: Path, ids: Ids) -> Run:
    model = _hf_model(folder, "eager")  # SDPA returns no attention probabilities

    def run(tokens: list[int]) -> Capture:
        acts: dict[tuple[str, int], torch.Tensor] = {}
        grads: dict[tuple[str, int], torch.Tensor] = {}

        def keep(key: tuple[str, int], x: torch.Tensor) -> None:
            acts[key] = x.detach()
            x.register_hook(lambda g: grads.__setitem__(key, g))

        norm = model.model.norm
        handles = [
            norm.register_forward_hook(
                lambda _m, args, _out: rms_norm_scale_fixed(
                    args[0], norm.weight, norm.variance_epsilon
                )
            )
        ]
        for L, layer in enumerate(model.model.layers):
            handles.append(  # the down projection's input: SiLU(gate)·up, one entry per neuron
                layer.mlp.down_proj.register_forward_pre_hook(
                    lambda _m, args, L=L: keep(("mlp", L), args[0])
                )
            )
            handles.append(  # (attn_output, attn_weights [b, H, q, k])
                layer.self_attn.register_forward_hook(
                    lambda _m, _args, out, L=L: keep(("attn", L), out[1])
                )
            )
        try:
            with torch.enable_grad():
                emb = model.get_input_embeddings()(torch.tensor([tokens])).requires_grad_(True)
                logits = model(inputs_embeds=emb, logits_to_keep=1).logits[0, -1]
                d = logits[ids.mary] - logits[ids.john]
                d.backward()
        finally:
            for h in handles:
                h.remove()
        n_layers = len(model.model.layers)
        return Capture(
            d.item(),
            {L: (acts["mlp", L] * grads["mlp", L])[0] for L in range(n_layers)},
            {L: (acts["attn", L] * grads["attn", L])[0] for L in range(n_layers)},
        )

    _frozen(model)
    return run


def load_transformer_lens(folder: Path, ids: Ids) -> Run:
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(str(folder), device="cpu", dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)

    def captured(name: str) -> bool:
        return name.endswith(("mlp.hook_post", "attn.hook_pattern"))

    def run(tokens: list[int]) -> Capture:
        acts: dict[str, torch.Tensor] = {}
        grads: dict[str, torch.Tensor] = {}

        def leaf(embed: torch.Tensor, hook: Any) -> torch.Tensor:
            return embed.requires_grad_(True)  # frozen weights: the graph starts here

        def save_act(x: torch.Tensor, hook: Any) -> None:
            acts[hook.name] = x.detach()

        def save_grad(g: torch.Tensor, hook: Any) -> None:
            grads[hook.name] = g.detach()

        def fixed(scale: torch.Tensor, hook: Any) -> torch.Tensor:
            return scale.detach()

        fwd = [("hook_embed", leaf), ("ln_final.hook_scale", fixed), (captured, save_act)]
        with torch.enable_grad(), model.hooks(fwd_hooks=fwd, bwd_hooks=[(captured, save_grad)]):
            logits = model(torch.tensor([tokens]), logits_to_keep=1)[0, -1]
            d = logits[ids.mary] - logits[ids.john]
            d.backward()
        out = Capture(d.item())
        for name, a in acts.items():
            layer = int(name.split(".")[1])
            table = out.heads if "pattern" in name else out.neurons
            table[layer] = (a * grads[name])[0]
        return out

    _frozen(model)
    return run


def load_nnsight(folder: Path, ids: Ids) -> Run:
    from nnsight.modeling.transformers import TransformersModel

    model = TransformersModel(
        str(folder),
        task="text-generation",
        dispatch=True,
        device_map="cpu",
        dtype=torch.float32,
        attn_implementation="eager",  # SDPA returns no attention probabilities
    )
    model.eval()
    model.requires_grad_(False)
    n_layers = len(model.model.layers)
    norm_weight, eps = model.model.norm.weight, model.model.norm.variance_epsilon

    def run(tokens: list[int]) -> Capture:
        out = Capture(0.0)
        with model.trace(torch.tensor([tokens]), logits_to_keep=1):
            # Frozen weights: the embeddings are where the graph starts.
            model.model.embed_tokens.output.requires_grad_(True)
            neurons, pattern = [], []
            for layer in model.model.layers:  # in forward order
                pattern.append(layer.self_attn.output[1])
                neurons.append(layer.mlp.down_proj.input)
            norm = model.model.norm
            norm.output = rms_norm_scale_fixed(norm.input, norm_weight, eps)
            logits = model.output.logits[0, -1]
            d = logits[ids.mary] - logits[ids.john]
            with d.backward():
                for L in reversed(range(n_layers)):  # gradients arrive in reverse
                    out.neurons[L] = (neurons[L] * neurons[L].grad)[0].save()
                    out.heads[L] = (pattern[L] * pattern[L].grad)[0].save()
            d_value = d.save()
        out.d = d_value.item()
        return out

    _frozen(model)
    return run


def _engine(folder: Path) -> Any:
    from neuron_explainer.activations import Engine
    from neuron_explainer.models import load_model

    return Engine(load_model(folder, device="cpu"))


def _request(tokens: list[int], token_views: bool) -> Any:
    from neuron_explainer.activations import SubRequest

    return SubRequest(
        prompt=tokens,
        target_tokens=[TARGET],
        distractor_tokens=[DISTRACTOR],
        top_and_bottom_k=10,
        token_views=token_views,
    )


def load_ours(folder: Path, ids: Ids, token_views: bool = True, engine: Any = None) -> Run:
    engine = engine or _engine(folder)

    def run(tokens: list[int]) -> Capture:
        (result,) = engine.run([_request(tokens, token_views)])
        return Capture(result.direction_value)

    return run


def ours_act_times_grad(engine: Any, tokens: list[int]) -> Capture:
    """Our request, and the engine's estimated_total_effect (act×grad) of every MLP neuron and
    head pair, read from the pass state by the registered derived scalars."""
    from neuron_explainer.activations import REGISTRY, NodeType

    neuron = REGISTRY[NodeType.MLP_NEURON, "estimated_total_effect"].fn
    head = REGISTRY[NodeType.ATTENTION_HEAD, "estimated_total_effect"].fn
    out = Capture(0.0)

    def inspect(state: Any) -> None:
        for L in range(engine.model.cfg.n_layers):
            out.neurons[L] = neuron(state, L)[0].clone()
            out.heads[L] = head(state, L)[0].clone()

    (result,) = engine.run([_request(tokens, False)], inspect=inspect)
    out.d = result.direction_value
    return out


LOADERS: dict[str, Callable[[Path, Ids], Run]] = {
    "floor": load_floor,
    "hooks": load_hooks,
    "transformer_lens": load_transformer_lens,
    "nnsight": load_nnsight,
    "ours": load_ours,
    "ours_no_views": lambda folder, ids: load_ours(folder, ids, token_views=False),
}


# ---- the same work: every peer against our engine --------------------------------------------------


def relative_gap(peer: dict[int, torch.Tensor], ours: dict[int, torch.Tensor]) -> float:
    a = torch.stack([peer[L] for L in sorted(ours)])
    b = torch.stack([ours[L] for L in sorted(ours)])
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max())


def check_same_work(runs: dict[str, Run], engine: Any, tokens: list[int]) -> bool:
    ours = ours_act_times_grad(engine, tokens)
    flat = torch.stack([ours.neurons[L] for L in sorted(ours.neurons)])  # [L, T, m]
    top = flat.abs().flatten().topk(3).indices
    places = [tuple(int(i) for i in torch.unravel_index(t, flat.shape)) for t in top]
    print(
        f"T = {len(tokens)}: D ours {ours.d:.4f}; largest |act×grad| MLP neurons "
        + ", ".join(f"L{L} #{i} (token {t}) {float(flat[L, t, i]):+.4f}" for L, t, i in places)
    )
    ok = True
    for name in ["floor", *PEERS]:
        cap = runs[name](tokens)
        d_gap = abs(cap.d - ours.d) / abs(ours.d)
        line = f"  {name:<17} D {cap.d:.4f} (rel. gap {d_gap:.1e})"
        ok &= d_gap <= TOLERANCE
        if cap.neurons:
            n_gap = relative_gap(cap.neurons, ours.neurons)
            h_gap = relative_gap(cap.heads, ours.heads)
            same = ", ".join(f"{float(cap.neurons[L][t, i]):+.4f}" for L, t, i in places)
            line += f"; act×grad max gap / max: neurons {n_gap:.1e}, heads {h_gap:.1e}; {same}"
            ok &= n_gap <= TOLERANCE and h_gap <= TOLERANCE
        print(line)
    return ok


# ---- time and memory -------------------------------------------------------------------------------


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_rounds(
    runs: dict[str, Run], tokens: list[int], repeats: int, rounds: int
) -> dict[str, list[float]]:
    """Per method, its median in each round; rounds alternate the order of the methods."""
    medians: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(rounds):
        for m in METHODS if r % 2 == 0 else METHODS[::-1]:
            medians[m].append(median_seconds(functools.partial(runs[m], tokens), repeats))
        print(
            f"T = {len(tokens)} round {r + 1}: "
            + "  ".join(f"{m} {medians[m][-1]:.3f}" for m in METHODS),
            flush=True,
        )
    return medians


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def memory_child(method: str, n: int, folder: Path) -> None:
    tok, ids = tokenizer_ids(folder)
    run = LOADERS[method](folder, ids)
    run(prompt(tok, 16))  # allocate lazy state once
    tokens = prompt(tok, n)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM)
    base = _status_kib("VmRSS")
    run(tokens)
    print(json.dumps({"extra_mib": (_status_kib("VmHWM") - base) / 1024}))


def extra_peak_mib(method: str, n: int, folder: Path, threads: int | None) -> float:
    cmd = [sys.executable, __file__, "--memory-child", method, "--lengths", str(n)]
    cmd += ["--folder", str(folder)] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"])


# ---- report ----------------------------------------------------------------------------------------


def span(values: list[float], digits: int) -> str:
    lo, hi = (f"{v:.{digits}f}" for v in (min(values), max(values)))
    return lo if lo == hi else f"{lo}–{hi}"


def versions() -> str:
    from importlib.metadata import version

    names = ["torch", "transformers", "transformer-lens", "nnsight"]
    return ", ".join(f"{n} {version(n)}" for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--folder", type=Path, default=None, help="the exported model folder")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", choices=METHODS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = export_folder(args.folder)
    if args.memory_child is not None:
        memory_child(args.memory_child, args.lengths[0], folder)
        return

    tok, ids = tokenizer_ids(folder)
    engine = _engine(folder)
    assert engine.model.tokenizer.single_token_id(TARGET) == ids.mary
    runs = {m: LOADERS[m](folder, ids) for m in ["floor", *PEERS]}
    runs["ours"] = load_ours(folder, ids, engine=engine)
    runs["ours_no_views"] = load_ours(folder, ids, token_views=False, engine=engine)
    print(
        f"{MODEL} exported to {folder}; {versions()}; {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}"
    )

    print("\n== the same work: act×grad and D of each peer vs our engine ==")
    same = all(check_same_work(runs, engine, prompt(tok, n)) for n in args.lengths)
    print("all within tolerance" if same else f"MISMATCH above {TOLERANCE:g}")

    print(f"\n== time: medians of {args.repeats}, {args.rounds} alternating rounds ==")
    times = {n: time_rounds(runs, prompt(tok, n), args.repeats, args.rounds) for n in args.lengths}
    del runs, engine
    gc.collect()

    memory: dict[int, dict[str, float]] = {n: {} for n in args.lengths}
    if not args.skip_memory:
        print("\n== extra peak RSS of one call (a fresh process per method and length) ==")
        for n in args.lengths:
            for m in METHODS:
                memory[n][m] = extra_peak_mib(m, n, folder, args.threads)
                print(f"T = {n} {m}: {memory[n][m]:.0f} MiB", flush=True)

    print(f"\nload average at the end {os.getloadavg()[0]:.2f}\n")
    header = " | ".join(f"T = {n}: time (÷ floor) | extra peak RSS" for n in args.lengths)
    print(f"| method | {header} |")
    print("|---|" + "---|---|" * len(args.lengths))
    for m in METHODS:
        cells = []
        for n in args.lengths:
            t = times[n]
            ratios = [a / b for a, b in zip(t[m], t["floor"], strict=True)]
            when = f"{span(t[m], 2)} s ({span(ratios, 2)}×)"
            mem = f"{memory[n][m]:.0f} MiB" if m in memory[n] else "–"
            cells += [when, mem]
        print(f"| {LABELS[m]} | " + " | ".join(cells) + " |")

    verdicts = []
    for n in args.lengths:
        t = times[n]
        fastest = min(PEERS, key=lambda p: statistics.median(t[p]))
        wins = sum(
            o <= min(t[p][r] for p in PEERS) for r, o in enumerate(t["ours"])
        )  # rounds where ours beat every peer
        holds = statistics.median(t["ours"]) <= statistics.median(t[fastest])
        verdicts.append(
            f"at {n}: {'yes' if holds else 'no'} (fastest peer {fastest}; "
            f"ours faster in {wins} of {len(t['ours'])} rounds)"
        )
    print("\nours ≤ fastest peer capture " + ", ".join(verdicts))


if __name__ == "__main__":
    main()
