"""Scorers with an LLM judge, in the manner of EleutherAI's delphi: *detection* and *fuzzing*.

Both read an explanation and held-out excerpts of the component (the top-activating excerpts no
explanation was written from and random ones: `ALL_EXCERPTS.split`, held out for every method),
ask a judge model one yes/no question per item, and count the right answers:

- **Detection.** Items are held-out top-activating excerpts (label: active) and random excerpts
  whose largest activation is below `INACTIVE_FRACTION` of the component's maximum (label:
  inactive), at most `n` of each. The judge sees the explanation and one excerpt and says whether
  the component fires in it. Scores: accuracy and balanced accuracy (the mean of the true-positive
  and true-negative rates).
- **Fuzzing.** Items are held-out top-activating excerpts, each shown twice: once with its active
  tokens marked `<<like this>>` (those at or above `MARK_FRACTION` of the excerpt's largest
  activation; label: matches) and once with as many other tokens marked at random (label: does
  not match). The judge says whether the marked tokens are those the explanation describes.
  Scores: accuracy and balanced accuracy.

Sampling is deterministic: which items and which random tokens depend only on (seed, family,
layer, index, scorer), and items are asked in a seeded shuffled order. A reply is read as its
first word among yes/no/true/false (any case, any punctuation); a reply with none counts as a
wrong answer and is counted in `n_unanswered`; when no reply of a node can be read, the scorer
fails for that node (ExplanationError with the reason) and a batch goes on. Attention heads are
not scored this way (their excerpts hold token pairs).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from neuron_explainer.datasets.records import ActivationRecord, ComponentRecord, is_per_pair
from neuron_explainer.explanations.llm import Backend
from neuron_explainer.explanations.methods import ALL_EXCERPTS, ExplanationError

JUDGE_PROMPT_VERSION = "delphi-1"
Scorer = Literal["detection", "fuzzing"]
SCORERS: tuple[Scorer, ...] = ("detection", "fuzzing")
# A random excerpt is a detection negative when its largest activation is below this fraction
# of the component's maximum.
INACTIVE_FRACTION = 0.1
# Fuzzing marks the tokens at or above this fraction of the excerpt's largest activation.
MARK_FRACTION = 0.5
DEFAULT_N = 5  # items of each label at most

DETECTION_SYSTEM = (
    "You check explanations of features of a neural network. A feature fires on some tokens of "
    "a text. You get an explanation of a feature and a text excerpt, and answer whether the "
    "feature, as explained, fires anywhere in the excerpt. Answer with one word: yes or no."
)
FUZZING_SYSTEM = (
    "You check explanations of features of a neural network. A feature fires on some tokens of "
    "a text. You get an explanation of a feature and a text excerpt in which some tokens are "
    "marked <<like this>>. Answer whether the marked tokens are the ones the feature, as "
    "explained, fires on. Answer with one word: yes or no."
)


@dataclass(frozen=True)
class JudgeItem:
    """One question: the text the judge sees and the right answer."""

    text: str
    label: bool


@dataclass(frozen=True)
class JudgeResult:
    """One scorer's result on one component."""

    scorer: Scorer
    accuracy: float
    balanced_accuracy: float | None  # None without items of both labels
    n_items: int
    n_unanswered: int


def _rng(seed: int, record: ComponentRecord, scorer: str) -> np.random.Generator:
    key = f"{seed}/{record.family}/{record.layer}/{record.index}/{scorer}".encode()
    return np.random.default_rng(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest()))


def _text(tokens: Sequence[str], marked: set[int] | None = None) -> str:
    marked = marked or set()
    return "".join(f"<<{t}>>" if i in marked else t for i, t in enumerate(tokens))


def _check_family(record: ComponentRecord) -> None:
    if is_per_pair(record.family):
        raise ExplanationError(
            f"{record.family}: detection and fuzzing score per-token families only (a head's "
            "excerpts hold token pairs)"
        )


