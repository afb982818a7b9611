"""The no-LLM baseline: an explanation written from a record's statistics, and its simulator.

The explanation lists the tokens that carry the activation, with weights on TDB's 0-10 scale
(10 = the component's largest activation on the explanation excerpts), and the preceding tokens
that add to it:

    tokens " married" (10), " wife" (7); after " his" (3)

For attention heads (activations per token pair (query q, key k <= q)) it lists the attended
(key) tokens, the distances q - k and the attending (query) tokens:

    to "<|endoftext|>" (9); offset 1 (4); from " the" (2)

The text is both the explanation a reader sees and the model the simulator runs: the predicted
activation at a token is the weight of the token plus the weight of the token before it (for a
pair, the weights of its key token, its offset and its query token). Any explanation in this form
can be simulated, so a control (another component's explanation scored on this one) needs no
model either.

How the weights are chosen (`explain_baseline`): activations are rescaled to 0-10 and clipped at
0; each token's weight is its mean activation over the explanation excerpts, and the tokens kept
are those that explain most of the squared activation (count x mean², the drop in squared error
when that token's mean is predicted instead of 0), at most MAX_ITEMS; then the same for the
preceding token on what the tokens left unexplained. For heads the same for key tokens, offsets
and query tokens, the kind that explains most first. Deterministic, a few milliseconds per component.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from neuron_explainer.datasets.records import ActivationRecord, is_per_pair

PROMPT_VERSION = "baseline-1"
MAX_ITEMS = {"tokens": 10, "after": 5, "to": 5, "offset": 3, "from": 5}
TOKEN_SECTIONS = ("tokens", "after")
HEAD_SECTIONS = ("to", "offset", "from")
NO_ACTIVITY = "never active on the excerpts shown"


@dataclass
class BaselineExplanation:
    """Section name -> {token (or offset) -> weight 1-10}, in the order written."""

    sections: dict[str, dict[str | int, int]] = field(default_factory=dict)

    def format(self) -> str:
        parts = []
        for name, items in self.sections.items():
            if items:
                listed = ", ".join(
                    f"{key if isinstance(key, int) else json.dumps(key)} ({weight})"
                    for key, weight in items.items()
                )
                parts.append(f"{name} {listed}")
        return "; ".join(parts) if parts else NO_ACTIVITY

    @classmethod
    def parse(cls, text: str) -> BaselineExplanation | None:
        """The explanation written by `format`, or None for text in any other form."""
        if text.strip() == NO_ACTIVITY:
            return cls()
        sections: dict[str, dict[str | int, int]] = {}
        pos, name = 0, None
        while pos < len(text):
            m = _ITEM.match(text, pos)
            if m is None:
                return None
            name = m.group("section") or name
            if name is None or (m.group("sep") == "" and m.end() < len(text)):
                return None
            raw = m.group("key")
            key: str | int = json.loads(raw)
            if not isinstance(key, (str, int)) or (name == "offset") != isinstance(key, int):
                return None
            sections.setdefault(name, {})[key] = int(m.group("weight"))
            if m.group("sep") == ";":
                name = None
            pos = m.end()
        return cls(sections) if sections else None


_ITEM = re.compile(
    r"\s*(?:(?P<section>tokens|after|to|offset|from)\s+)?"
    r'(?P<key>"(?:[^"\\]|\\.)*"|\d+)\s*\((?P<weight>\d+)\)\s*(?P<sep>[,;]?)\s*'
)


def _scaled(excerpts: Sequence[ActivationRecord], scale: float) -> np.ndarray:
    if not excerpts:
        return np.zeros(0)
    acts = np.concatenate([np.asarray(r.activations, dtype=np.float64) for r in excerpts])
    return np.clip(acts / scale, 0.0, 1.0) * 10.0


def _pick(
    keys: np.ndarray, values: np.ndarray, limit: int, valid: np.ndarray | None = None
) -> dict[int, int]:
    """{code: weight} for the `limit` codes whose mean value explains most (count x mean²), with
    weights (rounded means) of at least 1. `keys` are codes 0..K-1, one per value."""
    if valid is not None:
        keys, values = keys[valid], values[valid]
    if keys.size == 0:
        return {}
    counts = np.bincount(keys)
    sums = np.bincount(keys, weights=values, minlength=counts.size)
    means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    gain = np.where(np.rint(means) >= 1, counts * means**2, 0.0)
    order = np.lexsort((np.arange(gain.size), -gain))[:limit]  # ties: the lower code
    return {int(c): int(min(10, np.rint(means[c]))) for c in order if gain[c] > 0}


def _lookup(weights: dict[int, int], size: int) -> np.ndarray:
    table = np.zeros(size)
    for c, w in weights.items():
        table[c] = w
    return table


def _gain(keys: np.ndarray, values: np.ndarray, weights: dict[int, int]) -> float:
    """How much predicting `weights` lowers the squared error of `values`."""
    predicted = _lookup(weights, int(keys.max()) + 1)[keys] if keys.size else np.zeros(0)
    return float((values**2).sum() - ((values - predicted) ** 2).sum())


def _codes(tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct tokens, each token's code)."""
    vocab, codes = np.unique(np.array(tokens, dtype=object), return_inverse=True)
    return vocab, codes.astype(np.int64)


