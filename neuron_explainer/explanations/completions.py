"""Text completions with log-probabilities from a loaded model: what the server's
OpenAI-compatible routes (`/v1/completions`, `/v1/chat/completions`) and the local explanation
backend run.

`complete` continues a prompt (greedy at temperature 0, else sampled) through the key/value cache
of models/generation.py and reports the log-probability of every new token and the `top_logprobs`
most likely alternatives at each step; with `echo` it also reports those of the prompt's tokens
(each given the tokens before it; the first has none), which is what an "all at once" simulator
reads. `chat_prompt` renders chat messages with the model's chat template: ChatML
(`<|im_start|>role\\ncontent<|im_end|>`, SmolLM2's and Qwen's) when the tokenizer has those special
tokens, otherwise a plain "role: content" transcript.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from neuron_explainer.models import generation
from neuron_explainer.models.tokenizer import Tokenizer
from neuron_explainer.models.transformer import HookedTransformer

# SmolLM2-Instruct's template adds this system message when the messages have none.
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its log-probability and the most likely tokens at its position."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]  # (token id, text, log-probability), most likely first


@dataclass(frozen=True)
class Completion:
    prompt_ids: list[int]
    new_ids: list[int]
    text: str  # the new tokens decoded (stop sequence excluded)
    logprobs: list[TokenLogprob]  # one per new token
    prompt_logprobs: list[TokenLogprob | None] | None  # with echo: per prompt token (first: None)
    finish_reason: Literal["stop", "length"]


def chat_prompt(tokenizer: Tokenizer, messages: Sequence[tuple[str, str]]) -> str:
    """The prompt text for (role, content) messages, ending where the assistant's reply starts."""
    if {"<|im_start|>", "<|im_end|>"} <= tokenizer.special_tokens.keys():
        if not messages or messages[0][0] != "system":
            messages = [("system", SMOLLM2_SYSTEM), *messages]
        turns = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
        return turns + "<|im_start|>assistant\n"
    return "".join(f"{role}: {content}\n" for role, content in messages) + "assistant:"


def _token_logprob(
    tokenizer: Tokenizer, logprobs: torch.Tensor, token_id: int, n_top: int
) -> TokenLogprob:
    top: list[tuple[int, str, float]] = []
    if n_top > 0:
        values, ids = logprobs.topk(min(n_top, logprobs.numel()))
        top = [
            (int(i), tokenizer.decode([int(i)]), float(v))
            for v, i in zip(values.tolist(), ids.tolist(), strict=True)
        ]
    return TokenLogprob(token_id, tokenizer.decode([token_id]), float(logprobs[token_id]), top)


@torch.no_grad()
def complete(
    model: HookedTransformer,
    prompt: str | Sequence[int],
    max_tokens: int = 16,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_logprobs: int = 0,
    echo: bool = False,
    stop: Sequence[str] = (),
    seed: int | None = None,
    allow_special: bool = True,
) -> Completion:
    """Continue `prompt` (text, special tokens such as `<|im_start|>` allowed, or token ids) by up
    to `max_tokens` tokens, stopping at the end-of-sequence token, at a `stop` string (excluded
    from `text`) or at the context's end. Raises ValueError for an empty prompt or one that fills
    the context."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("this model has no tokenizer")
    ids = (
        tokenizer.encode(prompt, allow_special=allow_special)
        if isinstance(prompt, str)
        else [int(i) for i in prompt]
    )
    if not ids:
        raise ValueError("the prompt is empty")
    if len(ids) >= model.cfg.n_ctx:
        raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {model.cfg.n_ctx}")
    seq = torch.tensor(ids, device=model.device)
    cache = generation.KVCache()
    prompt_logprobs: list[TokenLogprob | None] | None = None
    if echo:
        logits = model(seq[None], kv_cache=cache)[0].float()  # [n, V]
        lp = torch.log_softmax(logits, dim=-1)
        prompt_logprobs = [None] + [
            _token_logprob(tokenizer, lp[i - 1], ids[i], top_logprobs) for i in range(1, len(ids))
        ]
        next_logits = logits[-1]
    else:
        next_logits = generation.next_token_logits(model, seq, cache).float()
    generator = torch.Generator(device=model.device)
    if seed is not None:
        generator.manual_seed(seed)
    new: list[int] = []
    logprobs: list[TokenLogprob] = []
    finish: Literal["stop", "length"] = "length"
    text = ""
    while len(new) < max_tokens:
        next_id = generation.sample_token(
            next_logits, temperature, top_p=top_p, generator=generator
        )
        if next_id == tokenizer.eos_token_id:
            finish = "stop"
            break
        new.append(next_id)
        logprobs.append(
            _token_logprob(tokenizer, torch.log_softmax(next_logits, dim=-1), next_id, top_logprobs)
        )
        text = tokenizer.decode(new)
        hit = min((text.find(s) for s in stop if s and s in text), default=-1)
        if hit >= 0:
            text, finish = text[:hit], "stop"
            break
        seq = torch.cat([seq, seq.new_tensor([next_id])])
        if seq.numel() >= model.cfg.n_ctx:
            break
        next_logits = generation.next_token_logits(model, seq, cache).float()
    return Completion(ids, new, text, logprobs, prompt_logprobs, finish)
