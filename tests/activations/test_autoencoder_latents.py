"""Autoencoder latents as node types (docs/engine.md §3-§6, §7 item 5) on the default model.

Four small autoencoders with seeded random weights are attached to SmolLM2-135M for this module and
detached afterwards (other tests share the session's model):

| hook point             | side      | activation | input normalization   |
|------------------------|-----------|------------|-----------------------|
| blocks.3.mlp.hook_post | MLP       | TopK(24)   | none (writes via W_out) |
| blocks.5.hook_mlp_out  | MLP       | ReLU       | none                  |
| blocks.6.hook_attn_out | attention | TopK(16)   | layer_norm            |
| blocks.8.hook_attn_out | attention | ReLU       | constant_norm_rescale |

The references never call the engine: a forward of the model with our own hooks that splice each
autoencoder in literally as decode(z) + (x - decode(z_clean)), with z = encode(x) made a leaf that
requires grad (entries set for ablations), the final norm scale detached, and the formulas of
docs/engine.md §3 and §6 written out here (the normalization scales included). The autoencoders' own
encode/decode are checked against the published formats' formulas in tests/models.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import pytest
import torch

from neuron_explainer.activations import (
    AttentionTraceType,
    Engine,
    FieldPath,
    NodeAblation,
    NodeIndex,
    NodeToTrace,
    NodeType,
    RequestError,
    SubRequest,
    SubResult,
)
from neuron_explainer.activations.processing import (
    BatchedSubRequest,
    DerivedScalarsQuery,
    generate,
    run_batched,
)
from neuron_explainer.models import HookedTransformer, KVCache, ModelConfig
from neuron_explainer.models.autoencoders import AutoencoderConfig, SparseAutoencoder
from neuron_explainer.models.generation import next_token_logits
from neuron_explainer.models.hooks import HookPoint

MLP_LATENT = NodeType.MLP_AUTOENCODER_LATENT
ATTN_LATENT = NodeType.ATTENTION_AUTOENCODER_LATENT
TEXT = "When Mary and John went to the store, John gave a drink to"
TARGETS, DISTRACTORS = [" Mary"], [" John"]
AUTOENCODERS = (
    # hook name, activation, k, normalization, n_latents
    ("blocks.3.mlp.hook_post", "topk", 24, "none", 768),
    ("blocks.5.hook_mlp_out", "relu", None, "none", 512),
    ("blocks.6.hook_attn_out", "topk", 16, "layer_norm", 384),
    ("blocks.8.hook_attn_out", "relu", None, "constant_norm_rescale", 256),
)
Hook = tuple[str, Callable[[torch.Tensor, HookPoint], torch.Tensor | None]]


def random_autoencoder(
    model: HookedTransformer,
    hook: str,
    activation: str,
    k: int | None,
    normalize: str,
    n_latents: int,
    seed: int,
) -> SparseAutoencoder:
    """Seeded random weights: unit-norm encoder rows, decoder rows of norm 2 (so one latent's
    ablation moves D visibly), small biases."""
    width = model.cfg.d_mlp if hook.endswith("hook_post") else model.cfg.d_model
    cfg = AutoencoderConfig(hook, width, n_latents, activation, k, normalize)  # type: ignore[arg-type]
    ae = SparseAutoencoder(cfg)
    g = torch.Generator().manual_seed(seed)
    w_enc = torch.randn(n_latents, width, generator=g)
    w_dec = torch.randn(n_latents, width, generator=g)
    ae.W_enc.data = w_enc / w_enc.norm(dim=-1, keepdim=True)
    ae.W_dec.data = 2 * w_dec / w_dec.norm(dim=-1, keepdim=True)
    ae.b_enc.data = -0.05 * torch.rand(n_latents, generator=g)
    ae.b_pre.data = 0.01 * torch.randn(width, generator=g)
    return ae


@pytest.fixture(scope="module")
def model(default_model: HookedTransformer) -> Iterator[HookedTransformer]:
    for seed, (hook, act, k, norm, n) in enumerate(AUTOENCODERS):
        default_model.attach_autoencoder(
            random_autoencoder(default_model, hook, act, k, norm, n, seed)
        )
    yield default_model
    for hook, *_ in AUTOENCODERS:
        default_model.detach_autoencoder(hook)


@pytest.fixture(scope="module")
def tokens(model: HookedTransformer) -> list[int]:
    assert model.tokenizer is not None
    return model.tokenizer.encode(TEXT)


def ids(model: HookedTransformer, words: Sequence[str]) -> list[int]:
    assert model.tokenizer is not None
    return [model.tokenizer.single_token_id(w) for w in words]


def latent_request(**kw: object) -> SubRequest:
    base: dict[str, object] = dict(
        prompt=TEXT,
        target_tokens=TARGETS,
        distractor_tokens=DISTRACTORS,
        component_type_for_mlp="autoencoder_latent",
        component_type_for_attention="autoencoder_latent",
        token_views=False,
        top_and_bottom_k=12,
    )
    return SubRequest(**(base | kw))  # type: ignore[arg-type]


# ---- the independent reference ---------------------------------------------------------------------


def autoencoder_of(model: HookedTransformer, node: NodeIndex) -> SparseAutoencoder:
    side = "mlp" if node.node_type == MLP_LATENT else "attention"
    ae = model.autoencoder(side, node.layer)
    assert ae is not None
    return ae


def decoder_scale(ae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """[..., 1] the factor decoding multiplies W_dec rows by (the module doc of autoencoders.py):
    the unbiased std over features for a layer norm, ‖x‖/sqrt(d_in) for the constant-norm
    rescaling, 1 otherwise."""
    if ae.cfg.normalize == "layer_norm":
        centered = x - x.mean(-1, keepdim=True)
        return (centered.pow(2).sum(-1, keepdim=True) / (x.shape[-1] - 1)).sqrt()
    if ae.cfg.normalize == "constant_norm_rescale":
        return x.norm(dim=-1, keepdim=True) / math.sqrt(x.shape[-1])
    return torch.ones_like(x[..., :1])


def pre_activation_fixed_scale(ae: SparseAutoencoder, x: torch.Tensor, j: int) -> torch.Tensor:
    """Latent j's encoder pre-activation of x [d_in] with the normalization's scale held fixed:
    W_enc[j]·(x_n - b_pre) + b_enc[j], x_n = (x - mean)/(std + eps) | x/scale | x."""
    scale = decoder_scale(ae, x).detach()
    if ae.cfg.normalize == "layer_norm":
        x = (x - x.mean()) / (scale + ae.cfg.norm_eps)
    elif ae.cfg.normalize == "constant_norm_rescale":
        x = x / scale
    return ae.W_enc[j] @ (x - ae.b_pre) + ae.b_enc[j]


def write_direction(model: HookedTransformer, ae: SparseAutoencoder, j: int) -> torch.Tensor:
    """[d] latent j's write per unit of z_j·s in the residual basis (docs/terminology.md)."""
    if ae.hook_name.endswith("mlp.hook_post"):
        assert ae.cfg.layer is not None
        return model.blocks[ae.cfg.layer].mlp.w_out.weight @ ae.W_dec[j]  # [d, m] @ [m]
    return ae.W_dec[j]


