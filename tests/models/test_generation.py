"""Generation with a key/value cache (models/generation.py) against rerunning the whole prefix, on
random GPT-2 (learned positions) and Llama (rotary, grouped-query attention) models and on the
default model: the same tokens, the same logits at every step as a full forward (and as the plain
tensor math of tests/models/test_hook_points.py), hooks firing on each step's new position, the
context limit, and sampling that stays finite for every temperature > 0."""

from __future__ import annotations

import math

import pytest
import torch

from neuron_explainer.models import HookedTransformer, KVCache, ModelConfig, generate
from neuron_explainer.models.generation import next_token_logits, sample_token
from neuron_explainer.models.hooks import HookPoint
from tests.models.test_hook_points import reference_forward

CONFIGS = {
    "gpt2": ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=4, d_mlp=64, vocab_size=50, n_ctx=32),
    "llama": ModelConfig(
        n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=48, vocab_size=50, n_ctx=32
    ),
}
PROMPTS = [[3], [7, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5]]


def random_model(cfg: ModelConfig) -> HookedTransformer:
    """Seeded weights that keep activations O(1), so float32 rounding stays ~1e-5 of the logits,
    and make logits vary enough that greedy continuations do not just repeat one token."""
    torch.manual_seed(0)
    m = HookedTransformer(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "embed" in name:
                p.normal_(0, 0.5)
            elif p.ndim == 2:
                p.normal_(0, 2 / math.sqrt(p.shape[1]))
            elif name.endswith("weight"):  # norm gains
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    return m.requires_grad_(False).eval()


@pytest.fixture(params=list(CONFIGS))
def model(request: pytest.FixtureRequest) -> HookedTransformer:
    return random_model(CONFIGS[request.param])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_cached_greedy_generation_equals_rerunning_the_prefix(
    model: HookedTransformer, prompt: list[int]
) -> None:
    cached = generate(model, torch.tensor(prompt), max_new_tokens=16)
    uncached = generate(model, torch.tensor(prompt), max_new_tokens=16, use_cache=False)
    assert len(cached) == 16
    assert cached.tolist() == uncached.tolist()


def test_each_step_logits_equal_a_full_forward_of_the_prefix(model: HookedTransformer) -> None:
    seq = torch.tensor(PROMPTS[1])
    cache = KVCache()
    with torch.no_grad():
        for _ in range(12):
            logits = next_token_logits(model, seq, cache)
            assert cache.length == len(seq)
            assert (logits - model(seq[None])[0, -1]).abs().max() < 1e-4
            assert (logits - reference_forward(model, seq[None])[0, -1]).abs().max() < 1e-4
            seq = torch.cat([seq, logits.argmax()[None]])


def test_several_new_positions_after_cached_ones(model: HookedTransformer) -> None:
    """A chunk of positions after cached ones (causal within the chunk), fused and observed."""
    toks = torch.tensor([PROMPTS[2]])
    patterns: list[torch.Tensor] = []
    with torch.no_grad():
        full, full_cache = model.run_with_cache(toks, names=["blocks.1.attn.hook_pattern"])
        for observe in (False, True):
            cache = KVCache()
            model(toks[:, :5], kv_cache=cache)
            hooks = [("blocks.1.attn.hook_pattern", lambda x, h: patterns.append(x))]
            with model.hooks(fwd=hooks if observe else []):
                chunk = model(toks[:, 5:], kv_cache=cache)
            assert (chunk - full[:, 5:]).abs().max() < 1e-4
    assert torch.allclose(
        patterns[0], full_cache["blocks.1.attn.hook_pattern"][:, :, 5:], atol=1e-5
    )


def test_hooks_fire_on_each_steps_new_position(model: HookedTransformer) -> None:
    """Prefill: the prompt's values; then [1, 1, ...] and a pattern row [1, H, 1, n_so_far] that
    equals the last row of a full forward's pattern."""
    names = ["blocks.0.attn.hook_pattern", "blocks.1.hook_resid_post", "blocks.1.attn.hook_k"]
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def record(x: torch.Tensor, hook: HookPoint) -> None:
        seen[hook.name].append(x)

    prompt = torch.tensor(PROMPTS[1])
    with model.hooks(fwd=[(n, record) for n in names]):
        new = generate(model, prompt, max_new_tokens=4)
    H, d = model.cfg.n_heads, model.cfg.d_model
    # The last new token is returned, never run.
    assert [tuple(p.shape) for p in seen[names[0]]] == [(1, H, 5, 5)] + [
        (1, H, 1, n) for n in (6, 7, 8)
    ]
    assert [tuple(r.shape) for r in seen[names[1]]] == [(1, 5, d), (1, 1, d), (1, 1, d), (1, 1, d)]
    assert [k.shape[1] for k in seen[names[2]]] == [5, 1, 1, 1]
    seq = torch.cat([prompt, new])
    _, full = model.run_with_cache(seq[None, :8], names=[names[0]])
    for step, pattern in enumerate(seen[names[0]][1:]):
        q = 5 + step
        assert torch.allclose(pattern[0, :, 0], full[names[0]][0, :, q, : q + 1], atol=1e-5)


def test_max_context_is_respected(model: HookedTransformer) -> None:
    n_ctx = model.cfg.n_ctx
    prompt = torch.arange(n_ctx - 4) % 50
    cached = generate(model, prompt, max_new_tokens=10)
    assert len(cached) == 4  # prompt and continuation fill the context exactly
    assert cached.tolist() == generate(model, prompt, max_new_tokens=10, use_cache=False).tolist()
    assert len(generate(model, torch.arange(n_ctx) % 50, max_new_tokens=3)) == 0
    cache = KVCache()
    with torch.no_grad():
        model(prompt[None], kv_cache=cache)
        with pytest.raises(ValueError, match="context length"):
            model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="unpadded"):
            model(prompt[None, :3], torch.tensor([[1, 1, 0]]), kv_cache=KVCache())


