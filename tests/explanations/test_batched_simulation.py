"""The local backend's fast read of simulation prompts gives the numbers of the plain one.

`LocalBackend.logprobs_at` runs the prompts of one simulation as one batch that computes the
prefix they share once and unembeds only the placeholder positions; the plain path runs each
prompt on its own through `complete(echo=True)`, as the server's /v1/completions does. Both on the
default model (the real SmolLM2-135M-Instruct), on excerpts of different lengths."""

from __future__ import annotations

import numpy as np
import pytest

from neuron_explainer.datasets import ActivationRecord
from neuron_explainer.explanations.completions import complete, prompt_top_logprobs
from neuron_explainer.explanations.llm import AllAtOnceSimulator, LocalBackend
from neuron_explainer.models.transformer import HookedTransformer

SENTENCES = [
    "The cat sat on the mat.",
    "Mr. Darcy bowed to Elizabeth and said nothing at all",
    "Rain, 1813:",
]


def _excerpts(model: HookedTransformer) -> list[ActivationRecord]:
    tok = model.tokenizer
    assert tok is not None
    out = []
    for s in SENTENCES:
        tokens = [tok.decode([i]) for i in tok.encode(s)]
        out.append(ActivationRecord(tokens, [float(i % 3) for i in range(len(tokens))], 0))
    return out


def test_batched_simulation_equals_one_prompt_at_a_time(default_model: HookedTransformer) -> None:
    backend = LocalBackend(default_model, batch=2)  # two batches: one of 2 prompts, one of 1
    excerpts = _excerpts(default_model)
    fast = AllAtOnceSimulator(backend).simulate("punctuation", "mlp_neuron", excerpts)
    plain = AllAtOnceSimulator(backend, batched=False).simulate(
        "punctuation", "mlp_neuron", excerpts
    )
    assert [len(p) for p in fast] == [len(r.tokens) for r in excerpts]
    for f, p in zip(fast, plain, strict=True):
        assert np.all((f >= 0) & (f <= 10))
        np.testing.assert_allclose(f, p, atol=1e-4)
    # The predictions differ from token to token: the model read something.
    assert np.ptp(np.concatenate(fast)) > 0.1


def test_prompt_top_logprobs_equals_echo(default_model: HookedTransformer) -> None:
    tok = default_model.tokenizer
    assert tok is not None
    shared = "Instructions shared by every prompt: rate each word.\n"
    prompts = [tok.encode(shared + s) for s in SENTENCES] + [tok.encode(shared[:20])]
    n_shared = len(tok.encode(shared))
    # Positions after the shared prefix and inside it (the prefix run once is then cut short),
    # one prompt reading nothing; then with a prompt that is a prefix of the others, and no
    # position after the first token (nothing is shared).
    for positions in (
        [[n_shared - 3, n_shared + 1, len(prompts[0]) - 1], [n_shared + 2], [], [1]],
        [[1], [1, 2], [], [1, len(prompts[3]) - 1]],
    ):
        got = prompt_top_logprobs(default_model, prompts, positions, top=5)
        for ids, js, tops in zip(prompts, positions, got, strict=True):
            echo = complete(default_model, ids, max_tokens=0, top_logprobs=5, echo=True)
            assert echo.prompt_logprobs is not None
            assert len(tops) == len(js)
            for j, top in zip(js, tops, strict=True):
                ref = echo.prompt_logprobs[j]
                assert ref is not None
                assert [i for i, _ in top] == [i for i, _, _ in ref.top]
                np.testing.assert_allclose(
                    [v for _, v in top], [v for _, _, v in ref.top], atol=1e-4
                )
    with pytest.raises(ValueError, match="positions"):
        prompt_top_logprobs(default_model, prompts[:1], [[0]], top=5)