def detection_items(record: ComponentRecord, n: int = DEFAULT_N, seed: int = 0) -> list[JudgeItem]:
    """Up to `n` held-out top-activating excerpts (active) and `n` random ones below
    INACTIVE_FRACTION of the maximum (inactive), drawn and shuffled with the seed."""
    _check_family(record)
    split = ALL_EXCERPTS.split(record)
    rng = _rng(seed, record, "detection")
    threshold = INACTIVE_FRACTION * record.max_activation
    positives = [r for r in split.score_top if r.activations and max(r.activations) > 0]
    negatives = [r for r in split.score_random if r.activations and max(r.activations) < threshold]
    if not positives or not negatives:
        raise ExplanationError(
            f"detection needs held-out active and inactive excerpts; this component has "
            f"{len(positives)} and {len(negatives)}"
        )
    chosen: list[tuple[ActivationRecord, bool]] = []
    for group, label in ((positives, True), (negatives, False)):
        picks = rng.permutation(len(group))[:n]
        chosen += [(group[int(i)], label) for i in sorted(picks)]
    order = rng.permutation(len(chosen))
    return [JudgeItem(_text(chosen[i][0].tokens), chosen[i][1]) for i in order]


def fuzzing_items(record: ComponentRecord, n: int = DEFAULT_N, seed: int = 0) -> list[JudgeItem]:
    """Up to `n` held-out top-activating excerpts, each with its active tokens marked (matches)
    and with as many random other tokens marked (does not match), shuffled with the seed."""
    _check_family(record)
    rng = _rng(seed, record, "fuzzing")
    items: list[JudgeItem] = []
    for r in ALL_EXCERPTS.split(record).score_top:
        if len(items) >= 2 * n:
            break
        acts = np.asarray(r.activations, dtype=np.float64)
        if acts.size == 0 or not acts.max() > 0:
            continue
        active = np.flatnonzero(acts >= MARK_FRACTION * acts.max())
        others = np.setdiff1d(np.arange(acts.size), active)
        if others.size < active.size:
            continue  # too few other tokens to mark as many at random
        decoys = rng.choice(others, size=active.size, replace=False)
        items.append(JudgeItem(_text(r.tokens, {int(i) for i in active}), True))
        items.append(JudgeItem(_text(r.tokens, {int(i) for i in decoys}), False))
    if not items:
        raise ExplanationError("fuzzing needs held-out active excerpts; this component has none")
    return [items[int(i)] for i in rng.permutation(len(items))]


def question(scorer: Scorer, explanation: str, item: JudgeItem) -> list[tuple[str, str]]:
    """The chat messages asking the judge about one item."""
    if scorer == "detection":
        ask = "Does the feature fire anywhere in this excerpt?"
        system = DETECTION_SYSTEM
    else:
        ask = "Are the marked tokens the ones the feature fires on?"
        system = FUZZING_SYSTEM
    user = (
        f'Explanation of the feature: {explanation}\n\nExcerpt:\n"""{item.text}"""\n\n'
        f"{ask} Answer yes or no."
    )
    return [("system", system), ("user", user)]


_ANSWER = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)


def parse_answer(reply: str) -> bool | None:
    """The judge's yes (True) or no (False): the first of yes/no/true/false in the reply, or
    None when it holds none."""
    m = _ANSWER.search(reply)
    if m is None:
        return None
    return m.group(1).lower() in ("yes", "true")


def score_answers(
    scorer: Scorer, items: Sequence[JudgeItem], answers: Sequence[bool | None]
) -> JudgeResult:
    """Accuracy and balanced accuracy of the answers (None: unreadable, counted wrong)."""
    if len(answers) != len(items) or not items:
        raise ValueError(f"{len(answers)} answers to {len(items)} items")
    right = [a is not None and a == it.label for it, a in zip(items, answers, strict=True)]
    rates = []
    for label in (True, False):
        group = [ok for it, ok in zip(items, right, strict=True) if it.label == label]
        if group:
            rates.append(sum(group) / len(group))
    return JudgeResult(
        scorer,
        accuracy=sum(right) / len(items),
        balanced_accuracy=sum(rates) / 2 if len(rates) == 2 else None,
        n_items=len(items),
        n_unanswered=sum(a is None for a in answers),
    )


