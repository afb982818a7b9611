"""The engine's invariants (docs/engine.md §7) on a small random model of every architecture family:
the decomposition of D into direct effects, act×grad against autograd, direct effects against
autograd, zero ablation against an independent forward, and traced pre-activations and scores with
their upstream gradients.

Each model is built from a Hugging Face style config through `config_from_hf`, so the family's
declarative entry is what is tested. The references never call the engine: plain forwards with our
own hooks (embeddings as leaves that require grad, the final norm's and the logit soft-cap's scales
detached) and `torch.autograd.grad`. A direct effect is read off autograd as well: a node's
activation times the gradient of g·(its block's write into the residual stream), with the
post-norm's scale held at its value (docs/engine.md, post-norms), g = ∂D/∂(final residual).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from neuron_explainer.activations import (
    AttentionTraceType,
    Engine,
    NodeAblation,
    NodeIndex,
    NodeToTrace,
    NodeType,
    SubRequest,
    SubResult,
)
from neuron_explainer.models.architectures import config_from_hf
from neuron_explainer.models.transformer import HookedTransformer

EMB, MLP, HEAD = NodeType.EMBEDDING, NodeType.MLP_NEURON, NodeType.ATTENTION_HEAD
TOKEN_SUM_KEYS = ("embedding", "mlp_neuron", "attention_head_attended_from")
VOCAB, N_TOKENS = 200, 12
Hook = tuple[str, Callable[..., torch.Tensor | None]]

SIZES: dict[str, Any] = dict(
    num_hidden_layers=3,
    hidden_size=48,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)
GEMMA: dict[str, Any] = dict(
    head_dim=16, query_pre_attn_scalar=20, hidden_activation="gelu_pytorch_tanh"
)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama3": dict(
        model_type="llama",
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8,
        ),
    ),
    "mistral": dict(model_type="mistral", sliding_window=5),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "gemma2": dict(
        model_type="gemma2",
        **GEMMA,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        attn_logit_softcapping=3.0,
        final_logit_softcapping=2.0,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        **GEMMA,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters=dict(
            sliding_attention=dict(rope_type="default", rope_theta=10000.0),
            full_attention=dict(rope_type="default", rope_theta=1000000.0),
        ),
    ),
    "olmo2": dict(model_type="olmo2"),
    "phi3": dict(model_type="phi3"),
    "pythia": dict(
        model_type="gpt_neox",
        hidden_act="gelu",
        num_key_value_heads=4,
        use_parallel_residual=True,
        attention_bias=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25),
    ),
}


def random_model(family: str) -> HookedTransformer:
    torch.manual_seed(0)
    model = HookedTransformer(config_from_hf(SIZES | FAMILIES[family]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
            elif "ln" in name or "norm" in name:
                p.mul_(1.0 + 0.3 * torch.randn_like(p))
    model.requires_grad_(False)
    return model.eval()


@dataclass
class Case:
    family: str
    model: HookedTransformer
    tokens: list[int]
    targets: list[int]
    distractors: list[int]


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request: pytest.FixtureRequest) -> Case:
    model = random_model(request.param)
    tokens = torch.randint(0, VOCAB, (N_TOKENS,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        order = model(tokens[None])[0, -1].argsort(descending=True).tolist()
    return Case(request.param, model, tokens.tolist(), order[:2], order[-1:])


def request(case: Case, **kw: Any) -> SubRequest:
    base: dict[str, Any] = dict(
        prompt=case.tokens,
        target_tokens=case.targets,
        distractor_tokens=case.distractors,
        token_views=False,
        top_and_bottom_k=12,
    )
    return SubRequest(**(base | kw))


def run(case: Case, *reqs: SubRequest) -> list[SubResult]:
    return Engine(case.model).run(list(reqs))


class PlainForward:
    """One prompt through the model with our own hooks; values of `keep` held with their graph."""

    KEEP = ("mlp.hook_post", "mlp.hook_pre", "attn.hook_pattern", "attn.hook_attn_scores")

    def __init__(self, case: Case, edits: Sequence[Hook] = (), frozen: Sequence[str] = ()):
        model = case.model
        self.model, self.case, self.rec = model, case, {}
        n_layers = model.cfg.n_layers

        def leaf(x: torch.Tensor, hook: Any) -> torch.Tensor:
            x = x.detach().clone().requires_grad_(True)
            self.rec[hook.name] = x
            return x

        def keep(x: torch.Tensor, hook: Any) -> None:
            self.rec[hook.name] = x

        fixed = ["ln_final.hook_scale", "logit_softcap.hook_scale", *frozen]
        hooks: list[Hook] = [*edits, ("hook_embed", leaf)]
        hooks += [(n, lambda x, h: x.detach()) for n in fixed if n in model.hook_names()]
        suffixes = (*self.KEEP, "hook_attn_out", "hook_mlp_out", "hook_resid_pre", "attn.hook_v")
        suffixes += ("ln1_post.hook_scale", "ln2_post.hook_scale") if model.cfg.post_norms else ()
        hooks += [(f"blocks.{L}.{s}", keep) for L in range(n_layers) for s in suffixes]
        hooks.append((f"blocks.{n_layers - 1}.hook_resid_post", keep))
        with torch.enable_grad(), model.hooks(fwd=hooks):
            self.logits = model(torch.tensor([case.tokens]))[0]

    def d(self) -> torch.Tensor:
        lg = self.logits[-1]
        return lg[self.case.targets].mean() - lg[self.case.distractors].mean()

    def act(self, name: str) -> torch.Tensor:
        return self.rec[name][0]

    def grad(self, out: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        tensors = [self.rec[n] for n in names]
        grads = torch.autograd.grad(out, tensors, retain_graph=True, allow_unused=True)
        return {
            n: (torch.zeros_like(t) if g is None else g)[0]
            for n, t, g in zip(names, tensors, grads, strict=True)
        }

    def node_names(self) -> list[str]:
        layers = range(self.model.cfg.n_layers)
        return ["hook_embed"] + [
            f"blocks.{L}.{s}" for L in layers for s in ("mlp.hook_post", "attn.hook_pattern")
        ]

    def effect(self, grads: dict[str, torch.Tensor], node: NodeIndex) -> float:
        """activation × gradient for one node (the embedding: e·∂/∂e at its token)."""
        t, c = node.token, node.component
        if node.node_type == EMB:
            return float((self.act("hook_embed")[t] @ grads["hook_embed"][t]).detach())
        if node.node_type == MLP:
            name = f"blocks.{node.layer}.mlp.hook_post"
            return float((self.act(name)[t, c] * grads[name][t, c]).detach())
        name, k = f"blocks.{node.layer}.attn.hook_pattern", node.attended_token
        return float((self.act(name)[c, t, k] * grads[name][c, t, k]).detach())


def post_norm_scales(model: HookedTransformer) -> list[str]:
    return [n for n in model.hook_names() if "_post.hook_scale" in n]


def direct_effect_grads(case: Case, g: torch.Tensor, edits: Sequence[Hook] = ()) -> dict[str, Any]:
    """For every node, ∂(g·write of its block)/∂(its activation), post-norm scales held fixed:
    activation × this is the node's direct effect on anything whose gradient at the cut is g."""
    fw = PlainForward(case, edits, frozen=post_norm_scales(case.model))
    out: dict[str, torch.Tensor] = {"hook_embed": g}
    for L in range(case.model.cfg.n_layers):
        for write, name in (
            ("hook_mlp_out", "mlp.hook_post"),
            ("hook_attn_out", "attn.hook_pattern"),
        ):
            total = (fw.rec[f"blocks.{L}.{write}"][0] * g).sum()
            out |= fw.grad(total, [f"blocks.{L}.{name}"])
    return out | {"fw": fw}


