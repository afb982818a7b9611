"""The text-only simulator: for endpoints that answer without log-probabilities.

The "all at once" simulator (llm.py) reads the model's next-token distribution at a placeholder
after every token, which needs prompt log-probabilities (`echo` + `logprobs`). Many endpoints give
only text; there the model is asked to *write* each token of the excerpt followed by a tab and its
predicted activation, an integer 0-10, one line per token, and the reply is parsed back:

- a line is `token<TAB>value` (also `token: value`, `token = value`, `token -> value`,
  `token value`, or the value alone); `<start>`/`<end>` and lines without a value in 0-10 are
  ignored;
- lines are aligned with the excerpt's tokens by their token text (difflib's longest matching
  blocks over the stripped texts), so extra, missing or repeated lines only lose the tokens they
  concern; a reply with exactly one valued line per token is read in order even when it spells
  the tokens differently;
- tokens the reply gives no value for are predicted 0, unless fewer than `MIN_COVERAGE` of the
  tokens got one: then the excerpt cannot be simulated, an ExplanationError with the reason, so
  that component is recorded as failed and a batch goes on.

Tokens are shown with newlines and tabs escaped (`\\n`, `\\t`), so each is one line. Heads are
simulated per token, each pair getting its attended (key) token's value, as in llm.py.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import numpy as np

from neuron_explainer.datasets.records import ActivationRecord
from neuron_explainer.explanations.llm import LEAD, Backend, in_record_layout
from neuron_explainer.explanations.methods import BackendUnreachableError, ExplanationError

SIMULATOR_NAME = "text"
# Below this fraction of an excerpt's tokens with a value in the reply, the excerpt fails.
MIN_COVERAGE = 0.5

SIM_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a "
    "short document. Given an explanation of what a neuron looks for, predict how strongly it "
    "activates on each token of a document.\n\n"
    "Write every token of the document on its own line, in order, followed by a tab and the "
    "predicted activation: an integer from 0 (not at all) to 10 (the strongest match). Most "
    "tokens are 0. Write nothing else."
)
# One worked example, so that small models see the answer's form.
EXAMPLE_EXPLANATION = "years written as four digits"
EXAMPLE_TOKENS = ["In", " 1969", ",", " the", " crew", " landed"]
EXAMPLE_VALUES = [0, 10, 0, 0, 0, 0]

_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")
_LINE = re.compile(r"^(?P<token>.*?)(?:\t+|\s*(?:->|=>|[:=|])\s*|\s+)(?P<value>\d+(?:\.\d+)?)\s*$")


def show_token(token: str) -> str:
    """A token as the prompt shows it: one line (newlines, tabs and backslashes escaped)."""
    return (
        token.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    )


def _lines(tokens: Sequence[str], values: Sequence[int] | None = None) -> str:
    if values is None:
        return "\n".join(show_token(t) for t in tokens)
    return "\n".join(f"{show_token(t)}\t{v}" for t, v in zip(tokens, values, strict=True))


def simulation_messages(explanation: str, tokens: Sequence[str]) -> list[tuple[str, str]]:
    """The chat messages asking for one excerpt's per-token activations."""

    def ask(expl: str, toks: Sequence[str]) -> str:
        return (
            f"Explanation of neuron behavior: {LEAD} {expl}\n\n"
            f"Document, one token per line:\n<start>\n{_lines(toks)}\n<end>"
        )

    return [
        ("system", SIM_SYSTEM),
        ("user", ask(EXAMPLE_EXPLANATION, EXAMPLE_TOKENS)),
        ("assistant", f"<start>\n{_lines(EXAMPLE_TOKENS, EXAMPLE_VALUES)}\n<end>"),
        ("user", ask(explanation, tokens)),
    ]


def parse_line(line: str) -> tuple[str, float] | None:
    """(token text, value) of one reply line, or None when it holds no value in 0-10."""
    text = line.rstrip("\r\n")
    if text.strip().lower() in ("<start>", "<end>", ""):
        return None
    token, tab, last = text.rpartition("\t")
    if tab and _NUMBER.match(last.strip()):  # the asked-for form first: a token may hold ':'
        value = float(last.strip())
    elif _NUMBER.match(text.strip()):  # a value alone (the tokens not repeated)
        token, value = "", float(text.strip())
    else:
        m = _LINE.match(text)
        if m is None:
            return None
        token, value = m.group("token"), float(m.group("value"))
    if value > 10:
        return None
    return token.strip().strip("'\"`"), value


def parse_simulation(reply: str, tokens: Sequence[str]) -> np.ndarray:
    """The predicted activation (0-10) of every token of `tokens` from a text reply (module
    docstring). ExplanationError with the reason when too few tokens got a value."""
    parsed = [p for p in (parse_line(line) for line in reply.splitlines()) if p is not None]
    n = len(tokens)
    out = np.zeros(n, dtype=np.float64)
    if n == 0:
        return out
    shown = [show_token(t).strip() for t in tokens]
    given = [tok for tok, _ in parsed]
    matcher = difflib.SequenceMatcher(None, shown, given, autojunk=False)
    blocks = [b for b in matcher.get_matching_blocks() if b.size]
    covered = sum(b.size for b in blocks)
    if len(parsed) == n:
        # One valued line per token: read in order, unless aligning by text matches more.
        same = sum(a == b for a, b in zip(shown, given, strict=True))
        if same >= covered:
            return np.array([v for _, v in parsed], dtype=np.float64)
    for block in blocks:
        for k in range(block.size):
            out[block.a + k] = parsed[block.b + k][1]
    if covered < MIN_COVERAGE * n:
        raise ExplanationError(
            f"the text simulator's reply gives values for {covered} of the excerpt's {n} tokens "
            f"({len(parsed)} valued lines): {reply[:200]!r}"
        )
    return out


class TextSimulator:
    """Simulates by asking the model to write each token's activation as text (no
    log-probabilities needed); greedy, so deterministic on a deterministic backend."""

    def __init__(self, backend: Backend, tokens_per_line: int = 6) -> None:
        self.backend = backend
        self.tokens_per_line = tokens_per_line  # the reply's budget: this many per excerpt token

    def _per_token(self, explanation: str, tokens: Sequence[str]) -> np.ndarray:
        messages = simulation_messages(explanation, tokens)
        reply = self.backend.chat(messages, self.tokens_per_line * len(tokens) + 16)
        return parse_simulation(reply, tokens)

    def simulate(
        self, explanation: str, family: str, excerpts: Sequence[ActivationRecord]
    ) -> list[np.ndarray]:
        return [in_record_layout(family, self._per_token(explanation, r.tokens)) for r in excerpts]


def supports_logprobs(backend: Backend) -> bool:
    """Whether the backend answers prompt log-probabilities (what the all-at-once simulator
    needs): a short probe prompt must come back with a distribution at its tokens."""
    try:
        got = backend.prompt_logprobs("The cat sat on the mat.", 1)
    except (ExplanationError, BackendUnreachableError):  # no /completions at all: a 404
        return False
    return any(top for _, top in got)
