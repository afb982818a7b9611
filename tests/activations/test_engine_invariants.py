"""Engine invariants (docs/engine.md §7 items 2, 3, 4, 6, 7) against independent references.

Every test runs on two models: a small random GPT-2 (LayerNorm with non-trivial gains and biases,
biases everywhere, learned positions, no tokenizer: prompts and targets are token ids) and the
default model (SmolLM2-135M: RMSNorm, SwiGLU, rotary, grouped-query attention; prompts as text).

The references never call the engine: they are plain forwards of the model with our own hooks
(embeddings replaced by leaf tensors that require grad, the final norm scale detached, activations
zeroed for ablations), `torch.autograd.grad`, and the formulas of docs/engine.md written out here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
import torch

from neuron_explainer.activations import (
    METRICS,
    AttentionTraceType,
    Engine,
    FieldPath,
    NodeAblation,
    NodeIndex,
    NodeToTrace,
    NodeType,
    PromptTooLongError,
    RequestError,
    SubRequest,
    SubResult,
    run_debugger_request,
)
from neuron_explainer.models.config import ModelConfig
from neuron_explainer.models.transformer import HookedTransformer, Norm

EMB, MLP, HEAD = NodeType.EMBEDDING, NodeType.MLP_NEURON, NodeType.ATTENTION_HEAD
Hook = tuple[str, Callable[..., torch.Tensor | None]]

# Token sums of the node types whose direct effects decompose D (heads: per query token).
TOKEN_SUM_KEYS = ("embedding", "mlp_neuron", "attention_head_attended_from")


# ---- the two subject models ------------------------------------------------------------------------


@dataclass
class Prompt:
    engine_prompt: str | list[int]  # what the engine is given
    tokens: list[int]
    target_args: Sequence[str | int] = ()  # what the engine is given
    distractor_args: Sequence[str | int] = ()
    targets: list[int] = field(default_factory=list)  # the same tokens as ids
    distractors: list[int] = field(default_factory=list)


@dataclass
class Case:
    name: str
    model: HookedTransformer
    main: Prompt
    short: Prompt
    mid: Prompt
    nodes: dict[str, NodeIndex]  # nodes to ablate / trace, chosen per model


def random_gpt2() -> HookedTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig.gpt2(n_layers=3, d_model=64, n_heads=4, d_mlp=256, vocab_size=200, n_ctx=64)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))  # LayerNorm biases start at zero
            elif name.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
                p.mul_(1.0 + 0.3 * torch.randn_like(p))
        model.embed.weight.mul_(0.5)
        model.pos_embed.weight.mul_(0.5)
    model.requires_grad_(False)
    model.eval()
    return model


def id_prompt(model: HookedTransformer, tokens: list[int], with_targets: bool = True) -> Prompt:
    """Targets: the two largest logits at the last token; distractor: the smallest (so D is large)."""
    prompt = Prompt(list(tokens), list(tokens))
    if with_targets:
        logits = PlainForward(model, tokens).logits[-1].detach()
        order = logits.argsort(descending=True).tolist()
        prompt.targets, prompt.distractors = order[:2], order[-1:]
        prompt.target_args, prompt.distractor_args = list(order[:2]), list(order[-1:])
    return prompt


def text_prompt(
    model: HookedTransformer,
    text: str,
    targets: Sequence[str] = (),
    distractors: Sequence[str] = (),
) -> Prompt:
    tok = model.tokenizer
    assert tok is not None

    def one(s: str) -> int:
        ids = tok.encode(s)
        assert len(ids) == 1, (s, ids)
        return ids[0]

    return Prompt(
        text,
        list(tok.encode(text)),
        list(targets),
        list(distractors),
        [one(s) for s in targets],
        [one(s) for s in distractors],
    )


def gpt2_case() -> Case:
    model = random_gpt2()
    gen = torch.Generator().manual_seed(1)
    main, short, mid = (torch.randint(0, 200, (n,), generator=gen).tolist() for n in (12, 6, 9))
    return Case(
        "gpt2",
        model,
        id_prompt(model, main),
        id_prompt(model, short),
        id_prompt(model, mid, with_targets=False),
        {
            "ablate_neuron": NodeIndex(MLP, 1, 11, 17),
            "ablate_pair": NodeIndex(HEAD, 2, 11, 1, attended_token=2),
            "ablate_row": NodeIndex(HEAD, 1, 11, 3),
            "ablate_embedding": NodeIndex(EMB, 0, 9),
            "short_row": NodeIndex(HEAD, 1, 5, 0),
            "short_neuron": NodeIndex(MLP, 0, 1, 3),
            "mid_trace": NodeIndex(MLP, 1, 7, 11),
            "trace_neuron": NodeIndex(MLP, 2, 8, 5),
            "trace_head": NodeIndex(HEAD, 2, 8, 1, attended_token=3),
            "trace_value_loss": NodeIndex(HEAD, 1, 11, 2, attended_token=4),
            "trace_value_up": NodeIndex(HEAD, 0, 7, 3, attended_token=2),
            "trace_value_down": NodeIndex(MLP, 2, 7, 9),
        },
    )


def default_case(model: HookedTransformer) -> Case:
    main = text_prompt(
        model, "When Mary and John went to the store, John gave a drink to", [" Mary"], [" John"]
    )
    short = text_prompt(model, "The capital of France is", [" Paris"], [" London"])
    mid = text_prompt(model, "Alice and Bob played chess in the park")
    n = len(main.tokens)
    return Case(
        "smollm2",
        model,
        main,
        short,
        mid,
        {
            "ablate_neuron": NodeIndex(MLP, 10, n - 1, 100),
            "ablate_pair": NodeIndex(HEAD, 20, n - 1, 4, attended_token=1),
            "ablate_row": NodeIndex(HEAD, 15, n - 1, 2),
            "ablate_embedding": NodeIndex(EMB, 0, 1),
            "short_row": NodeIndex(HEAD, 1, len(short.tokens) - 1, 0),
            "short_neuron": NodeIndex(MLP, 2, 1, 3),
            "mid_trace": NodeIndex(MLP, 4, len(mid.tokens) - 2, 100),
            "trace_neuron": NodeIndex(MLP, 8, n - 3, 123),
            "trace_head": NodeIndex(HEAD, 6, n - 3, 4, attended_token=2),
            "trace_value_loss": NodeIndex(HEAD, 10, n - 1, 7, attended_token=1),
            "trace_value_up": NodeIndex(HEAD, 3, n - 3, 5, attended_token=1),
            "trace_value_down": NodeIndex(MLP, 9, n - 3, 77),
        },
    )


@pytest.fixture(scope="module", params=["gpt2", "smollm2"])
def case(request: pytest.FixtureRequest) -> Case:
    if request.param == "gpt2":
        return gpt2_case()
    return default_case(request.getfixturevalue("default_model"))


# ---- the independent reference ---------------------------------------------------------------------


def layer_names(cfg: ModelConfig, suffix: str) -> list[str]:
    return [f"blocks.{layer}.{suffix}" for layer in range(cfg.n_layers)]


RECORDED = (
    "hook_resid_pre",
    "ln1.hook_scale",
    "attn.hook_v",
    "attn.hook_pattern",  # also makes the model take the explicit attention path, as the engine
    "hook_resid_mid",
    "ln2.hook_scale",
    "mlp.hook_post",
    "hook_resid_post",
)


class PlainForward:
    """One prompt through the model with our own hooks only.

    Embeddings are replaced by leaf tensors requiring grad (so every activation downstream carries
    a graph), the final norm scale is detached (D is affine in the final residual), `edits` may
    replace activations (ablations), and the activations in RECORDED are kept with their graph.
    """

    def __init__(
        self,
        model: HookedTransformer,
        tokens: list[int],
        edits: Sequence[Hook] = (),
        last_only: bool = False,
    ) -> None:
        self.model, cfg = model, model.cfg
        self.emb_names = ["hook_embed"] + (
            ["hook_pos_embed"] if cfg.positional == "learned" else []
        )
        self.rec: dict[str, torch.Tensor] = {}

        def leaf(x: torch.Tensor, hook: object) -> torch.Tensor:
            x = x.detach().clone().requires_grad_(True)
            self.rec[hook.name] = x  # type: ignore[attr-defined]
            return x

        def keep(x: torch.Tensor, hook: object) -> None:
            self.rec[hook.name] = x  # type: ignore[attr-defined]

        hooks: list[Hook] = [*edits, *((n, leaf) for n in self.emb_names)]
        hooks.append(("ln_final.hook_scale", lambda x, hook: x.detach()))
        hooks += [(n, keep) for s in RECORDED for n in layer_names(cfg, s)]
        t = torch.tensor([tokens], device=model.device)
        with torch.enable_grad(), model.hooks(fwd=hooks):
            if last_only:
                pos = torch.tensor([len(tokens) - 1], device=model.device)
                self.logits = model(t, logits_positions=pos)  # [1, V]
            else:
                self.logits = model(t)[0]  # [n, V]

    def act(self, name: str) -> torch.Tensor:
        return self.rec[name][0]

    def embedding(self) -> torch.Tensor:
        """[n, d] the embedding node's write: token (+ position) embedding."""
        return sum(self.act(n) for n in self.emb_names)  # type: ignore[return-value]

    def grads(self, d: torch.Tensor, extra: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """∂d/∂(embedding, every neuron post-activation, every pattern, `extra`), batch dim off."""
        cfg = self.model.cfg
        names = [
            "hook_embed",
            *layer_names(cfg, "mlp.hook_post"),
            *layer_names(cfg, "attn.hook_pattern"),
            *extra,
        ]
        tensors = [self.rec[n] for n in names]
        out = torch.autograd.grad(d, tensors, retain_graph=True, allow_unused=True)
        return {
            n: (torch.zeros_like(t) if g is None else g)[0]
            for n, t, g in zip(names, tensors, out, strict=True)
        }

    # Our own formulas (docs/engine.md §3), per node.

    def total_effect(self, grads: dict[str, torch.Tensor], node: NodeIndex) -> float:
        t, c = node.token, node.component
        if node.node_type == EMB:
            return num(self.embedding()[t] @ grads["hook_embed"][t])
        if node.node_type == MLP:
            name = f"blocks.{node.layer}.mlp.hook_post"
            return num(self.act(name)[t, c] * grads[name][t, c])
        name = f"blocks.{node.layer}.attn.hook_pattern"
        return num(
            self.act(name)[c, t, node.attended_token] * grads[name][c, t, node.attended_token]
        )

    def activation(self, node: NodeIndex) -> float:
        t, c, layer = node.token, node.component, node.layer
        if node.node_type == EMB:
            return 1.0
        if node.node_type == MLP:
            return num(self.act(f"blocks.{layer}.mlp.hook_post")[t, c])
        return num(self.act(f"blocks.{layer}.attn.hook_pattern")[c, t, node.attended_token])

    def write(self, node: NodeIndex) -> torch.Tensor:
        """[d] the vector the node adds to the residual stream (docs/terminology.md)."""
        t, c, layer = node.token, node.component, node.layer
        if node.node_type == EMB:
            return self.embedding()[t]
        if node.node_type == MLP:
            w_out = self.model.blocks[layer].mlp.w_out.weight[:, c]  # [d]
            return self.act(f"blocks.{layer}.mlp.hook_post")[t, c] * w_out
        attn = self.model.blocks[layer].attn
        k = node.attended_token
        v = self.act(f"blocks.{layer}.attn.hook_v")[k, c // (attn.n_heads // attn.n_kv_heads)]
        a = self.act(f"blocks.{layer}.attn.hook_pattern")[c, t, k]
        w_o = attn.o_proj.weight[:, c * attn.d_head : (c + 1) * attn.d_head]  # [d, dh]
        return a * (w_o @ v)

    def write_magnitude(self, node: NodeIndex) -> float:
        return num(self.write(node).norm())

    def direct_effect(self, g: torch.Tensor, node: NodeIndex) -> float:
        """write · g at the node's token (heads: g at the query token)."""
        return num(self.write(node) @ g[node.token])


def loss_d(logits: torch.Tensor, loss_fn: str, targets: list[int], distractors: list[int]):  # type: ignore[no-untyped-def]
    """D from the logits [V] at the read position (docs/terminology.md)."""
    if loss_fn == "logit_diff":
        return logits[targets].mean() - logits[distractors].mean()
    assert loss_fn == "logit_minus_mean"
    return logits[targets].mean() - logits.mean()


def norm_fixed(norm: Norm, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The norm with its scale (denominator) given, i.e. held fixed."""
    if norm.kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    y = x / scale * norm.weight
    return y if norm.bias is None else y + norm.bias


def linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias


def rotate_half_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [n, heads, dh] at positions 0..n-1, Hugging Face rotate-half layout.

    Angles in float32 as Hugging Face computes them (float64 angles differ by ~1e-7, which moves
    gradients through 30 layers by ~1e-5 relative).
    """
    n, _, dh = x.shape
    inv_freq = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.int64).float() / dh)
    ang = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq  # [n, dh/2]
    ang = torch.cat([ang, ang], dim=-1)[:, None, :]
    half = dh // 2
    return x * ang.cos() + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * ang.sin()


def neuron_pre(fw: PlainForward, node: NodeIndex) -> tuple[torch.Tensor, str]:
    """A neuron's pre-activation recomputed from resid_mid through ln2 with its scale held fixed."""
    block = fw.model.blocks[node.layer]
    cut = f"blocks.{node.layer}.hook_resid_mid"
    x = fw.act(cut)[node.token]
    scale = fw.act(f"blocks.{node.layer}.ln2.hook_scale")[node.token].detach()
    w = block.mlp.w_in
    b = 0.0 if w.bias is None else w.bias[node.component]
    return norm_fixed(block.ln2, x, scale) @ w.weight[node.component] + b, cut


def head_inputs(fw: PlainForward, layer: int) -> torch.Tensor:
    """[n, d] the attention input recomputed from resid_pre through ln1 with its scale fixed."""
    x = fw.act(f"blocks.{layer}.hook_resid_pre")
    scale = fw.act(f"blocks.{layer}.ln1.hook_scale").detach()
    return norm_fixed(fw.model.blocks[layer].ln1, x, scale)


def head_score(fw: PlainForward, node: NodeIndex, side: AttentionTraceType) -> torch.Tensor:
    """The pre-softmax score q·k/sqrt(dh) recomputed from resid_pre, other side detached."""
    cfg, attn = fw.model.cfg, fw.model.blocks[node.layer].attn
    x = head_inputs(fw, node.layer)
    n = x.shape[0]
    q = linear(attn.q_proj, x).view(n, attn.n_heads, attn.d_head)
    k = linear(attn.k_proj, x).view(n, attn.n_kv_heads, attn.d_head)
    if cfg.positional == "rotary":
        q, k = rotate_half_rope(q, cfg.rope_theta), rotate_half_rope(k, cfg.rope_theta)
    qv = q[node.token, node.component]
    assert node.attended_token is not None
    kv = k[node.attended_token, node.component // (attn.n_heads // attn.n_kv_heads)]
    if side == AttentionTraceType.QUERY:
        kv = kv.detach()
    elif side == AttentionTraceType.KEY:
        qv = qv.detach()
    return qv @ kv / math.sqrt(attn.d_head)


def head_value_effect(fw: PlainForward, node: NodeIndex, g_down: torch.Tensor) -> torch.Tensor:
    """A·((v W_O[h])·g_down), v recomputed from resid_pre (ln1 scale fixed), pattern detached."""
    attn = fw.model.blocks[node.layer].attn
    x = head_inputs(fw, node.layer)
    v = linear(attn.v_proj, x).view(x.shape[0], attn.n_kv_heads, attn.d_head)
    assert node.attended_token is not None
    v = v[node.attended_token, node.component // (attn.n_heads // attn.n_kv_heads)]
    h = node.component
    write = attn.o_proj.weight[:, h * attn.d_head : (h + 1) * attn.d_head] @ v  # [d]
    a = fw.act(f"blocks.{node.layer}.attn.hook_pattern")[h, node.token, node.attended_token]
    return a.detach() * (write @ g_down.detach())


# ---- helpers ---------------------------------------------------------------------------------------


def request(prompt: Prompt, **kw: object) -> SubRequest:
    base: dict[str, object] = dict(
        prompt=prompt.engine_prompt,
        target_tokens=prompt.target_args,
        distractor_tokens=prompt.distractor_args,
        token_views=False,
    )
    return SubRequest(**(base | kw))  # type: ignore[arg-type]


def run(model: HookedTransformer, *reqs: SubRequest) -> list[SubResult]:
    return Engine(model).run(list(reqs))


def num(t: torch.Tensor) -> float:
    return float(t.detach())


def rel_err(got: float, want: float, floor: float = 0.0) -> float:
    denom = max(abs(want), floor)
    return abs(got - want) / denom if denom > 0 else abs(got - want)


def node_metric(res: SubResult, metric: str) -> dict[NodeIndex, float | None]:
    return dict(zip(res.nodes, res.metrics[metric], strict=True))


class Tolerance:
    """Worst |got - want| / (rtol·|want| + atol) over many comparisons; they pass when <= 1."""

    def __init__(self, rtol: float, atol: float) -> None:
        self.rtol, self.atol = rtol, atol
        self.ratio = self.max_abs = self.max_rel = 0.0
        self.count = 0

    def add(self, got: float, want: float) -> None:
        diff = abs(got - want)
        self.ratio = max(self.ratio, diff / (self.rtol * abs(want) + self.atol))
        self.max_abs = max(self.max_abs, diff)
        if want:
            self.max_rel = max(self.max_rel, diff / abs(want))
        self.count += 1

    def __str__(self) -> str:
        return (
            f"{self.count} values, max abs err {self.max_abs:.3g}, max rel err {self.max_rel:.3g},"
            f" worst/tolerance {self.ratio:.3g}"
        )


def compare_nodes(res: SubResult, metric: str, want: Callable[[NodeIndex], float]) -> Tolerance:
    """Every node of the table: |got - want| <= 1e-5·|want| + 1e-6·max|want| (the absolute floor
    is for values that cancel down to almost nothing, e.g. e·∂D/∂e, whose float32 rounding is of
    the size of their terms)."""
    pairs = [(got, want(node)) for node, got in node_metric(res, metric).items()]
    assert pairs and all(got is not None for got, _ in pairs)
    tol = Tolerance(rtol=1e-5, atol=1e-6 * max(abs(w) for _, w in pairs))
    for got, w in pairs:
        tol.add(got, w)  # type: ignore[arg-type]
    return tol


def report(case: Case, what: str, value: float | Tolerance) -> None:
    print(f"[{case.name}] {what}: {value if isinstance(value, Tolerance) else f'{value:.3g}'}")


# ---- item 2: decomposition -------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", ["logit_diff", "logit_minus_mean"])
def test_direct_effects_decompose_direction(case: Case, loss_fn: str) -> None:
    model, p = case.model, case.main
    distractors = p.distractors if loss_fn == "logit_diff" else []
    (res,) = run(
        model,
        request(p, loss_fn=loss_fn, distractor_tokens=p.distractor_args if distractors else []),
    )
    assert res.tokens == p.tokens

    # D itself, from a plain forward's logits.
    d_ref = num(loss_d(PlainForward(model, p.tokens).logits[-1], loss_fn, p.targets, distractors))
    err_d = rel_err(res.direction_value, d_ref)
    report(case, f"{loss_fn} direction_value rel err", err_d)
    assert err_d <= 1e-5

    # Σ direct effects of every node + output biases + the final norm's bias through W_U.
    ln_bias = model.ln_final.bias
    const = 0.0
    if ln_bias is not None:
        const = num(loss_d(ln_bias @ model.W_U, loss_fn, p.targets, distractors))
    node_sum = sum(sum(res.token_sums[k]["direct_effect"]) for k in TOKEN_SUM_KEYS)
    total = node_sum + res.bias_direct_effect + const
    err = rel_err(total, d_ref)
    report(case, f"{loss_fn} decomposition rel err", err)
    assert err <= 1e-4, (total, d_ref, node_sum, res.bias_direct_effect, const)
    if case.name == "gpt2":  # the bias terms are really exercised
        assert abs(res.bias_direct_effect) > 1e-3 and abs(const) > 1e-3


# ---- item 3: estimated total effect ----------------------------------------------------------------


def test_estimated_total_effect_matches_autograd(case: Case) -> None:
    model, p = case.model, case.main
    (res,) = run(model, request(p, top_and_bottom_k=15))
    assert {n.node_type for n in res.nodes} == {EMB, MLP, HEAD}

    fw = PlainForward(model, p.tokens)
    d = loss_d(fw.logits[-1], "logit_diff", p.targets, p.distractors)
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    grads = fw.grads(d, extra=[final])
    tol = compare_nodes(res, "estimated_total_effect", lambda n: fw.total_effect(grads, n))
    report(case, "total effect", tol)
    assert tol.ratio <= 1.0

    # The other node metrics of the same table, from our own formulas (docs/engine.md §3).
    g = grads[final]  # ∂D/∂(final residual), final norm scale fixed: non-zero at the last token
    for metric, want in (
        ("direct_effect", lambda n: fw.direct_effect(g, n)),
        ("activation", fw.activation),
        ("write_magnitude", fw.write_magnitude),
    ):
        tol = compare_nodes(res, metric, want)
        report(case, metric, tol)
        assert tol.ratio <= 1.0


# ---- item 4: ablation ------------------------------------------------------------------------------


def zero_edits(node: NodeIndex) -> list[Hook]:
    """Our own forward hooks setting one node's activation to zero."""
    t, c = node.token, node.component

    def edit(fn: Callable[[torch.Tensor], object]) -> Callable[..., torch.Tensor]:
        def hook(x: torch.Tensor, _hook: object) -> torch.Tensor:
            x = x.clone()
            fn(x)
            return x

        return hook

    if node.node_type == MLP:
        return [(f"blocks.{node.layer}.mlp.hook_post", edit(lambda x: x[0, t, c].zero_()))]
    if node.node_type == HEAD:
        keys = slice(None) if node.attended_token is None else node.attended_token
        return [
            (f"blocks.{node.layer}.attn.hook_pattern", edit(lambda x: x[0, c, t, keys].zero_()))
        ]
    # The embedding node writes token (+ position) embedding: remove both.
    return [(name, edit(lambda x: x[0, t].zero_())) for name in ("hook_embed", "hook_pos_embed")]


def test_zero_ablation_matches_plain_forward(case: Case) -> None:
    model, p = case.model, case.main
    names = ("ablate_neuron", "ablate_pair", "ablate_row", "ablate_embedding")
    ablation_sets = [[case.nodes[k]] for k in names] + [[case.nodes[k] for k in names]]
    # One batch: the unablated baseline (as the UI sends it), each single ablation, all at once.
    reqs = [request(p)] + [
        request(p, node_ablations=[NodeAblation(n) for n in nodes]) for nodes in ablation_sets
    ]
    results = run(model, *reqs)

    def d_ref(nodes: list[NodeIndex]) -> float:
        has_pos = model.cfg.positional == "learned"
        edits = [e for n in nodes for e in zero_edits(n) if has_pos or e[0] != "hook_pos_embed"]
        logits = PlainForward(model, p.tokens, edits).logits[-1]
        return num(loss_d(logits, "logit_diff", p.targets, p.distractors))

    base = d_ref([])
    assert rel_err(results[0].direction_value, base) <= 1e-5
    worst_d = worst_delta = 0.0
    for nodes, res in zip(ablation_sets, results[1:], strict=True):
        want = d_ref(nodes)
        assert abs(want - base) > 1e-5, f"ablating {nodes} should move D"
        worst_d = max(worst_d, rel_err(res.direction_value, want))
        got_delta = res.direction_value - results[0].direction_value
        worst_delta = max(worst_delta, rel_err(got_delta, want - base, floor=1e-2 * abs(base)))
        # The ablated node's own activation reads 0 in the node table when it was selected.
        for node, value in node_metric(res, "activation").items():
            if node in nodes and node.node_type != EMB:
                assert value == 0.0
    report(case, "ablated D rel err", worst_d)
    report(case, "ablation ΔD rel err", worst_delta)
    assert worst_d <= 1e-5
    assert worst_delta <= 1e-4


def test_no_ablation_logits_bit_identical(case: Case) -> None:
    model, p = case.model, case.main
    (res,) = run_debugger_request(model, [request(p, token_view_k=20)])
    # The model's own forward, no hook attached (the fused attention kernel, as in the engine).
    with torch.no_grad():
        logits = model(torch.tensor([p.tokens]), logits_positions=torch.tensor([len(p.tokens) - 1]))
    logits = logits[0]
    scored = res.top_logits + res.bottom_logits + res.target_logits + res.distractor_logits
    ids = [s.token for s in scored]
    got = torch.tensor([s.score for s in scored], dtype=logits.dtype)
    assert torch.equal(got, logits[ids])
    assert ids[:20] == logits.topk(20).indices.tolist()


# ---- item 6: batch = solo --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metrics", [METRICS, ("write_magnitude", "estimated_total_effect")], ids=["all", "tie_free"]
)
def test_batch_equals_solo(case: Case, metrics: tuple[str, ...]) -> None:
    model = case.model
    reqs = [
        request(case.main, metrics=metrics),
        request(
            case.short,
            metrics=metrics,
            node_ablations=[
                NodeAblation(case.nodes["short_row"]),
                NodeAblation(case.nodes["short_neuron"]),
            ],
        ),
        request(
            case.mid,
            metrics=metrics,
            upstream_node_to_trace=NodeToTrace(case.nodes["mid_trace"]),
        ),
    ]
    assert len({len(p.tokens) for p in (case.main, case.short, case.mid)}) == 3
    batched = run(model, *reqs)
    # Scalars: |batched - solo| <= 1e-5·|solo| + 1e-6. Node metrics: per row and metric, max |Δ| <=
    # 1e-5·max |value| (norm-wise), and each value within 1e-4·|value| + 1e-6: batching changes
    # float32 rounding (~1e-7 relative in activations), which 30 layers of backward amplify in a
    # value that cancels down to a small number, e.g. e·∂D/∂e.
    scalars, elementwise = Tolerance(rtol=1e-5, atol=1e-6), Tolerance(rtol=1e-4, atol=1e-6)
    normwise = 0.0
    for req, bat in zip(reqs, batched, strict=True):
        (solo,) = run(model, req)
        assert bat.nodes == batched[0].nodes  # one union, the same list in every result
        assert solo.tokens == bat.tokens
        scalars.add(bat.direction_value, solo.direction_value)
        scalars.add(bat.bias_direct_effect, solo.bias_direct_effect)
        assert [s.token for s in solo.top_logits] == [s.token for s in bat.top_logits]
        for a, b in zip(solo.top_logits, bat.top_logits, strict=True):
            scalars.add(b.score, a.score)
        index = {n: j for j, n in enumerate(bat.nodes)}
        for metric in metrics:
            pairs = [
                (bat.metrics[metric][index[node]], solo.metrics[metric][j])
                for j, node in enumerate(solo.nodes)
                if node in index
            ]
            assert pairs and all(g is not None and w is not None for g, w in pairs)
            for got, want in pairs:
                elementwise.add(got, want)  # type: ignore[arg-type]
            scale = max(abs(w) for _, w in pairs)  # type: ignore[arg-type]
            normwise = max(normwise, max(abs(g - w) for g, w in pairs) / scale)  # type: ignore[operator]
        # Nodes at tokens this prompt does not have are reported as None.
        for j, node in enumerate(bat.nodes):
            if node.token >= len(bat.tokens):
                assert all(bat.metrics[m][j] is None for m in metrics)
        if metrics != METRICS:  # no exact ties among these metrics: selection is stable
            missing = set(solo.nodes) - set(bat.nodes)
            assert not missing, sorted(missing)
    report(case, f"batch vs solo ({len(metrics)} metrics): D, bias, top logits", scalars)
    report(case, f"batch vs solo ({len(metrics)} metrics): node metrics", elementwise)
    report(case, f"batch vs solo ({len(metrics)} metrics): node metrics norm-wise", normwise)
    assert scalars.ratio <= 1.0
    assert normwise <= 1e-5
    assert elementwise.ratio <= 1.0


# ---- item 7: tracing upstream ----------------------------------------------------------------------

TRACES = ["neuron", "query", "key", "query_and_key", "value_loss", "value_neuron"]


def trace_request(case: Case, kind: str) -> tuple[SubRequest, NodeIndex]:
    if kind == "neuron":
        node = case.nodes["trace_neuron"]
        return request(case.main, upstream_node_to_trace=NodeToTrace(node)), node
    if kind == "value_loss":
        node = case.nodes["trace_value_loss"]
        trace = NodeToTrace(node, AttentionTraceType.VALUE)
        return request(case.main, upstream_node_to_trace=trace), node
    if kind == "value_neuron":
        node = case.nodes["trace_value_up"]
        trace = NodeToTrace(node, AttentionTraceType.VALUE)
        down = NodeToTrace(case.nodes["trace_value_down"])
        req = request(
            case.main,
            target_tokens=[],
            distractor_tokens=[],
            upstream_node_to_trace=trace,
            downstream_node_to_trace=down,
        )
        return req, node
    node = case.nodes["trace_head"]
    trace = NodeToTrace(node, AttentionTraceType(kind))
    return request(case.main, upstream_node_to_trace=trace), node


@pytest.mark.parametrize("kind", TRACES)
def test_trace_gradients_match_manual_backward(case: Case, kind: str) -> None:
    model, p = case.model, case.main
    req, node = trace_request(case, kind)
    (res,) = run(model, req)
    fw = PlainForward(model, p.tokens)

    # D recomputed by hand, and where its gradient is read (just before the traced node).
    if kind == "neuron":
        d, cut = neuron_pre(fw, node)
    elif kind.startswith("value"):
        if kind == "value_loss":
            resid = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
            objective = loss_d(fw.logits[-1], "logit_diff", p.targets, p.distractors)
        else:
            objective, resid = neuron_pre(fw, case.nodes["trace_value_down"])
        (g_down,) = torch.autograd.grad(objective, fw.rec[resid], retain_graph=True)
        d = head_value_effect(fw, node, g_down[0, node.token])
        cut = f"blocks.{node.layer}.hook_resid_pre"
    else:
        d = head_score(fw, node, AttentionTraceType(kind))
        cut = f"blocks.{node.layer}.hook_resid_pre"
    cut_position = 2 * node.layer + (1 if kind == "neuron" else 0)

    err_d = rel_err(res.direction_value, num(d), 1e-6)
    report(case, f"trace {kind}: direction_value rel err", err_d)
    assert err_d <= 1e-5
    assert abs(num(d)) > 1e-4  # a non-vacuous trace

    # Only upstream nodes are ranked.
    assert res.nodes
    for n in res.nodes:
        assert n.token <= node.token and n.write_position <= cut_position, n
    assert res.read_position == node.token

    grads = fw.grads(d, extra=[cut])
    g = grads[cut]  # [n, d]: OUR gradient of D at the residual stream just before the node
    total = compare_nodes(res, "estimated_total_effect", lambda n: fw.total_effect(grads, n))
    direct = compare_nodes(res, "direct_effect", lambda n: fw.direct_effect(g, n))
    report(case, f"trace {kind}: total effect", total)
    report(case, f"trace {kind}: direct effect", direct)
    assert total.ratio <= 1.0
    assert direct.ratio <= 1.0
    assert any(v for v in res.metrics["direct_effect"])

    if kind == "neuron":
        # D is affine in resid_mid: Σ direct effects + biases before the cut + ln2's bias term = D.
        block = model.blocks[node.layer]
        const = 0.0
        if block.ln2.bias is not None:
            const += num(block.ln2.bias @ block.mlp.w_in.weight[node.component])
        if block.mlp.w_in.bias is not None:
            const += num(block.mlp.w_in.bias[node.component])
        node_sum = sum(sum(res.token_sums[k]["direct_effect"]) for k in TOKEN_SUM_KEYS)
        err = rel_err(node_sum + res.bias_direct_effect + const, num(d))
        report(case, "trace neuron: decomposition rel err", err)
        assert err <= 1e-4


# ---- other model dtypes ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_engine_runs_in_the_model_dtype(dtype: torch.dtype) -> None:
    """Models load in any dtype (`load_model(dtype=...)`); the engine must follow it. In float64,
    batch = solo holds to 1e-10: what float32 rounding would hide (a padding leak) would show."""
    case = gpt2_case()
    model = copy.deepcopy(case.model).to(dtype)
    reqs = [
        request(case.main),
        request(case.short, node_ablations=[NodeAblation(case.nodes["short_row"])]),
        request(case.mid, upstream_node_to_trace=NodeToTrace(case.nodes["mid_trace"])),
        request(case.mid, loss_fn="zero"),
    ]
    batched = run(model, *reqs)
    p = case.main
    d_ref = num(
        loss_d(
            PlainForward(model, p.tokens).logits[-1].double(),
            "logit_diff",
            p.targets,
            p.distractors,
        )
    )
    if dtype != torch.float64:
        assert rel_err(batched[0].direction_value, d_ref) <= 5e-2
        return
    assert rel_err(batched[0].direction_value, d_ref) <= 1e-12
    res = batched[0]
    ln_bias = model.ln_final.bias
    assert ln_bias is not None
    const = num(loss_d(ln_bias @ model.W_U, "logit_diff", p.targets, p.distractors))
    node_sum = sum(sum(res.token_sums[k]["direct_effect"]) for k in TOKEN_SUM_KEYS)
    # (token sums are accumulated in float32, so 1e-6 here)
    assert rel_err(node_sum + res.bias_direct_effect + const, d_ref) <= 1e-6
    for req, bat in zip(reqs, batched, strict=True):
        (solo,) = run(model, req)
        assert rel_err(bat.direction_value, solo.direction_value, 1e-6) <= 1e-10
        index = {n: j for j, n in enumerate(bat.nodes)}
        for metric in METRICS:
            for j, node in enumerate(solo.nodes):
                if node in index:
                    got, want = bat.metrics[metric][index[node]], solo.metrics[metric][j]
                    assert got is not None and want is not None
                    assert rel_err(got, want, 1e-6) <= 1e-10, (metric, node)


# ---- request errors --------------------------------------------------------------------------------


ABLATION = (1, "node_ablations", 0, "node")
# name -> (bad fields of sub-request 1, the field the error must name, in the library's terms)
ERRORS: dict[str, tuple[Callable[[Case], dict[str, object]], FieldPath]] = {
    # A text target must be exactly one token (the random GPT-2 has no tokenizer at all).
    "target_not_one_token": (
        lambda c: {"target_tokens": [" Mary went" if c.model.tokenizer else "x"]},
        (1, "target_tokens", 0),
    ),
    "target_outside_vocab": (
        lambda c: {"target_tokens": [c.model.cfg.vocab_size]},
        (1, "target_tokens", 0),
    ),
    "layer_out_of_range": (
        lambda c: {"node_ablations": [NodeAblation(NodeIndex(MLP, c.model.cfg.n_layers, 0))]},
        (*ABLATION, "layer"),
    ),
    "token_out_of_range": (
        lambda c: {"node_ablations": [NodeAblation(NodeIndex(MLP, 0, len(c.main.tokens)))]},
        (*ABLATION, "token"),
    ),
    "attended_after_query": (
        lambda c: {"node_ablations": [NodeAblation(NodeIndex(HEAD, 0, 2, 0, attended_token=3))]},
        (*ABLATION, "attended_token"),
    ),
    "trace_layer_out_of_range": (
        lambda c: {"upstream_node_to_trace": NodeToTrace(NodeIndex(MLP, c.model.cfg.n_layers, 0))},
        (1, "upstream_node_to_trace", "node", "layer"),
    ),
    "unknown_loss": (lambda c: {"loss_fn": "cross_entropy"}, (1, "loss_fn")),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_request_errors(case: Case, name: str) -> None:
    bad_fields, expected_field = ERRORS[name]
    # The bad sub-request is the second one, so the field must name its index.
    reqs = [request(case.main), request(case.main, **bad_fields(case))]
    with pytest.raises(RequestError) as info:
        run(case.model, *reqs)
    assert info.value.path == expected_field
    assert info.value.kind == "invalid"


def test_prompt_too_long(case: Case) -> None:
    p = case.main
    assert len(p.tokens) > 8
    engine = Engine(case.model, max_prompt_tokens=8)
    with pytest.raises(PromptTooLongError) as info:
        engine.run([request(p)])
    assert info.value.path == (0, "prompt")
    assert info.value.kind == "too_large"
    # Exactly at the limit is fine.
    ok = Prompt(p.tokens[:8], p.tokens[:8], p.targets, p.distractors, p.targets, p.distractors)
    (res,) = engine.run([request(ok)])
    assert res.tokens == p.tokens[:8]