def latent_name(ae: SparseAutoencoder) -> str:
    return f"{ae.hook_name}.latents"


class Reference:
    """One prompt through the model with our own hooks only: every attached autoencoder spliced in
    as decode(z) + (x - decode(z_clean)) with z a leaf (`ablations`: (hook name, token, latent,
    value) entries of z to set), the token embedding a leaf, the final norm scale and the norm
    scales in `fixed` detached, and the hook values in `keep` recorded with their graph."""

    def __init__(
        self,
        model: HookedTransformer,
        tokens: list[int],
        ablations: Sequence[tuple[str, int, int, float]] = (),
        fixed: Sequence[str] = (),
        keep: Sequence[str] = (),
        literal: bool = False,
    ) -> None:
        self.model = model
        self.rec: dict[str, torch.Tensor] = {}

        def splice(ae: SparseAutoencoder) -> Callable[[torch.Tensor, HookPoint], torch.Tensor]:
            def hook(x: torch.Tensor, _: HookPoint) -> torch.Tensor:
                self.rec[ae.hook_name] = x
                clean = ae.encode(x).detach()
                z = clean.clone()
                for name, t, j, value in ablations:
                    if name == ae.hook_name:
                        z[0, t, j] = value
                z.requires_grad_(True)
                self.rec[latent_name(ae)] = z
                if literal:
                    return ae.decode(z, x) + (x - ae.decode(clean, x))
                # The same sum, with the difference of the decodings taken in float64 so that
                # the rounding of the (large) decodings stays out of it.
                ae64 = copy.deepcopy(ae).double()
                diff = ae64.decode(z.double(), x.double()) - ae64.decode(clean.double(), x.double())
                return x + diff.to(x.dtype)

            return hook

        def leaf(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            self.rec[hook.name] = x.detach().clone().requires_grad_(True)
            return self.rec[hook.name]

        def record(x: torch.Tensor, hook: HookPoint) -> None:
            self.rec[hook.name] = x

        def detach(x: torch.Tensor, _: HookPoint) -> torch.Tensor:
            return x.detach()

        hooks: list[Hook] = [("hook_embed", leaf), ("ln_final.hook_scale", detach)]
        hooks += [(name, detach) for name in fixed]
        # Unless `keep` names patterns, the model takes the fused attention kernel, as the engine
        # does (it recomputes patterns from queries and keys; the explicit softmax path, which a
        # hook on a pattern selects, rounds differently).
        hooks += [(name, record) for name in dict.fromkeys(keep) if name not in model.autoencoders]
        hooks += [(ae.hook_name, splice(ae)) for ae in model.autoencoders.values()]
        with torch.enable_grad(), model.hooks(fwd=hooks):
            self.logits = model(torch.tensor([tokens]))[0]  # [n, V]

    def act(self, name: str) -> torch.Tensor:
        return self.rec[name][0]

    def latents(self, ae: SparseAutoencoder) -> torch.Tensor:
        return self.act(latent_name(ae))

    def grads(self, d: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        tensors = [self.rec[n] for n in names]
        out = torch.autograd.grad(d, tensors, retain_graph=True, allow_unused=True)
        return {
            n: (torch.zeros_like(t) if g is None else g)[0]
            for n, t, g in zip(names, tensors, out, strict=True)
        }

    def logit_diff(self, targets: list[int], distractors: list[int]) -> torch.Tensor:
        last = self.logits[-1]
        return last[targets].mean() - last[distractors].mean()


def all_latent_names(model: HookedTransformer) -> list[str]:
    return [latent_name(ae) for ae in model.autoencoders.values()]


def layer_names(model: HookedTransformer, suffix: str) -> list[str]:
    return [f"blocks.{layer}.{suffix}" for layer in range(model.cfg.n_layers)]


class Tolerance:
    """|got - want| <= rtol·|want| + atol over many values; `ratio` is the worst fraction of it."""

    def __init__(self, rtol: float, atol: float) -> None:
        self.rtol, self.atol, self.ratio, self.count = rtol, atol, 0.0, 0

    def add(self, got: float, want: float) -> None:
        self.ratio = max(self.ratio, abs(got - want) / (self.rtol * abs(want) + self.atol))
        self.count += 1


def compare(
    res: SubResult,
    metric: str,
    want: Callable[[NodeIndex], float],
    which: Callable[[NodeIndex], bool],
) -> Tolerance:
    """Every node of the table selected by `which`: |got - want| <= 1e-5·|want| + 1e-6·max|want|."""
    pairs = [
        (got, want(node))
        for node, got in zip(res.nodes, res.metrics[metric], strict=True)
        if which(node)
    ]
    assert pairs and all(got is not None for got, _ in pairs)
    tol = Tolerance(1e-5, 1e-6 * max(abs(w) for _, w in pairs) + 1e-9)
    for got, w in pairs:
        tol.add(got, w)  # type: ignore[arg-type]
    return tol


def rel_err(got: float, want: float, floor: float = 0.0) -> float:
    return abs(got - want) / max(abs(want), floor, 1e-12)


def is_latent(node: NodeIndex) -> bool:
    return node.node_type.is_latent


# ---- item 5: the splice leaves outputs unchanged; online latents are encode() ----------------------


def test_splice_leaves_logits_unchanged(model: HookedTransformer, tokens: list[int]) -> None:
    plain = model(torch.tensor([tokens]))[0, -1]
    spliced = Reference(model, tokens, literal=True).logits[-1].detach()
    # The literal splice by our own hooks: the same function, up to float32 rounding of decode's
    # large terms (logits of ~15 move by ~2e-5).
    assert (spliced - plain).abs().max() <= 1e-5 * plain.abs().max()

    engine = Engine(model)
    neurons, latents = engine.run(
        [
            latent_request(
                component_type_for_mlp="neuron", component_type_for_attention="attention_head"
            ),
            latent_request(),
        ],
        groups=[0, 1],  # separate node tables
    )
    # The engine's splice adds exact zeros: the same logits as the unspliced row of the batch,
    # and the plain model's up to the rounding of a different (last-position) unembedding.
    scored = [latents.top_logits, latents.bottom_logits, latents.target_logits]
    ids = [s.token for part in scored for s in part]
    got = torch.tensor([s.score for part in scored for s in part])
    unspliced = [neurons.top_logits, neurons.bottom_logits, neurons.target_logits]
    assert torch.equal(got, torch.tensor([s.score for part in unspliced for s in part]))
    assert (got - plain[ids]).abs().max() <= 1e-5 * plain.abs().max()
    assert ids[:10] == plain.topk(10).indices.tolist()
    assert abs(latents.direction_value - neurons.direction_value) <= 1e-6
    assert any(n.node_type.is_latent for n in latents.nodes)
    assert not any(n.node_type.is_latent for n in neurons.nodes)

    # A batch of a neuron and a latent request gives each what it gets alone (§7 item 6).
    [alone] = engine.run([latent_request()])
    assert alone.nodes == latents.nodes
    for metric, values in alone.metrics.items():
        for a, b in zip(values, latents.metrics[metric], strict=True):
            assert a is not None and b is not None and abs(a - b) <= 1e-5 * max(1.0, abs(a))


def test_online_latents_equal_encode(model: HookedTransformer, tokens: list[int]) -> None:
    _, cache = model.run_with_cache(torch.tensor([tokens]), names=list(model.autoencoders))
    queries = {}
    for ae in model.autoencoders.values():
        node_type = MLP_LATENT if ae.cfg.side == "mlp" else ATTN_LATENT
        assert ae.cfg.layer is not None
        queries[ae.hook_name] = DerivedScalarsQuery(node_type, "activation", ae.cfg.layer)
    request = SubRequest(TEXT, loss_fn="zero", token_views=False)
    [(_, answers)] = run_batched(Engine(model), [BatchedSubRequest(request, queries)])
    for ae in model.autoencoders.values():
        want = ae.encode(cache[ae.hook_name][0])  # [n, N]
        got = torch.tensor(answers[ae.hook_name].values)  # type: ignore[arg-type]
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        active = (want > 0).sum(-1)
        if ae.cfg.activation == "topk":
            assert (active <= ae.cfg.k).all()
        assert active.float().mean() >= 1  # the latents really fire on this prompt


# ---- §3: node-table metrics ------------------------------------------------------------------------


def test_latent_metrics_match_references(model: HookedTransformer, tokens: list[int]) -> None:
    [res] = Engine(model).run([latent_request(top_and_bottom_k=20)])
    latents_in_table = [n for n in res.nodes if is_latent(n)]
    assert {n.layer for n in latents_in_table if n.node_type == MLP_LATENT} == {3, 5}
    assert {n.layer for n in latents_in_table if n.node_type == ATTN_LATENT} == {6, 8}

    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    posts, patterns = layer_names(model, "mlp.hook_post"), layer_names(model, "attn.hook_pattern")
    # Without hooks on the patterns, the reference runs the fused attention kernel, as the engine
    # does (it recomputes patterns from queries and keys): the same rounding of the gradients.
    ref = Reference(model, tokens, keep=[final, *posts])
    d = ref.logit_diff(ids(model, TARGETS), ids(model, DISTRACTORS))
    assert rel_err(res.direction_value, float(d.detach())) <= 1e-5
    grads = ref.grads(d, [final, "hook_embed", *all_latent_names(model), *posts])
    g = grads[final]  # ∂D/∂(final residual) with the final norm scale fixed

    def parts(node: NodeIndex) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, the write vector z·s·w_j, ∂D/∂z) of a latent node, from the reference."""
        ae = autoencoder_of(model, node)
        t, j = node.token, node.component
        z = ref.latents(ae)[t, j].detach()
        s = decoder_scale(ae, ref.act(ae.hook_name)[t].detach())[0]
        return z, z * s * write_direction(model, ae, j), grads[latent_name(ae)][t, j]

    checks: dict[str, Callable[[NodeIndex], float]] = {
        "activation": lambda n: float(parts(n)[0]),
        "write_magnitude": lambda n: float(parts(n)[1].norm()),
        "direct_effect": lambda n: float(parts(n)[1] @ g[n.token]),
        "estimated_total_effect": lambda n: float(parts(n)[0] * parts(n)[2]),
    }
    for metric, want in checks.items():
        tol = compare(res, metric, want, is_latent)
        assert tol.ratio <= 1.0, (metric, tol.ratio)

    # The splice leaves every other node's gradient as it is: total effects of the embeddings, of
    # neurons in layers without an MLP-side autoencoder and of heads in layers without an
    # attention-side one are a·∂D/∂a of the unspliced model.
    # A reference that records the patterns (the explicit softmax) for the heads' a·∂D/∂a.
    ref = Reference(model, tokens, keep=[*posts, *patterns])
    grads = ref.grads(
        ref.logit_diff(ids(model, TARGETS), ids(model, DISTRACTORS)),
        ["hook_embed", *posts, *patterns],
    )

    def other_total_effect(node: NodeIndex) -> float:
        t, c = node.token, node.component
        if node.node_type == NodeType.EMBEDDING:
            return float(ref.act("hook_embed")[t].detach() @ grads["hook_embed"][t])
        if node.node_type == NodeType.MLP_NEURON:
            name = f"blocks.{node.layer}.mlp.hook_post"
            return float(ref.act(name)[t, c].detach() * grads[name][t, c])
        name, k = f"blocks.{node.layer}.attn.hook_pattern", node.attended_token
        return float(ref.act(name)[c, t, k].detach() * grads[name][c, t, k])

    tol = compare(res, "estimated_total_effect", other_total_effect, lambda n: not is_latent(n))
    assert tol.ratio <= 1.0


def test_latents_replace_neurons_and_heads_only_where_loaded(
    model: HookedTransformer, tokens: list[int]
) -> None:
    """Layers with an autoencoder of a side show its latents instead of their neurons (heads); the
    others keep them. The direct effects still add up: per layer, the latents' direct effects plus
    the part no latent writes (reconstruction error and decoder bias) are the layer's."""
    engine = Engine(model)
    neurons, latents = engine.run(
        [
            latent_request(
                component_type_for_mlp="neuron",
                component_type_for_attention="attention_head",
                top_and_bottom_k=50,
            ),
            latent_request(top_and_bottom_k=50),
        ],
        groups=[0, 1],
    )
    mlp_layers, attn_layers = {3, 5}, {6, 8}
    by_type: dict[NodeType, set[int]] = {}
    for n in latents.nodes:
        by_type.setdefault(n.node_type, set()).add(n.layer)
    assert by_type[MLP_LATENT] == mlp_layers and by_type[ATTN_LATENT] == attn_layers
    assert not by_type[NodeType.MLP_NEURON] & mlp_layers and by_type[NodeType.MLP_NEURON]
    assert not by_type[NodeType.ATTENTION_HEAD] & attn_layers and by_type[NodeType.ATTENTION_HEAD]
    assert {n.layer for n in neurons.nodes if n.node_type == NodeType.MLP_NEURON} & mlp_layers

    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    written = [f"blocks.{L}.hook_mlp_out" for L in mlp_layers]
    written += [f"blocks.{L}.hook_attn_out" for L in attn_layers]
    ref = Reference(model, tokens, keep=[final, *written])
    d = ref.logit_diff(ids(model, TARGETS), ids(model, DISTRACTORS))
    g = ref.grads(d, [final])[final]
    ref.rec = {name: value.detach() for name, value in ref.rec.items()}

    def total(res: SubResult, key: str) -> float:
        return sum(res.token_sums[key]["direct_effect"])

    # What the replaced neurons / heads wrote, from the neuron table minus the latent table.
    layer_writes = {L: float((ref.act(f"blocks.{L}.hook_mlp_out") * g).sum()) for L in mlp_layers}
    layer_writes |= {
        L: float((ref.act(f"blocks.{L}.hook_attn_out") * g).sum()) for L in attn_layers
    }
    replaced_neurons = total(neurons, "mlp_neuron") - total(latents, "mlp_neuron")
    replaced_heads = total(neurons, "attention_head_attended_from") - total(
        latents, "attention_head_attended_from"
    )
    scale = abs(float(d.detach()))
    assert abs(replaced_neurons - sum(layer_writes[L] for L in mlp_layers)) <= 1e-4 * scale
    assert abs(replaced_heads - sum(layer_writes[L] for L in attn_layers)) <= 1e-4 * scale

    # Latents' direct effects + what no latent writes = the layers' direct effects.
    remainder = 0.0
    for ae in model.autoencoders.values():
        x = ref.act(ae.hook_name).detach()
        z = ref.latents(ae).detach()
        recon = (z * decoder_scale(ae, x)) @ ae.W_dec  # Σ_j z_j s W_dec[j], in the hook's basis
        rest = x - recon
        if ae.hook_name.endswith("mlp.hook_post"):
            assert ae.cfg.layer is not None
            rest = rest @ model.blocks[ae.cfg.layer].mlp.w_out.weight.T
        remainder += float((rest * g).sum())
    latent_sum = total(latents, "mlp_autoencoder_latent") + total(
        latents, "attention_autoencoder_latent"
    )
    assert abs(latent_sum + remainder - sum(layer_writes.values())) <= 1e-4 * scale


# ---- §4: ablation ------------------------------------------------------------------------------


def test_latent_ablation_matches_plain_forward(model: HookedTransformer, tokens: list[int]) -> None:
    engine = Engine(model)
    [table] = engine.run([latent_request(top_and_bottom_k=20)])
    # Per autoencoder, the latent with the largest |direct effect| in the table.
    chosen: dict[tuple[NodeType, int], tuple[NodeIndex, float]] = {}
    for node, de in zip(table.nodes, table.metrics["direct_effect"], strict=True):
        if is_latent(node) and de is not None:
            key = (node.node_type, node.layer)
            if key not in chosen or abs(de) > abs(chosen[key][1]):
                chosen[key] = (node, de)
    nodes = [n for n, _ in chosen.values()]
    assert len(nodes) == 4
    ablation_sets = [[NodeAblation(n)] for n in nodes]
    ablation_sets.append([NodeAblation(n) for n in nodes])
    ablation_sets.append([NodeAblation(nodes[-1], 30.0)])  # set to a value, not removed
    results = engine.run(
        [latent_request()] + [latent_request(node_ablations=abls) for abls in ablation_sets]
    )
    targets, distractors = ids(model, TARGETS), ids(model, DISTRACTORS)

    def d_ref(abls: list[NodeAblation]) -> float:
        entries = [
            (autoencoder_of(model, a.node).hook_name, a.node.token, a.node.component, a.value)
            for a in abls
        ]
        return float(Reference(model, tokens, entries).logit_diff(targets, distractors).detach())

    base = d_ref([])
    assert rel_err(results[0].direction_value, base) <= 1e-5
    for abls, res in zip(ablation_sets, results[1:], strict=True):
        want = d_ref(abls)
        assert abs(want - base) > 1e-3, f"ablating {abls} should move D"
        assert rel_err(res.direction_value, want) <= 1e-5
        delta = res.direction_value - results[0].direction_value
        # A difference of two float32 values of D, each good to 1e-5 of D (checked above): the
        # same absolute tolerance, 1e-5·|D|, for the change.
        assert rel_err(delta, want - base, floor=1e-1 * abs(base)) <= 1e-4
        # The ablated latent's activation reads the value set, where the table selected it.
        set_to = {a.node: a.value for a in abls}
        for node, value in zip(res.nodes, res.metrics["activation"], strict=True):
            if node in set_to:
                assert value == set_to[node]


def test_generation_holds_latent_ablations(model: HookedTransformer, tokens: list[int]) -> None:
    [table] = Engine(model).run([latent_request(top_and_bottom_k=5)])
    node = next(n for n in table.nodes if n.node_type == ATTN_LATENT and n.token == len(tokens) - 1)
    ae = autoencoder_of(model, node)
    value = 50.0  # large, so the continuation can change
    new = generate(
        Engine(model), TEXT, max_new_tokens=1, node_ablations=[NodeAblation(node, value)]
    )
    ref = Reference(model, tokens, [(ae.hook_name, node.token, node.component, value)])
    assert new == [int(ref.logits[-1].argmax())]


@pytest.mark.parametrize(
    "ablations",
    [
        [NodeAblation(NodeIndex(MLP_LATENT, 5, 4, 3), 30.0)],
        [
            NodeAblation(NodeIndex(ATTN_LATENT, 6, 9, 7), 30.0),
            NodeAblation(NodeIndex(MLP_LATENT, 3, 11, 2)),
        ],
    ],
    ids=["mlp", "attention+mlp"],
)
def test_cached_generation_under_latent_ablations_equals_rerunning_the_prefix(
    model: HookedTransformer, tokens: list[int], ablations: list[NodeAblation]
) -> None:
    """With the cache the splices run in the prefill only; rerunning the prefix keeps them on at
    every step, where they are exactly the identity at the new positions. Same tokens, and every
    step's logits those of a full forward of the prefix with the splices on."""
    engine = Engine(model)
    cached = generate(engine, TEXT, 5, node_ablations=ablations)
    assert cached == generate(engine, TEXT, 5, node_ablations=ablations, use_cache=False)
    hooks = engine.ablation_hooks([ablations])
    seq, cache = torch.tensor(tokens), KVCache()
    moved = 0.0
    with torch.no_grad():
        for _ in range(4):
            logits = next_token_logits(model, seq, cache, prefill_hooks=hooks)
            with model.hooks(fwd=hooks):
                full = model(seq[None])[0, -1]
            assert (logits - full).abs().max() < 1e-4
            if len(seq) > len(tokens):
                moved = max(moved, float((logits - model(seq[None])[0, -1]).abs().max()))
            seq = torch.cat([seq, logits.argmax()[None]])
    assert moved > 1e-2  # the ablations reach the new positions, through the cache


# ---- §5: tracing upstream from a latent --------------------------------------------------------


@pytest.mark.parametrize("hook", ["blocks.5.hook_mlp_out", "blocks.6.hook_attn_out"])
def test_trace_from_latent_matches_manual_backward(
    model: HookedTransformer, tokens: list[int], hook: str
) -> None:
    ae = model.autoencoders[hook]
    node_type = MLP_LATENT if ae.cfg.side == "mlp" else ATTN_LATENT
    assert ae.cfg.layer is not None
    L, t = ae.cfg.layer, len(tokens) - 2
    _, cache = model.run_with_cache(torch.tensor([tokens]), names=[hook])
    j = int(ae.encode(cache[hook][0, t]).argmax())  # an active latent
    node = NodeIndex(node_type, L, t, j)
    [res] = Engine(model).run(
        [latent_request(upstream_node_to_trace=NodeToTrace(node), top_and_bottom_k=15)]
    )

    # The pre-activation recomputed from the residual stream before layer L with that layer's
    # norm scale (and the autoencoder's input-normalization scale) held fixed.
    ln = "ln2" if ae.cfg.side == "mlp" else "ln1"
    posts, patterns = layer_names(model, "mlp.hook_post"), layer_names(model, "attn.hook_pattern")
    cut = f"blocks.{L}.hook_resid_{'mid' if ae.cfg.side == 'mlp' else 'pre'}"
    ref = Reference(
        model, tokens, fixed=[f"blocks.{L}.{ln}.hook_scale"], keep=[cut, *posts, *patterns]
    )
    pre = pre_activation_fixed_scale(ae, ref.act(hook)[t], j)
    assert rel_err(res.direction_value, float(pre.detach())) <= 1e-5
    assert res.trace_description and "latent" in res.trace_description
    grads = ref.grads(pre, [cut, "hook_embed", *posts, *patterns, *all_latent_names(model)])

    cut_position = 2 * L + 1 if ae.cfg.side == "mlp" else 2 * L  # resid_mid / resid_pre of L
    assert all(n.write_position <= cut_position for n in res.nodes)  # upstream only
    assert any(is_latent(n) for n in res.nodes)

    def total_effect(n: NodeIndex) -> float:
        tt, c = n.token, n.component
        if n.node_type == NodeType.EMBEDDING:
            return float(ref.act("hook_embed")[tt].detach() @ grads["hook_embed"][tt])
        if n.node_type == NodeType.MLP_NEURON:
            name = f"blocks.{n.layer}.mlp.hook_post"
            return float(ref.act(name)[tt, c].detach() * grads[name][tt, c])
        if n.node_type == NodeType.ATTENTION_HEAD:
            name, k = f"blocks.{n.layer}.attn.hook_pattern", n.attended_token
            return float(ref.act(name)[c, tt, k].detach() * grads[name][c, tt, k])
        other = autoencoder_of(model, n)
        return float(ref.latents(other)[tt, c].detach() * grads[latent_name(other)][tt, c])

    tol = compare(res, "estimated_total_effect", total_effect, lambda n: True)
    assert tol.ratio <= 1.0

    # Direct effects of upstream latents: their write · the gradient at the cut.
    def direct_effect(n: NodeIndex) -> float:
        other = autoencoder_of(model, n)
        z = ref.latents(other)[n.token, n.component].detach()
        s = decoder_scale(other, ref.act(other.hook_name)[n.token].detach())[0]
        return float(z * s * write_direction(model, other, n.component) @ grads[cut][n.token])

    tol = compare(res, "direct_effect", direct_effect, is_latent)
    assert tol.ratio <= 1.0


def test_value_trace_toward_a_downstream_latent(
    model: HookedTransformer, tokens: list[int]
) -> None:
    """A head pair traced through its value, as it affects a latent's pre-activation: D is the
    pair's write A·(v W_O[h]) dotted with the gradient of that pre-activation at the residual
    stream in front of the latent (its block's ln2 and input-normalization scales fixed)."""
    hook = "blocks.5.hook_mlp_out"
    ae = model.autoencoders[hook]
    t = len(tokens) - 2
    _, cache = model.run_with_cache(torch.tensor([tokens]), names=[hook])
    j = int(ae.encode(cache[hook][0, t]).argmax())  # an active latent
    head = NodeIndex(NodeType.ATTENTION_HEAD, 2, t, 1, t - 1)
    [res] = Engine(model).run(
        [
            latent_request(
                target_tokens=[],
                distractor_tokens=[],
                upstream_node_to_trace=NodeToTrace(head, AttentionTraceType.VALUE),
                downstream_node_to_trace=NodeToTrace(NodeIndex(MLP_LATENT, 5, t, j)),
            )
        ]
    )
    cut, v_name = "blocks.5.hook_resid_mid", "blocks.2.attn.hook_v"
    pattern = "blocks.2.attn.hook_pattern"  # the traced head's layer: explicit, as in the engine
    ref = Reference(model, tokens, fixed=["blocks.5.ln2.hook_scale"], keep=[cut, v_name, pattern])
    pre = pre_activation_fixed_scale(ae, ref.act(hook)[t], j)
    g = ref.grads(pre, [cut])[cut][t]
    attn = model.blocks[2].attn
    v = ref.act(v_name)[t - 1, 1 // (attn.n_heads // attn.n_kv_heads)].detach()
    a = ref.act(pattern)[1, t, t - 1].detach()
    want = float(a * (v @ attn.W_O[1]) @ g)
    assert abs(want) > 1e-6  # a non-vacuous trace
    assert rel_err(res.direction_value, want) <= 1e-4
    assert res.nodes and all(n.write_position <= 2 * 2 for n in res.nodes)  # upstream of layer 2


def test_merged_groups_get_only_their_own_sums_and_metrics(
    model: HookedTransformer, tokens: list[int]
) -> None:
    """In a merged batch each group gets exactly its solo result: a request without latents does
    not get the latent token sums another group asked for, nor metrics it did not ask for."""
    engine = Engine(model)
    latents = latent_request(top_and_bottom_k=5)
    plain = SubRequest(TEXT, TARGETS, DISTRACTORS, top_and_bottom_k=5, token_views=False)
    plain = replace(plain, metrics=("direct_effect", "activation"))
    merged = engine.run([latents, plain], groups=[0, 1])
    for got, request in zip(merged, [latents, plain], strict=True):
        [alone] = engine.run([request])
        assert got.token_sums.keys() == alone.token_sums.keys()
        assert got.metrics.keys() == alone.metrics.keys()
        assert got.nodes == alone.nodes
    assert not any("latent" in key for key in merged[1].token_sums)


def test_a_downstream_node_is_traced_through_its_pre_activation(
    model: HookedTransformer, tokens: list[int]
) -> None:
    head = NodeIndex(NodeType.ATTENTION_HEAD, 2, 4, 1, 3)
    later = NodeIndex(NodeType.ATTENTION_HEAD, 7, 4, 0, 2)
    request = latent_request(
        upstream_node_to_trace=NodeToTrace(head, AttentionTraceType.VALUE),
        downstream_node_to_trace=NodeToTrace(later, AttentionTraceType.VALUE),
    )
    assert field_of(Engine(model), request) == (
        0,
        "downstream_node_to_trace",
        "attention_trace_type",
    )


# ---- §6: token-space views ---------------------------------------------------------------------


def ranked(scores: torch.Tensor, k: int) -> tuple[list[int], list[int]]:
    return scores.topk(k).indices.tolist(), scores.topk(k, largest=False).indices.tolist()


def test_latent_token_views(model: HookedTransformer, tokens: list[int]) -> None:
    k = 8
    [res] = Engine(model).run(
        [latent_request(token_views=True, token_view_k=k, top_and_bottom_k=6)]
    )
    suffixes = ("hook_resid_mid", "hook_resid_pre", "ln1.hook_scale", "ln2.hook_scale")
    suffixes += ("attn.hook_pattern", "attn.hook_v")
    ref = Reference(model, tokens, keep=[f"blocks.{L}.{s}" for L in (3, 5, 6, 8) for s in suffixes])
    W_E, W_U, gain = model.W_E, model.W_U, model.ln_final.weight
    checked = {MLP_LATENT: 0, ATTN_LATENT: 0}
    for node in (nd for nd in res.nodes if is_latent(nd)):
        views = res.token_views[node]
        ae = autoencoder_of(model, node)
        t, j, L = node.token, node.component, node.layer
        x = ref.act(ae.hook_name)[t].detach()
        z = ref.latents(ae)[t, j].detach()
        s = decoder_scale(ae, x)[0]

        # Upvoted output tokens: the write through the final norm's gain and W_U, minus the mean.
        logits = (z * s * write_direction(model, ae, j) * gain) @ W_U
        logits = logits - logits.mean()
        up, down = ranked(logits, k)
        assert [v.token for v in views.upvoted_output_tokens] == up
        assert [v.token for v in views.downvoted_output_tokens] == down
        for v in views.upvoted_output_tokens:
            assert abs(v.score - float(logits[v.token])) <= 1e-4 * float(logits.abs().max())

        # Input tokens: ∂(pre-activation)/∂(input residual), scales fixed, dotted with W_E.
        block = model.blocks[L]
        with torch.enable_grad():
            r = torch.zeros(model.cfg.d_model, requires_grad=True)
            if ae.cfg.side == "mlp":
                resid = ref.act(f"blocks.{L}.hook_resid_mid")[t].detach() + r
                u = resid / ref.act(f"blocks.{L}.ln2.hook_scale")[t].detach() * block.ln2.weight
                post = block.mlp.neuron_activations(u)
                hooked = post if ae.hook_name.endswith("hook_post") else block.mlp.w_out(post)
            else:
                # Through the values only: r added at every attended token, pattern fixed.
                attn = block.attn
                resid = ref.act(f"blocks.{L}.hook_resid_pre")[: t + 1].detach() + r
                s1 = ref.act(f"blocks.{L}.ln1.hook_scale")[: t + 1].detach()
                v = attn.v_proj(resid / s1 * block.ln1.weight).view(t + 1, attn.n_kv_heads, -1)
                v = v.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)  # [k, H, dh]
                probs = ref.act(f"blocks.{L}.attn.hook_pattern")[:, t, : t + 1].detach()  # [H, k]
                z_heads = torch.einsum("hk,khe->he", probs, v)
                hooked = attn.o_proj(z_heads.reshape(-1))
            (grad,) = torch.autograd.grad(pre_activation_fixed_scale(ae, hooked, j), r)
        scores = W_E @ grad
        up, down = ranked(scores, k)
        assert [v.token for v in views.upvoting_input_tokens] == up
        assert [v.token for v in views.downvoting_input_tokens] == down
        for v in views.upvoting_input_tokens:
            assert abs(v.score - float(scores[v.token])) <= 1e-4 * float(scores.abs().max())

        # Token-pair attribution (attention side): (e_j · attn_out[t, k])·1[z > 0] per key token.
        if node.node_type == ATTN_LATENT:
            with torch.enable_grad():
                xa = x.clone().requires_grad_(True)
                (e,) = torch.autograd.grad(pre_activation_fixed_scale(ae, xa, j), xa)
            attn = block.attn
            v = ref.act(f"blocks.{L}.attn.hook_v").detach()
            v = v.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)  # [n, H, dh]
            probs = ref.act(f"blocks.{L}.attn.hook_pattern")[:, t].detach()  # [H, n]
            per_key = torch.einsum("hk,khe,hed,d->k", probs, v, attn.W_O, e)[: t + 1]
            if z > 0:
                # Over every key, the attributions add up to e·attn_out[t] (no output bias here).
                assert abs(float(per_key.sum()) - float(e @ x)) <= 1e-4 * float(per_key.abs().sum())
                want = per_key.topk(min(k, t + 1))
                got = views.token_pair_attributions
                assert [a.key_token_index for a in got] == want.indices.tolist()
                assert [a.token for a in got] == [tokens[i] for i in want.indices.tolist()]
                for a, w in zip(got, want.values.tolist(), strict=True):
                    assert abs(a.score - w) <= 1e-4 * float(per_key.abs().max())
            else:
                assert views.token_pair_attributions == []
        else:
            assert views.token_pair_attributions == []
        checked[node.node_type] += 1
    assert checked[MLP_LATENT] and checked[ATTN_LATENT]


