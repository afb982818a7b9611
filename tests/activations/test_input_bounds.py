"""What the library refuses before or instead of computing nonsense: a pass whose logits or `D`
overflow (an ablation value too large for the model's arithmetic) is a RequestError naming the
ablations, not NaNs in a result; a prompt that cannot fit is refused from its length alone, and
that cheap check never refuses one that fits."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from neuron_explainer.activations import (
    Engine,
    NodeAblation,
    NodeIndex,
    NodeType,
    PromptTooLongError,
    RequestError,
    SubRequest,
)
from neuron_explainer.activations.processing import generate
from neuron_explainer.activations.validation import NORMALIZATION_SHRINK, longest_token_bytes
from neuron_explainer.models import HookedTransformer, ModelConfig

PROMPT = [5, 17, 3, 99, 42, 8]


@pytest.fixture(scope="module")
def tiny() -> HookedTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig.gpt2(n_layers=2, d_model=32, n_heads=4, d_mlp=64, vocab_size=120, n_ctx=32)
    return HookedTransformer(cfg).requires_grad_(False).eval()


def test_overflowing_ablation_is_an_error_naming_the_ablations(tiny: HookedTransformer) -> None:
    """An embedding scaled by 3e38 overflows float32: the engine and generation refuse it instead
    of answering NaN (or token 0 forever), and name the row's ablations."""
    node = NodeIndex(NodeType.EMBEDDING, 0, 2)
    engine = Engine(tiny)
    ok = SubRequest(PROMPT, target_tokens=[3], node_ablations=[NodeAblation(node, 1e6)])
    huge = SubRequest(PROMPT, target_tokens=[3], node_ablations=[NodeAblation(node, 3e38)])
    with pytest.raises(RequestError) as info:
        engine.run([ok, huge])
    assert info.value.path == (1, "node_ablations")
    assert "float32 arithmetic overflowed" in info.value.message
    [result] = engine.run([ok])  # within the API's bound (1e6) float32 stays finite
    assert math.isfinite(result.direction_value)
    with pytest.raises(RequestError) as info:
        generate(engine, PROMPT, max_new_tokens=3, node_ablations=huge.node_ablations)
    assert info.value.path == ("node_ablations",)


def test_float16_overflow_within_the_api_bound_is_an_error(tiny: HookedTransformer) -> None:
    """float16 overflows (at 65504) under values the API accepts: an error, not NaN."""
    half = Engine(copy.deepcopy(tiny).half())
    neuron = NodeIndex(NodeType.MLP_NEURON, 0, 2, 3)
    [result] = half.run([SubRequest(PROMPT, [3], node_ablations=[NodeAblation(neuron, 1e4)])])
    assert math.isfinite(result.direction_value)
    with pytest.raises(RequestError) as info:
        half.run([SubRequest(PROMPT, [3], node_ablations=[NodeAblation(neuron, 1e6)])])
    assert info.value.path == (0, "node_ablations") and "float16" in info.value.message


def test_prompt_too_long_to_fit_is_refused_without_tokenizing(
    default_model: HookedTransformer,
) -> None:
    engine = Engine(default_model, max_prompt_tokens=16)
    tok = default_model.tokenizer
    assert tok is not None
    longest = longest_token_bytes(tok)
    # The densest text there is: the longest token, 16 times. It fits, and the check lets it by.
    [dense_id] = [i for i in range(tok.vocab_size) if len(tok.token_bytes(i)) == longest][:1]
    dense = tok.decode([dense_id]) * 16
    engine.check_prompt_size(dense)
    assert len(engine.prompt_tokens(SubRequest(dense))) == 16
    # Past the bound, refused from the length alone.
    too_long = "a" * (16 * NORMALIZATION_SHRINK * longest + 1)
    with pytest.raises(PromptTooLongError) as info:
        engine.check_prompt_size(too_long)
    assert info.value.path == ("prompt",) and "characters cannot fit" in info.value.message
    with pytest.raises(PromptTooLongError):
        engine.check_prompt_size([1] * 16, prepend_bos=True)  # BOS makes 17
    engine.check_prompt_size([1] * 15, prepend_bos=True)