def node_values(res: SubResult, metric: str) -> dict[NodeIndex, float]:
    values = dict(zip(res.nodes, res.metrics[metric], strict=True))
    assert values and all(v is not None for v in values.values())
    return values  # type: ignore[return-value]


def assert_close(got: dict[NodeIndex, float], want: Callable[[NodeIndex], float], what: str):  # type: ignore[no-untyped-def]
    """Each |got - want| <= 1e-4·|want| + 1e-5·max|want|."""
    pairs = [(node, value, want(node)) for node, value in got.items()]
    scale = max(abs(w) for _, _, w in pairs)
    assert scale > 0, what
    for node, value, w in pairs:
        assert abs(value - w) <= 1e-4 * abs(w) + 1e-5 * scale, (what, node, value, w)


# ---- the decomposition of D, and every node metric against autograd -----------------------------


def test_direct_effects_decompose_d_and_match_autograd(case: Case) -> None:
    model = case.model
    (res,) = run(case, request(case))
    fw = PlainForward(case)
    d = fw.d()
    d_value = float(d.detach())
    assert abs(res.direction_value - d_value) <= 1e-5 * abs(d_value)

    # Σ direct effects + biases + the final norm's bias through W_U = D, soft-cap included.
    const = 0.0
    if model.ln_final.bias is not None:
        through = model.ln_final.bias @ model.W_U
        if model.cfg.final_softcap:  # the frozen soft-cap scale divides every logit
            through = through / fw.act("logit_softcap.hook_scale")[-1].detach()
        const = float(through[case.targets].mean() - through[case.distractors].mean())
    node_sum = sum(sum(res.token_sums[k]["direct_effect"]) for k in TOKEN_SUM_KEYS)
    total = node_sum + res.bias_direct_effect + const
    assert abs(total - d_value) <= 1e-4 * abs(d_value), (total, d_value)

    # act × grad against autograd (final norm and soft-cap scales detached, nothing else).
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    grads = fw.grad(d, [*fw.node_names(), final])
    got = node_values(res, "estimated_total_effect")
    assert {n.node_type for n in got} == {EMB, MLP, HEAD}
    assert_close(got, lambda n: fw.effect(grads, n), "estimated_total_effect")

    # Direct effects: activation × ∂(g·block write)/∂activation, post-norm scales fixed.
    direct = direct_effect_grads(case, grads[final])
    assert_close(
        node_values(res, "direct_effect"), lambda n: direct["fw"].effect(direct, n), "direct"
    )
    # Write magnitudes: the norm of what the node adds to the residual stream, written out.
    assert_close(
        node_values(res, "write_magnitude"), lambda n: write_norm(fw, n), "write_magnitude"
    )


