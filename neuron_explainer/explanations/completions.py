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

import threading
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


def _echo_logprobs(
    tokenizer: Tokenizer, logits: torch.Tensor, ids: Sequence[int], n_top: int
) -> list[TokenLogprob]:
    """What `_token_logprob` gives for each row of logits [n, V] and its token, with one
    log-softmax and one top-k over all rows and each token id decoded once."""
    lp = torch.log_softmax(logits, dim=-1)
    chosen = lp.gather(1, torch.tensor(list(ids), device=lp.device)[:, None])[:, 0].tolist()
    texts: dict[int, str] = {}

    def text(i: int) -> str:
        if i not in texts:
            texts[i] = tokenizer.decode([i])
        return texts[i]

    tops: list[list[tuple[int, str, float]]] = [[] for _ in ids]
    if n_top > 0 and len(ids):
        values, top_ids = lp.topk(min(n_top, lp.shape[-1]), dim=-1)
        tops = [
            [(i, text(i), v) for v, i in zip(vs, js, strict=True)]
            for vs, js in zip(values.tolist(), top_ids.tolist(), strict=True)
        ]
    return [
        TokenLogprob(i, text(i), lp_i, top) for i, lp_i, top in zip(ids, chosen, tops, strict=True)
    ]


class _PrefixCache:
    """The keys and values of a prefix computed once for one row, read by every row of a batch of
    continuations of it (generation.KVCache's protocol: `length` and `extend`)."""

    def __init__(self, rows: int, prefix: generation.KVCache) -> None:
        self.rows, self.prefix = rows, prefix

    @property
    def length(self) -> int:
        return self.prefix.length

    def extend(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pk, pv = self.prefix.keys[layer], self.prefix.values[layer]
        shape = (self.rows, -1, -1, -1)
        return torch.cat([pk.expand(shape), k], dim=1), torch.cat([pv.expand(shape), v], dim=1)


@torch.no_grad()
def prompt_top_logprobs(
    model: HookedTransformer,
    prompts: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    top: int,
) -> list[list[list[tuple[int, float]]]]:
    """For each prompt (token ids) and each index j of its `positions` (0 < j < len(prompt)):
    the `top` most likely next tokens after prompt[:j], as (token id, log-probability), most
    likely first. The same numbers as `complete(prompt, echo=True, top_logprobs=top)` gives at
    those tokens (up to floating-point rounding: the sums run in another order), for a fraction
    of the work, in one batch: the longest prefix all prompts share runs once and every prompt's
    remaining tokens (right-padded, up to the last position asked for) read its keys and values;
    only the rows asked for are unembedded."""
    if len(prompts) != len(positions):
        raise ValueError("one list of positions per prompt")
    for ids, js in zip(prompts, positions, strict=True):
        if any(not 0 < j < len(ids) for j in js):
            raise ValueError(f"positions must lie in 1..{len(ids) - 1}")
        if len(ids) >= model.cfg.n_ctx:
            raise ValueError(f"a prompt has {len(ids)} tokens; the context holds {model.cfg.n_ctx}")
    asked = [(i, j) for i, js in enumerate(positions) for j in js]
    out: list[list[list[tuple[int, float]]]] = [[[] for _ in js] for js in positions]
    if not asked:
        return out
    # The shared prefix, short enough that every row read (j - 1) comes after it.
    first = list(prompts[0])
    shared = min(min(len(p) for p in prompts), min(j for _, j in asked) - 1)
    for p in prompts[1:]:
        shared = next((n for n in range(shared) if p[n] != first[n]), shared)
    device = model.device
    cache = generation.KVCache()
    if shared > 0:
        last = torch.tensor([shared - 1])
        model(
            torch.tensor(first[:shared], device=device)[None], logits_positions=last, kv_cache=cache
        )
    rows = [
        list(p[shared : max(js, default=shared + 1)])
        for p, js in zip(prompts, positions, strict=True)
    ]
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    # Right padding needs no attention mask: a real token only attends to positions before it.
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    caller, seen = threading.get_ident(), []

    def keep(x: torch.Tensor, hook: object) -> None:
        if threading.get_ident() == caller:  # not another thread's forward on the same model
            seen.append(x)

    with model.hooks(fwd=[(final, keep)]):
        kv = _PrefixCache(len(rows), cache) if shared > 0 else None
        model(
            tokens.to(device),
            logits_positions=torch.zeros(len(rows), dtype=torch.long),
            kv_cache=kv,
        )
    resid = seen[-1]
    b_idx = torch.tensor([i for i, _ in asked], device=resid.device)
    n_idx = torch.tensor([j - 1 - shared for _, j in asked], device=resid.device)
    logits = model.logits(resid[b_idx, n_idx][None])[0].float()  # [asked, V]
    values, top_ids = torch.log_softmax(logits, dim=-1).topk(min(top, logits.shape[-1]), dim=-1)
    k = 0
    for i, js in enumerate(positions):
        for n in range(len(js)):
            out[i][n] = list(zip(top_ids[k].tolist(), values[k].tolist(), strict=True))
            k += 1
    return out


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
        prompt_logprobs = [None, *_echo_logprobs(tokenizer, logits[:-1], ids[1:], top_logprobs)]
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
