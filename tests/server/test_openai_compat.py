"""The server speaks OpenAI: OpenAI's own Python client lists the model, chats and gets
completions with log-probabilities from a real `tdb serve` (the `server` fixture), and the
numbers are the model's: each log-probability equals a full forward's log-softmax, computed here
without the key/value cache the server uses, and greedy picks the most likely token."""

from __future__ import annotations

import openai
import pytest
import torch

from neuron_explainer.explanations.completions import chat_prompt
from neuron_explainer.models import HookedTransformer
from tests.servers import Server


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def full_logprobs(model: HookedTransformer, ids: list[int]) -> torch.Tensor:
    """[n, V]: log-probabilities of the token after each position, from one uncached forward."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)


def test_models(client: openai.OpenAI) -> None:
    [model] = client.models.list().data
    assert model.id == "smollm2-135m" and model.object == "model"


def test_chat_completion_with_logprobs(
    client: openai.OpenAI, default_model: HookedTransformer
) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(
        model="smollm2-135m",
        messages=messages,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and "Paris" in (choice.message.content or "")
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert reply.usage is not None
    assert reply.usage.completion_tokens == len(choice.logprobs.content) <= 8
    # Fewer than asked for: the model ended its turn (<|im_end|>, not part of the reply).
    assert choice.finish_reason == ("stop" if reply.usage.completion_tokens < 8 else "length")
    tok = default_model.tokenizer
    assert tok is not None
    prompt_ids = tok.encode(chat_prompt(tok, [("user", messages[0]["content"])]))
    assert reply.usage.prompt_tokens == len(prompt_ids)
    new_text = "".join(t.token for t in choice.logprobs.content)
    assert new_text == choice.message.content
    new_ids = tok.encode(new_text)
    lp = full_logprobs(default_model, prompt_ids + new_ids)
    for j, t in enumerate(choice.logprobs.content):
        at = lp[len(prompt_ids) - 1 + j]
        assert t.logprob == pytest.approx(float(at.max()), abs=2e-3)  # greedy: the argmax
        assert t.top_logprobs[0].token == t.token and len(t.top_logprobs) == 3
        assert [x.logprob for x in t.top_logprobs] == sorted(
            (x.logprob for x in t.top_logprobs), reverse=True
        )


def test_completion_echo_logprobs(client: openai.OpenAI, default_model: HookedTransformer) -> None:
    prompt = "The capital of France is"
    result = client.completions.create(
        model="smollm2-135m", prompt=prompt, max_tokens=3, temperature=0, logprobs=5, echo=True
    )
    choice = result.choices[0]
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    tok = default_model.tokenizer
    assert tok is not None
    ids = tok.encode(prompt)
    assert logprobs.tokens[: len(ids)] == [tok.decode([i]) for i in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    all_ids = ids + tok.encode(choice.text[len(prompt) :])
    lp = full_logprobs(default_model, all_ids)
    for i in range(1, len(all_ids)):
        assert logprobs.token_logprobs[i] == pytest.approx(float(lp[i - 1, all_ids[i]]), abs=2e-3)
        top = logprobs.top_logprobs[i]
        assert top is not None and len(top) <= 5
    assert logprobs.text_offset is not None and logprobs.text_offset[1] == len(logprobs.tokens[0])


def test_errors_name_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad_model:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=1)
    assert "model" in str(bad_model.value) and "smollm2-135m" in str(bad_model.value)
    with pytest.raises(openai.UnprocessableEntityError) as streaming:
        client.completions.create(model="smollm2-135m", prompt="Hi", max_tokens=1, stream=True)
    assert "stream" in str(streaming.value)
    with pytest.raises(openai.UnprocessableEntityError) as too_many:
        client.completions.create(model="smollm2-135m", prompt="Hi", logprobs=99)
    assert "logprobs" in str(too_many.value)
    with pytest.raises(openai.BadRequestError) as not_a_token:
        client.completions.create(model="smollm2-135m", prompt=[1, 10**9], max_tokens=1)
    assert "prompt[1]" in str(not_a_token.value)
    with pytest.raises(openai.BadRequestError) as top_alone:
        client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "Hi"}],
            top_logprobs=2,
        )
    assert "top_logprobs" in str(top_alone.value)