# ---- errors ------------------------------------------------------------------------------------


def field_of(engine: Engine, request: SubRequest) -> FieldPath:
    with pytest.raises(RequestError) as info:
        engine.run([request])
    return info.value.path


def test_request_errors_name_the_field(model: HookedTransformer, tokens: list[int]) -> None:
    engine = Engine(model)
    no_ae = NodeIndex(MLP_LATENT, 4, 2, 0)  # layer 4 holds no MLP-side autoencoder
    assert field_of(engine, latent_request(node_ablations=[NodeAblation(no_ae)])) == (
        (0, "node_ablations", 0, "node", "layer")
    )
    too_big = NodeIndex(ATTN_LATENT, 6, 2, 384)
    assert field_of(engine, latent_request(node_ablations=[NodeAblation(too_big)])) == (
        (0, "node_ablations", 0, "node", "component")
    )
    trace = NodeToTrace(NodeIndex(ATTN_LATENT, 6, 2, 3), AttentionTraceType.VALUE)
    assert field_of(engine, latent_request(upstream_node_to_trace=trace)) == (
        (0, "upstream_node_to_trace", "attention_trace_type")
    )

    # A model holding no autoencoder: asking for latents names the component type.
    cfg = ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=4, d_mlp=64, vocab_size=50, n_ctx=16)
    small = HookedTransformer(cfg).requires_grad_(False).eval()
    bare = Engine(small)
    request = SubRequest([1, 2, 3], [4], component_type_for_mlp="autoencoder_latent")
    assert field_of(bare, request) == (0, "component_type_for_mlp")
    request = SubRequest([1, 2, 3], [4], component_type_for_attention="autoencoder_latent")
    assert field_of(bare, request) == (0, "component_type_for_attention")


