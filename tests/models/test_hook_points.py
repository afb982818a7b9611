"""Hook points: firing order, gradients, replacement, and cleanup, on random GPT-2 and Llama models."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from neuron_explainer.models import BLOCK_HOOKS, GLOBAL_HOOKS, HookedTransformer, ModelConfig
from neuron_explainer.models.hooks import HookPoint

CONFIGS = {
    "gpt2": ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=4, d_mlp=64, vocab_size=50, n_ctx=16),
    "llama": ModelConfig(
        n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=48, vocab_size=50, n_ctx=16
    ),
}


@pytest.fixture(params=list(CONFIGS))
def model(request: pytest.FixtureRequest) -> HookedTransformer:
    torch.manual_seed(0)
    m = HookedTransformer(CONFIGS[request.param])
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.requires_grad_(False).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def reference_forward(
    model: HookedTransformer,
    toks: torch.Tensor,
    replace_post: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The architecture written out as plain tensor math from the weights (no modules, no hooks);
    `replace_post(layer, post)` may replace the MLP activations."""
    cfg = model.cfg
    sd = model.state_dict()
    b, n = toks.shape

    def norm(x: torch.Tensor, prefix: str) -> torch.Tensor:
        if cfg.norm == "layernorm":
            return F.layer_norm(
                x, (cfg.d_model,), sd[prefix + ".weight"], sd[prefix + ".bias"], cfg.norm_eps
            )
        return (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * sd[prefix + ".weight"]
        )

    def linear(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.linear(x, sd[prefix + ".weight"], sd.get(prefix + ".bias"))

    x = sd["embed.weight"][toks]
    if cfg.positional == "learned":
        x = x + sd["pos_embed.weight"][:n]
    else:
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.d_head, 2).float() / cfg.d_head))
        ang = torch.arange(n).float()[:, None] * inv
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

        def rope(t: torch.Tensor) -> torch.Tensor:  # [b, h, n, dh]
            half = cfg.d_head // 2
            return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        h = norm(x, p + "ln1")
        q = linear(h, p + "attn.q_proj").view(b, n, cfg.n_heads, cfg.d_head).transpose(1, 2)
        k = linear(h, p + "attn.k_proj").view(b, n, cfg.n_kv_heads, cfg.d_head).transpose(1, 2)
        v = linear(h, p + "attn.v_proj").view(b, n, cfg.n_kv_heads, cfg.d_head).transpose(1, 2)
        if cfg.positional == "rotary":
            q, k = rope(q), rope(k)
        group = cfg.n_heads // cfg.n_kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(cfg.d_head)).masked_fill(
            ~causal, float("-inf")
        )
        z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        x = x + linear(z, p + "attn.o_proj")
        h = norm(x, p + "ln2")
        if cfg.gated_mlp:
            post = F.silu(linear(h, p + "mlp.w_in")) * linear(h, p + "mlp.w_up")
        else:
            post = F.gelu(linear(h, p + "mlp.w_in"), approximate="tanh")
        if replace_post is not None:
            post = replace_post(layer, post)
        x = x + linear(post, p + "mlp.w_out")
    return norm(x, "ln_final") @ sd["unembed.weight"].T


def test_reference_forward_agrees(model: HookedTransformer) -> None:
    with torch.no_grad():
        assert (model(tokens()) - reference_forward(model, tokens())).abs().max() < 1e-5


def test_every_hook_fires_once_in_forward_order(model: HookedTransformer) -> None:
    fired: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}

    def record(x: torch.Tensor, hook: HookPoint) -> None:
        fired.append(hook.name)
        shapes[hook.name] = tuple(x.shape)

    with torch.no_grad(), model.hooks(fwd=[(lambda name: True, record)]):
        model(tokens())
    assert fired == model.hook_names()
    cfg = model.cfg
    sizes = {"b": 2, "n": 7, "d": cfg.d_model, "H": cfg.n_heads, "Hkv": cfg.n_kv_heads}
    sizes |= {"dh": cfg.d_head, "m": cfg.d_mlp, "V": cfg.vocab_size, "1": 1}
    table = GLOBAL_HOOKS | {
        f"blocks.{L}.{k}": v for L in range(cfg.n_layers) for k, v in BLOCK_HOOKS.items()
    }
    for name in fired:
        assert shapes[name] == tuple(sizes[s] for s in table[name][0].split()), name
    # Within each layer, the computation order (residual in, attention, MLP, residual out).
    for layer in range(cfg.n_layers):
        at = {
            s: fired.index(f"blocks.{layer}.{s}")
            for s in BLOCK_HOOKS
            if f"blocks.{layer}.{s}" in fired
        }
        order = [
            "hook_resid_pre",
            "ln1.hook_scale",
            "attn.hook_q",
            "attn.hook_pattern",
            "attn.hook_z",
        ]
        order += [
            "hook_attn_out",
            "hook_resid_mid",
            "mlp.hook_pre",
            "mlp.hook_post",
            "hook_resid_post",
        ]
        assert [at[s] for s in order] == sorted(at[s] for s in order)
    assert fired[0] == "hook_embed" and fired[-1] == "hook_logits"