def explain_baseline(
    family: str, excerpts: Sequence[ActivationRecord], scale: float | None = None
) -> str:
    """The baseline explanation of a component from its explanation excerpts; `scale` is the
    activation shown as 10 (default: the largest activation in the excerpts)."""
    excerpts = [r for r in excerpts if r.tokens]
    if scale is None:
        scale = max((max(r.activations) for r in excerpts if r.activations), default=0.0)
    if not excerpts or not scale > 0:
        return NO_ACTIVITY
    if is_per_pair(family):
        return _explain_head(excerpts, scale).format()
    tokens = [t for r in excerpts for t in r.tokens]
    vocab, codes = _codes(tokens)
    a = _scaled(excerpts, scale)
    token_weights = _pick(codes, a, MAX_ITEMS["tokens"])
    residual = a - _lookup(token_weights, len(vocab))[codes]
    # The token before each position, within its excerpt (none before an excerpt's first token).
    starts = np.cumsum([0] + [len(r.tokens) for r in excerpts])[:-1]
    first = np.zeros(len(tokens), dtype=bool)
    first[starts] = True
    prev = np.roll(codes, 1)
    after_weights = _pick(prev, residual, MAX_ITEMS["after"], valid=~first)
    return BaselineExplanation(
        {
            "tokens": {str(vocab[c]): w for c, w in token_weights.items()},
            "after": {str(vocab[c]): w for c, w in after_weights.items()},
        }
    ).format()


def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(query, key) of each pair of an n-token window, row by row over the lower triangle."""
    return np.tril_indices(n)


def _explain_head(excerpts: Sequence[ActivationRecord], scale: float) -> BaselineExplanation:
    vocab, codes = _codes([t for r in excerpts for t in r.tokens])
    q_codes, k_codes, offsets = [], [], []
    start = 0
    for r in excerpts:
        q, k = _pairs(len(r.tokens))
        q_codes.append(codes[start + q])
        k_codes.append(codes[start + k])
        offsets.append(q - k)
        start += len(r.tokens)
    qc, kc, off = np.concatenate(q_codes), np.concatenate(k_codes), np.concatenate(offsets)
    residual = _scaled(excerpts, scale)
    features = {"to": kc, "offset": off, "from": qc}
    chosen: dict[str, dict[int, int]] = {}
    # Greedy over the three kinds of feature: at each round the one that explains most of what is
    # left, so a previous-token head is "offset 1" and not a list of the tokens it happened to see.
    while len(chosen) < len(features):
        best_name, best_gain, best_pick = "", -1.0, dict[int, int]()
        for name, keys in features.items():
            if name in chosen:
                continue
            picked = _pick(keys, residual, MAX_ITEMS[name])
            gain = _gain(keys, residual, picked)
            if gain > best_gain:
                best_name, best_gain, best_pick = name, gain, picked
        keys = features[best_name]
        chosen[best_name] = best_pick
        residual = residual - _lookup(best_pick, int(keys.max()) + 1)[keys]
    sections: dict[str, dict[str | int, int]] = {
        name: {(c if name == "offset" else str(vocab[c])): w for c, w in picked.items()}
        for name, picked in chosen.items()
    }
    return BaselineExplanation(sections)


def simulate_baseline(
    explanation: str, family: str, excerpts: Sequence[ActivationRecord]
) -> list[np.ndarray]:
    """Predicted activations (0-10 scale) for each excerpt, one per token (heads: per token
    pair, in the records' order). Text not in the baseline's form predicts 0 everywhere."""
    parsed = BaselineExplanation.parse(explanation) or BaselineExplanation()
    s = parsed.sections
    out = []
    for r in excerpts:
        n = len(r.tokens)
        if is_per_pair(family):
            q, k = _pairs(n)
            to = np.array([s.get("to", {}).get(t, 0) for t in r.tokens], dtype=np.float64)
            frm = np.array([s.get("from", {}).get(t, 0) for t in r.tokens], dtype=np.float64)
            offset_weights = s.get("offset", {})
            off = np.array([offset_weights.get(d, 0) for d in range(n)], dtype=np.float64)
            out.append(to[k] + frm[q] + off[q - k])
        else:
            tokens, after = s.get("tokens", {}), s.get("after", {})
            out.append(
                np.array(
                    [
                        tokens.get(t, 0) + (after.get(r.tokens[i - 1], 0) if i else 0)
                        for i, t in enumerate(r.tokens)
                    ],
                    dtype=np.float64,
                )
            )
    return out