def test_attach_refuses_what_is_not_a_node_type(model: HookedTransformer) -> None:
    d, m = model.cfg.d_model, model.cfg.d_mlp
    with pytest.raises(ValueError, match="already has an mlp-side autoencoder"):
        model.attach_autoencoder(
            random_autoencoder(model, "blocks.5.mlp.hook_post", "relu", None, "none", 8, 0)
        )
    with pytest.raises(ValueError, match="only autoencoders of a block"):
        model.attach_autoencoder(
            random_autoencoder(model, "blocks.2.hook_resid_post", "relu", None, "none", 8, 0)
        )
    wrong = SparseAutoencoder(AutoencoderConfig("blocks.2.hook_attn_out", m, 8, "relu"))
    with pytest.raises(ValueError, match="features"):
        model.attach_autoencoder(wrong)
    assert d != m and set(model.autoencoders) == {a[0] for a in AUTOENCODERS}


def test_latents_in_a_bfloat16_model() -> None:
    """The autoencoders stay float32 while the model runs in bfloat16: every view and metric of
    latents computes, ablating one moves D, and the splice still adds exact zeros."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, vocab_size=100, n_ctx=32
    )
    small = HookedTransformer(cfg).requires_grad_(False).eval()
    small.attach_autoencoder(
        random_autoencoder(small, "blocks.0.hook_attn_out", "topk", 4, "layer_norm", 32, 0)
    )
    small.attach_autoencoder(
        random_autoencoder(small, "blocks.1.mlp.hook_post", "relu", None, "none", 48, 1)
    )
    small.to(torch.bfloat16)
    prompt = [3, 14, 15, 92, 65, 35, 89, 79]
    request = SubRequest(
        prompt,
        [0],
        [2],
        component_type_for_mlp="autoencoder_latent",
        component_type_for_attention="autoencoder_latent",
        top_and_bottom_k=5,
    )
    engine = Engine(small)
    [plain, res] = engine.run(
        [SubRequest(prompt, [0], [2], token_views=False), request], groups=[0, 1]
    )
    assert res.direction_value == plain.direction_value
    latents = [n for n in res.nodes if is_latent(n)]
    assert {n.node_type for n in latents} == {MLP_LATENT, ATTN_LATENT}
    for values in res.metrics.values():
        assert all(v is not None and math.isfinite(v) for v in values)
    assert all(res.token_views[n].upvoted_output_tokens for n in latents)
    [ablated, traced] = engine.run(
        [
            replace(request, node_ablations=[NodeAblation(latents[0], 100.0)]),
            replace(request, upstream_node_to_trace=NodeToTrace(latents[-1])),
        ]
    )
    assert ablated.direction_value != res.direction_value
    assert math.isfinite(traced.direction_value)