def write_norm(fw: PlainForward, node: NodeIndex) -> float:
    """‖the node's write into the residual stream‖: a·W_out[i] or A·(v[k] W_O[h]), times w / s of
    the block's post-norm where there is one (docs/engine.md §3.7)."""
    model, t, c, L = fw.model, node.token, node.component, node.layer
    if node.node_type == EMB:
        return float(fw.act("hook_embed")[t].norm().detach())
    block = model.blocks[L]
    if node.node_type == MLP:
        write = fw.act(f"blocks.{L}.mlp.hook_post")[t, c] * block.mlp.w_out.weight[:, c]
        post = "ln2_post"
    else:
        attn, k = block.attn, node.attended_token
        v = fw.rec[f"blocks.{L}.attn.hook_v"][0, k, c // (attn.n_heads // attn.n_kv_heads)]
        w_o = attn.o_proj.weight[:, c * attn.d_head : (c + 1) * attn.d_head]
        write = fw.act(f"blocks.{L}.attn.hook_pattern")[c, t, k] * (w_o @ v)
        post = "ln1_post"
    if model.cfg.post_norms:
        write = write * getattr(block, post).weight / fw.rec[f"blocks.{L}.{post}.hook_scale"][0, t]
    return float(write.norm().detach())


# ---- ablation --------------------------------------------------------------------------------------


def zero(name: str, index: Callable[[torch.Tensor], None]) -> Hook:
    def hook(x: torch.Tensor, _: Any) -> torch.Tensor:
        x = x.clone()
        index(x)
        return x

    return (name, hook)


def test_zero_ablation_matches_independent_forward(case: Case) -> None:
    n = N_TOKENS
    neuron = NodeIndex(MLP, 1, n - 1, 5)
    pair = NodeIndex(HEAD, 2, n - 1, 1, attended_token=n - 3)
    edits = {
        neuron: zero("blocks.1.mlp.hook_post", lambda x: x[0, n - 1, 5].zero_()),
        pair: zero("blocks.2.attn.hook_pattern", lambda x: x[0, 1, n - 1, n - 3].zero_()),
    }
    base, *ablated = run(
        case, request(case), *(request(case, node_ablations=[NodeAblation(a)]) for a in edits)
    )
    d0 = float(PlainForward(case).d().detach())
    for res, edit in zip(ablated, edits.values(), strict=True):
        want = float(PlainForward(case, [edit]).d().detach())
        assert abs(want - d0) > 1e-4  # the ablation moves D
        assert abs(res.direction_value - want) <= 1e-5 * abs(want) + 1e-6
        delta = res.direction_value - base.direction_value
        assert abs(delta - (want - d0)) <= 1e-4 * abs(want - d0) + 1e-6


# ---- tracing ---------------------------------------------------------------------------------------


def test_traced_neuron_and_query_gradients_match_autograd(case: Case) -> None:
    model, n = case.model, N_TOKENS
    parallel = model.cfg.parallel_blocks
    neuron = NodeIndex(MLP, 2, n - 2, 7)
    head = NodeIndex(HEAD, 2, n - 1, 2, attended_token=n - 4)
    (res_neuron,) = run(case, request(case, upstream_node_to_trace=NodeToTrace(neuron)))
    query = NodeToTrace(head, AttentionTraceType.QUERY)
    (res_query,) = run(case, request(case, upstream_node_to_trace=query))

    # The neuron's pre-activation, ln2's scale fixed; the cut before the MLP (before the block
    # when attention and MLP run in parallel).
    fw = PlainForward(case, frozen=["blocks.2.ln2.hook_scale"])
    d = fw.act("blocks.2.mlp.hook_pre")[neuron.token, neuron.component]
    assert (
        abs(res_neuron.direction_value - float(d.detach())) <= 1e-5 * abs(float(d.detach())) + 1e-6
    )
    cut_position = 2 * 2 + (0 if parallel else 1)
    assert all(node.write_position <= cut_position for node in res_neuron.nodes)
    grads = fw.grad(d, fw.node_names())
    assert_close(
        node_values(res_neuron, "estimated_total_effect"),
        lambda node: fw.effect(grads, node),
        "neuron trace total effect",
    )

    # The query-side score, ln1's scale fixed and the key side detached.
    frozen = ["blocks.2.ln1.hook_scale", "blocks.2.attn.hook_rot_k"]
    fw = PlainForward(case, frozen=frozen)
    d = fw.act("blocks.2.attn.hook_attn_scores")[head.component, head.token, head.attended_token]
    assert (
        abs(res_query.direction_value - float(d.detach())) <= 1e-5 * abs(float(d.detach())) + 1e-6
    )
    assert all(node.write_position <= 2 * 2 for node in res_query.nodes)
    grads = fw.grad(d, fw.node_names())
    assert_close(
        node_values(res_query, "estimated_total_effect"),
        lambda node: fw.effect(grads, node),
        "query trace total effect",
    )