class Judge:
    """Asks a backend's model the questions of both scorers (greedy: deterministic)."""

    def __init__(self, backend: Backend, n: int = DEFAULT_N, seed: int = 0, max_tokens: int = 8):
        self.backend = backend
        self.n = n
        self.seed = seed
        self.max_tokens = max_tokens
        self.prompt_version = (
            JUDGE_PROMPT_VERSION
            if (n, seed) == (DEFAULT_N, 0)
            else (f"{JUDGE_PROMPT_VERSION} n={n} seed={seed}")
        )  # what the store records: other samples are other scores

    def items(self, scorer: Scorer, record: ComponentRecord) -> list[JudgeItem]:
        if scorer == "detection":
            return detection_items(record, self.n, self.seed)
        return fuzzing_items(record, self.n, self.seed)

    def score(self, scorer: Scorer, record: ComponentRecord, explanation: str) -> JudgeResult:
        """One scorer's result for one explanation of `record`; ExplanationError when it cannot
        be scored (no suitable excerpts, no readable answer)."""
        items = self.items(scorer, record)
        replies = [
            self.backend.chat(question(scorer, explanation, item), self.max_tokens)
            for item in items
        ]
        answers = [parse_answer(r) for r in replies]
        if all(a is None for a in answers):
            raise ExplanationError(
                f"{scorer}: none of the judge's {len(replies)} replies says yes or no "
                f"(first: {replies[0][:100]!r})"
            )
        return score_answers(scorer, items, answers)


@dataclass(frozen=True)
class JudgeSummary:
    total: int  # (explanation, scorer) pairs selected
    skipped: int  # had a row already (a resumed run)
    scored: int
    failed: int


def judge_store(
    path: str | Path,
    judge: Judge,
    families: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    limit: int | None = None,
    explainers: Sequence[str] | None = None,
    scorers: Sequence[Scorer] = SCORERS,
    chunk: int = 16,
    progress: bool = True,
) -> JudgeSummary:
    """Score every stored explanation (that did not fail; of `explainers`, all by default) of
    the store's per-token components (of `families`, `layers`, a sample of `limit` components
    as `tdb explain` draws it) with each scorer, writing a row per explanation and scorer into
    explanation_judge_scores. Rows are committed `chunk` explanations at a time and a rerun
    skips those that have one, so an interrupted run resumes. A BackendUnreachableError stops
    the run (committed chunks stay)."""
    from neuron_explainer.datasets.store import DatasetStore
    from neuron_explainer.explanations.batch import sample_components
    from neuron_explainer.explanations.store import (
        ExplanationWriter,
        JudgeScoreRow,
        explanation_rows,
    )
    from neuron_explainer.progress import Progress

    model, version = judge.backend.name, judge.prompt_version
    with DatasetStore(path) as store, ExplanationWriter(path) as writer:
        methods = dict(
            writer.conn.execute("SELECT method_id, explainer FROM explanation_methods").fetchall()
        )
        rows = [
            r
            for r in explanation_rows(writer.conn)
            if not is_per_pair(r[0])
            and (families is None or r[0] in families)
            and (layers is None or r[1] in layers)
            and (explainers is None or methods.get(r[3]) in explainers)
        ]
        chosen = set(sample_components(sorted({r[:3] for r in rows}), limit))
        todo_all = [(r, sc) for r in rows if r[:3] in chosen for sc in scorers]
        done = writer.judged(model, version)
        todo = [(r, sc) for r, sc in todo_all if (*r[:4], sc) not in done]
        bar = Progress(
            "judge",
            total=len(todo_all),
            done=len(todo_all) - len(todo),
            enabled=progress,
            unit="scores",
            rate_unit="scores/s",
        )
        scored = failed = 0
        for c in range(0, len(todo), chunk):
            out = []
            for (family, layer, index, method_id, explanation), scorer in todo[c : c + chunk]:
                record = store.record(family, layer, index)
                try:
                    res = judge.score(scorer, record, explanation)
                    row = JudgeScoreRow(
                        family, layer, index, method_id, scorer, model, version,
                        res.accuracy, res.balanced_accuracy, res.n_items, res.n_unanswered,
                    )  # fmt: skip
                    scored += 1
                except ExplanationError as e:
                    row = JudgeScoreRow(
                        family, layer, index, method_id, scorer, model, version,
                        None, None, 0, 0, str(e) or repr(e),
                    )  # fmt: skip
                    failed += 1
                out.append(row)
            writer.write_judged(out)
            bar.update(len(todo_all) - len(todo) + c + len(out))
        bar.finish()
    return JudgeSummary(len(todo_all), len(todo_all) - len(todo), scored, failed)
