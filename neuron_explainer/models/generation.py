"""Generation: a greedy or sampled continuation of one prompt, with a key/value cache.

The prompt runs once (the prefill) and leaves every layer's keys (after rotary) and values in a
`KVCache`; each later step runs only the newest token, which attends to the cached keys and values.
A step so costs O(n) instead of a forward over the whole prefix (bench/generate.py measures both).
`use_cache=False` reruns the whole prefix at every step: the reference for tests and benchmark.

Hooks. Functions the caller attaches around `generate` (`with model.hooks(...)`) fire at every step:
during the prefill with the prompt's values `[1, n_prompt, ...]`, then with the new position's only,
`[1, 1, ...]` (`hook_attn_scores`, `hook_pattern`: `[1, H, 1, n_so_far]`). Hooks that index absolute
positions, such as node ablations at prompt positions, go in `prefill_hooks`: attached while the
prompt runs, not on the later steps. Their effect reaches every new token through the cached keys and
values, so the continuation is the one of holding them on while rerunning the prefix (which is what
they do with `use_cache=False`), as long as they change only prompt positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from neuron_explainer.models.hooks import ForwardHookFn, NameFilter
from neuron_explainer.models.transformer import HookedTransformer

Hooks = Sequence[tuple[NameFilter, ForwardHookFn]]


@dataclass
class KVCache:
    """Per layer, the keys (after rotary) and values [b, n, Hkv, dh] of the positions run so far:
    all that later positions' attention reads from them (`HookedTransformer.forward(kv_cache=)`).
    `keys[layer]` and `values[layer]` are views of buffers with room for more positions (doubled
    when full), so a step writes its own position in place instead of copying the whole cache."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    _key_buffers: list[torch.Tensor] = field(default_factory=list, repr=False)
    _value_buffers: list[torch.Tensor] = field(default_factory=list, repr=False)

    @property
    def length(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0

    def extend(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.keys):  # the layer's first positions
            self._key_buffers.append(k)
            self._value_buffers.append(v)
            self.keys.append(k)
            self.values.append(v)
            return k, v
        start = self.keys[layer].shape[1]
        end = start + k.shape[1]
        for buffers, new in ((self._key_buffers, k), (self._value_buffers, v)):
            buffer = buffers[layer]
            if end > buffer.shape[1]:  # full: a buffer twice as large, the positions so far copied
                grown = new.new_empty((new.shape[0], max(2 * buffer.shape[1], end), *new.shape[2:]))
                grown[:, :start] = buffer[:, :start]
                buffers[layer] = buffer = grown
            buffer[:, start:end] = new
        self.keys[layer] = self._key_buffers[layer][:, :end]
        self.values[layer] = self._value_buffers[layer][:, :end]
        return self.keys[layer], self.values[layer]


@torch.no_grad()
def generate(
    model: HookedTransformer,
    tokens: torch.Tensor | str,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    prefill_hooks: Hooks = (),
    use_cache: bool = True,
) -> torch.Tensor:
    """Greedy (temperature 0) or sampled continuation of one prompt; returns the new tokens [t].

    Stops after `max_new_tokens`, at the tokenizer's end-of-sequence token (`stop_at_eos`), or when
    prompt and continuation fill the model's context. `prefill_hooks` apply to the prompt's
    positions (module docstring)."""
    if isinstance(tokens, str):
        tokens = model.to_tokens(tokens)[0][0]
    seq = tokens.reshape(-1).to(model.device)
    generator = torch.Generator(device=model.device)
    if seed is not None:
        generator.manual_seed(seed)
    eos = model.tokenizer.eos_token_id if model.tokenizer is not None else None
    cache = KVCache() if use_cache else None
    new: list[int] = []
    while len(new) < max_new_tokens and seq.numel() < model.cfg.n_ctx:
        logits = next_token_logits(model, seq, cache, prefill_hooks)
        next_id = sample_token(logits.float(), temperature, top_k, top_p, generator)
        new.append(next_id)
        seq = torch.cat([seq, seq.new_tensor([next_id])])
        if stop_at_eos and next_id == eos:
            break
    return torch.tensor(new, dtype=torch.long)


def next_token_logits(
    model: HookedTransformer, seq: torch.Tensor, cache: KVCache | None, prefill_hooks: Hooks = ()
) -> torch.Tensor:
    """Logits [V] for the token after `seq` [n]: running the positions not yet in `cache`, or the
    whole prefix without one. `prefill_hooks` are attached when the run includes the prompt."""
    run = seq if cache is None else seq[cache.length :]
    prompt = cache is None or cache.length == 0
    with model.hooks(fwd=prefill_hooks if prompt else ()):
        last = torch.tensor([run.numel() - 1])
        return model(run[None], logits_positions=last, kv_cache=cache)[0]


def sample_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """The next token from logits [V]: the argmax at temperature 0, else a sample of
    softmax(logits / temperature) after top-k and nucleus (top-p) filtering.

    The maximum logit is subtracted before dividing, in float64, so every temperature > 0 gives
    finite probabilities: a tiny one puts all the mass on the maximum (greedy), never NaN."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = (logits.double() - logits.max()) / temperature
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