def test_seeded_sampling_reproduces(model: HookedTransformer) -> None:
    prompt = torch.tensor(PROMPTS[1])

    def sample(seed: int, use_cache: bool = True) -> list[int]:
        return generate(model, prompt, 16, 2.0, top_p=0.95, seed=seed, use_cache=use_cache).tolist()

    a = sample(3)
    assert a == sample(3)
    assert a == sample(3, use_cache=False)
    assert a != sample(4)
    assert len(set(a)) > 1


def test_tiny_temperatures_are_greedy(model: HookedTransformer) -> None:
    prompt = torch.tensor(PROMPTS[2])
    greedy = generate(model, prompt, max_new_tokens=8).tolist()
    for temperature in (1e-300, 5e-324, 1e-45):
        assert generate(model, prompt, 8, temperature, seed=1).tolist() == greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-45, 1e-8, 1.0, 10.0])
@pytest.mark.parametrize(("top_k", "top_p"), [(None, None), (3, None), (None, 0.5), (2, 1e-9)])
def test_sample_token_is_finite_for_every_positive_temperature(
    dtype: torch.dtype, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    logits = (torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 30).to(dtype)
    g = torch.Generator().manual_seed(0)
    token = sample_token(logits, temperature, top_k, top_p, g)
    if temperature < 1e-8:
        assert token == int(logits.argmax())
    if top_k is not None:
        assert token in logits.topk(top_k).indices.tolist()


def test_sample_token_follows_the_tempered_distribution() -> None:
    """Frequencies of 20,000 draws against softmax(logits / T), restricted to the top k."""
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    g = torch.Generator().manual_seed(0)
    for temperature, top_k in ((0.7, None), (2.0, 3)):
        draws = torch.tensor(
            [sample_token(logits, temperature, top_k, None, g) for _ in range(20_000)]
        )
        freq = torch.bincount(draws, minlength=5).double() / len(draws)
        want = (logits.double() / temperature).softmax(-1)
        if top_k is not None:
            want[top_k:] = 0
            want /= want.sum()
        assert (freq - want).abs().max() < 0.015


# ---- the default model ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    ["The capital of France is", "1, 2, 3, 4, 5,", "When Mary and John went to the store, John"],
)
def test_default_model_cached_equals_uncached(
    default_model: HookedTransformer, prompt: str
) -> None:
    cached = generate(default_model, prompt, max_new_tokens=12, stop_at_eos=False)
    assert (
        cached.tolist()
        == generate(
            default_model, prompt, max_new_tokens=12, stop_at_eos=False, use_cache=False
        ).tolist()
    )


def test_default_model_step_logits_equal_a_full_forward(default_model: HookedTransformer) -> None:
    assert default_model.tokenizer is not None
    seq = torch.tensor(default_model.tokenizer.encode("It was a bright cold day in April, and"))
    cache = KVCache()
    with torch.no_grad():
        for _ in range(8):
            logits = next_token_logits(default_model, seq, cache)
            assert (logits - default_model(seq[None])[0, -1]).abs().max() < 1e-4
            seq = torch.cat([seq, logits.argmax()[None]])