def test_backward_hook_gradient_equals_autograd(model: HookedTransformer) -> None:
    toks = tokens()
    name = "blocks.1.mlp.hook_post"
    got: dict[str, torch.Tensor] = {}
    with (
        torch.enable_grad(),
        model.hooks(
            bwd=[
                (name, lambda g, h: got.__setitem__(h.name, g)),
                ("blocks.0.attn.hook_pattern", lambda g, h: got.__setitem__(h.name, g)),
            ]
        ),
    ):
        model(toks)[:, -1, 3].sum().backward()
    # Independent: make the activation a leaf and ask autograd directly (one leaf per run, since a
    # leaf cuts the graph above it).
    for hook_name in (name, "blocks.0.attn.hook_pattern"):
        leaves: dict[str, torch.Tensor] = {}

        def leaf(
            x: torch.Tensor, hook: HookPoint, leaves: dict[str, torch.Tensor] = leaves
        ) -> torch.Tensor:
            leaves[hook.name] = x.detach().requires_grad_(True)
            return leaves[hook.name]

        with torch.enable_grad(), model.hooks(fwd=[(hook_name, leaf)]):
            out = model(toks)[:, -1, 3].sum()
            (want,) = torch.autograd.grad(out, [leaves[hook_name]])
        assert torch.allclose(got[hook_name], want, atol=1e-6), hook_name


def test_replacing_an_activation_matches_an_independent_forward(model: HookedTransformer) -> None:
    toks = tokens()

    def zero_neuron(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        x = x.clone()
        x[:, 2, 5] = 0.0
        return x

    def replace(layer: int, post: torch.Tensor) -> torch.Tensor:
        if layer == 1:
            post = post.clone()
            post[:, 2, 5] = 0.0
        return post

    with torch.no_grad():
        base = model(toks)
        with model.hooks(fwd=[("blocks.1.mlp.hook_post", zero_neuron)]):
            hooked = model(toks)
        want = reference_forward(model, toks, replace)
    assert (hooked - want).abs().max() < 1e-5
    assert (hooked - base).abs().max() > 1e-4  # the replacement did something


def test_hooks_are_removed_on_exit_even_after_an_error(model: HookedTransformer) -> None:
    with torch.no_grad():
        base = model(tokens())
        with pytest.raises(RuntimeError), model.hooks(fwd=[("hook_embed", lambda x, h: x * 0)]):
            raise RuntimeError("boom")
        assert not any(hp.has_hooks for hp in model.hook_points().values())
        assert torch.equal(model(tokens()), base)


def test_pattern_observed_and_fused_paths_agree(model: HookedTransformer) -> None:
    with torch.no_grad():
        fused = model(tokens())
        observed, cache = model.run_with_cache(tokens(), names=lambda n: n.endswith("hook_pattern"))
    assert (fused - observed).abs().max() < 1e-5
    assert sorted(cache) == sorted(n for n in model.hook_names() if n.endswith("hook_pattern"))
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert torch.allclose(pattern.sum(-1), torch.ones(()))  # rows are distributions
    assert pattern.triu(1).abs().max() == 0  # causal


def test_unknown_hook_names_are_rejected(model: HookedTransformer) -> None:
    with (
        pytest.raises(KeyError, match=r"blocks\.9\.nope"),
        model.hooks(fwd=[("blocks.9.nope", lambda x, h: None)]),
    ):
        pass
    with pytest.raises(KeyError):
        model.run_with_cache(tokens(), names=["hook_nope"])
