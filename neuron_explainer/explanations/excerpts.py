"""Which excerpts of a component an explanation is written from and which it is scored on.

A collated record holds the top-activating excerpts (best first), a random sample and random
samples by score quantile (datasets.md). An explanation is written from every other top excerpt
(the 1st, 3rd, 5th, ...) and the quantile samples (which show the component at every level of
activity, weak ones included); it is scored on the other top excerpts (2nd, 4th, ...) and the
random sample, so the score is always on held-out excerpts: a random-sample window that is also an
explanation excerpt is dropped from the scored set, and a quantile-sample window that is a held-out
top excerpt is dropped from the explanation excerpts.
"""

from __future__ import annotations

from dataclasses import dataclass

from neuron_explainer.datasets.records import ActivationRecord, ComponentRecord


@dataclass(frozen=True)
class ExcerptSplit:
    explain: list[ActivationRecord]  # what the explainer sees
    score_top: list[ActivationRecord]  # held-out top-activating excerpts
    score_random: list[ActivationRecord]  # held-out random excerpts

    @property
    def score(self) -> list[ActivationRecord]:
        """Every scored excerpt: the held-out top ones, then the random ones."""
        return self.score_top + self.score_random


def _key(record: ActivationRecord) -> object:
    # TDB's JSON records have no window index: the tokens identify the window instead.
    return record.window_index if record.window_index is not None else tuple(record.tokens)


def split_excerpts(
    record: ComponentRecord,
    max_explain_top: int | None = None,
    max_score_top: int | None = None,
    max_score_random: int | None = None,
    with_quantiles: bool = True,
) -> ExcerptSplit:
    """The explanation excerpts and the held-out scored excerpts of `record` (module docstring);
    the `max_*` arguments keep the first so many of each group (an LLM prompt holds few)."""
    top = record.most_positive_activation_records
    explain_top = top[0::2][:max_explain_top]
    score_top = top[1::2][:max_score_top]
    held_out = {_key(r) for r in score_top}
    explain = list(explain_top)
    if with_quantiles:  # a quantile sample may hold a held-out top window: left out here
        for group in record.random_sample_by_quantile or []:
            explain += [r for r in group if _key(r) not in held_out]
    seen = {_key(r) for r in explain} | {_key(r) for r in score_top}
    score_random = []
    for r in record.random_sample:
        if _key(r) not in seen:
            seen.add(_key(r))
            score_random.append(r)
    return ExcerptSplit(explain, list(score_top), score_random[:max_score_random])
