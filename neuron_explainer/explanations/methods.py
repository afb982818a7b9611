"""Explainers, simulators and the method that names a pair of them.

An *explainer* writes a one-line explanation of a component from its explanation excerpts; a
*simulator* reads an explanation and predicts the component's activation at every token (pair) of
excerpts it has not seen; the *score* compares those predictions with the true activations
(scoring.py) on held-out excerpts (excerpts.py). A *method* is what a stored explanation was made
with: explainer, simulator, their model and the prompt version; a store keeps the results of any
number of methods side by side.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from neuron_explainer.datasets.records import ActivationRecord, ComponentRecord, is_per_pair
from neuron_explainer.explanations import baseline
from neuron_explainer.explanations.excerpts import ExcerptSplit, split_excerpts
from neuron_explainer.explanations.scoring import Scores, correlation_scores, head_scores


class ExplanationError(Exception):
    """An explainer or simulator could not do its work for one component (malformed model
    output, say): that component is recorded as failed with this reason, and a batch goes on."""


class BackendUnreachableError(Exception):
    """The model endpoint cannot be reached at all: a batch stops (nothing more is written)."""


@dataclass(frozen=True)
class Method:
    """What an explanation was made with. `model` is '' for the baseline."""

    explainer: str
    simulator: str
    model: str
    prompt_version: str

    def to_json(self) -> dict[str, str]:
        return {
            "explainer": self.explainer,
            "simulator": self.simulator,
            "model": self.model,
            "promptVersion": self.prompt_version,
        }

    def label(self) -> str:
        parts = [self.explainer, self.simulator] + ([self.model] if self.model else [])
        return "/".join(parts) + f" ({self.prompt_version})"


BASELINE_METHOD = Method("baseline", "baseline", "", baseline.PROMPT_VERSION)


class Explainer(Protocol):
    def explain(self, record: ComponentRecord, excerpts: Sequence[ActivationRecord]) -> str: ...


class Simulator(Protocol):
    def simulate(
        self, explanation: str, family: str, excerpts: Sequence[ActivationRecord]
    ) -> list[np.ndarray]: ...


class BaselineExplainer:
    def explain(self, record: ComponentRecord, excerpts: Sequence[ActivationRecord]) -> str:
        return baseline.explain_baseline(record.family, excerpts)


class BaselineSimulator:
    def simulate(
        self, explanation: str, family: str, excerpts: Sequence[ActivationRecord]
    ) -> list[np.ndarray]:
        return baseline.simulate_baseline(explanation, family, excerpts)


@dataclass(frozen=True)
class ExcerptLimits:
    """How many excerpts of each group an explainer sees and a simulator is scored on (None: all
    of them); LLM methods use few, as their prompts and calls cost."""

    explain_top: int | None = None
    score_top: int | None = None
    score_random: int | None = None
    with_quantiles: bool = True

    def split(self, record: ComponentRecord) -> ExcerptSplit:
        return split_excerpts(
            record,
            max_explain_top=self.explain_top,
            max_score_top=self.score_top,
            max_score_random=self.score_random,
            with_quantiles=self.with_quantiles,
        )


ALL_EXCERPTS = ExcerptLimits()


ExcerptGroup = Literal["top", "random"]


@dataclass(frozen=True)
class ScoredExcerpt:
    """One scored excerpt: its tokens, the component's true activations and the simulator's
    predictions at the same positions (per token; heads: per token pair (q, k <= q), row by row).
    `group` says whether it is a held-out top-activating excerpt or a random one (None: the
    excerpts were given without their split)."""

    tokens: list[str]
    activations: list[float]
    simulated: list[float]
    group: ExcerptGroup | None


@dataclass(frozen=True)
class Scored:
    """A component's explanation, its scores, and what they were computed on: `scored` with
    the simulator's `predicted` activations; the first `n_top` are held-out top-activating
    excerpts and the rest random ones (None: not known)."""

    explanation: str
    scores: Scores
    scored: list[ActivationRecord]
    predicted: list[np.ndarray]
    n_top: int | None = None

    def excerpts(self) -> list[ScoredExcerpt]:
        """The scored excerpts with their true and simulated activations, in scoring order."""
        out = []
        for i, (record, predicted) in enumerate(zip(self.scored, self.predicted, strict=True)):
            group: ExcerptGroup | None = None
            if self.n_top is not None:
                group = "top" if i < self.n_top else "random"
            out.append(
                ScoredExcerpt(
                    list(record.tokens),
                    [float(a) for a in record.activations],
                    [float(p) for p in np.asarray(predicted, dtype=np.float64)],
                    group,
                )
            )
        return out


def score_explanation(
    record: ComponentRecord,
    explanation: str,
    simulator: Simulator,
    excerpts: Sequence[ActivationRecord] | ExcerptSplit,
) -> Scored:
    """Simulate `explanation` on `excerpts` (held-out ones; given as a split, its scored
    excerpts, which are then known as top or random) and score it against the record's true
    activations there."""
    n_top = len(excerpts.score_top) if isinstance(excerpts, ExcerptSplit) else None
    scored = excerpts.score if isinstance(excerpts, ExcerptSplit) else list(excerpts)
    predicted = simulator.simulate(explanation, record.family, scored)
    if len(predicted) != len(scored) or any(
        len(p) != len(r.activations) for p, r in zip(predicted, scored, strict=False)
    ):
        raise ExplanationError("the simulator returned the wrong number of predictions")
    true = [np.asarray(r.activations, dtype=np.float64) for r in scored]
    if is_per_pair(record.family):
        scores = head_scores(true, predicted, record.max_activation)
    else:
        scores = correlation_scores(true, predicted)
    return Scored(explanation, scores, scored, predicted, n_top)


def explain_and_score(
    record: ComponentRecord,
    explainer: Explainer,
    simulator: Simulator,
    limits: ExcerptLimits = ALL_EXCERPTS,
) -> Scored:
    """Explain `record` from its explanation excerpts, then score that explanation on its
    held-out excerpts (never those it was written from)."""
    split = limits.split(record)
    explanation = explainer.explain(record, split.explain)
    return score_explanation(record, explanation, simulator, split)


def method_json(method: Method) -> str:
    return json.dumps(method.to_json(), sort_keys=True)


Status = Literal["ok", "failed"]
