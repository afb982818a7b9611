"""The no-LLM baseline on components whose behaviour is known: it names what they fire on, its own
simulator then scores near 1 on held-out excerpts, another component's explanation does not;
explanations are scored only on excerpts they were not written from."""

from __future__ import annotations

import numpy as np
import pytest

from neuron_explainer.datasets import ActivationRecord, ComponentRecord
from neuron_explainer.explanations import (
    BaselineExplainer,
    BaselineSimulator,
    explain_and_score,
    score_explanation,
    split_excerpts,
)
from neuron_explainer.explanations.baseline import NO_ACTIVITY, BaselineExplanation

WORDS = [" the", " cat", " dog", " sat", " on", " mat", " a", " ran", ".", " and"]


def neuron_record(fires_on: str, seed: int, after: str | None = None) -> ComponentRecord:
    """A neuron firing 8 on `fires_on`, 3 on any token after `after`, 0 elsewhere (both add);
    windows of random words, its top excerpts the windows with the most activation."""
    rng = np.random.default_rng(seed)
    windows = []
    for w in range(300):
        tokens = [str(t) for t in rng.choice(WORDS, 16)]
        acts = [
            (8.0 if t == fires_on else 0.0) + (3.0 if i and tokens[i - 1] == after else 0.0)
            for i, t in enumerate(tokens)
        ]
        windows.append(ActivationRecord(tokens, acts, w))
    by_score = sorted(windows, key=lambda r: (-max(r.activations), r.window_index))
    picks = rng.permutation(300)
    return ComponentRecord(
        family="mlp_neuron",
        layer=0,
        index=seed,
        max_activation=max(by_score[0].activations),
        most_positive_activation_records=by_score[:20],
        random_sample=[windows[i] for i in picks[:20]],
        random_sample_by_quantile=[
            [windows[i] for i in picks[20 + 5 * b : 25 + 5 * b]] for b in range(5)
        ],
        quantile_boundaries=[0.0, 1.0, 2.0, 3.0],
        mean=0.0,
        variance=1.0,
        skewness=0.0,
        kurtosis=0.0,
    )


def head_record(offset: int, n: int = 12) -> ComponentRecord:
    """A head writing 1 on every pair (q, q - offset), 0 elsewhere."""
    rng = np.random.default_rng(offset)
    records = []
    for w in range(60):
        tokens = [str(t) for t in rng.choice(WORDS, n)]
        q, k = np.tril_indices(n)
        records.append(ActivationRecord(tokens, ((q - k) == offset).astype(float).tolist(), w))
    return ComponentRecord(
        "attention_head", 1, 3, 1.0, records[:20], records[20:40],
        [records[40 + 4 * b : 44 + 4 * b] for b in range(5)], [0.0, 0.1, 0.2, 0.3],
        0.0, 1.0, 0.0, 0.0,
    )  # fmt: skip


def test_names_the_token_and_its_context_and_scores_high() -> None:
    record = neuron_record(" cat", seed=1, after=" the")
    scored = explain_and_score(record, BaselineExplainer(), BaselineSimulator())
    parsed = BaselineExplanation.parse(scored.explanation)
    assert parsed is not None
    assert next(iter(parsed.sections["tokens"])) == " cat"
    assert next(iter(parsed.sections["after"])) == " the"
    assert scored.explanation.startswith('tokens " cat" (')
    assert scored.scores.ev_correlation_score is not None
    assert scored.scores.ev_correlation_score > 0.95


def test_another_components_explanation_is_a_poor_control() -> None:
    cat, dog = neuron_record(" cat", seed=2), neuron_record(" dog", seed=3)
    own = explain_and_score(cat, BaselineExplainer(), BaselineSimulator()).scores
    dog_text = BaselineExplainer().explain(dog, split_excerpts(dog).explain)
    control = score_explanation(cat, dog_text, BaselineSimulator(), split_excerpts(cat).score)
    assert own.ev_correlation_score is not None and own.ev_correlation_score > 0.95
    assert control.scores.ev_correlation_score is None or control.scores.ev_correlation_score < 0.3


def test_scored_excerpts_are_held_out() -> None:
    record = neuron_record(" cat", seed=4)
    # A random-sample window that is also a top or quantile window must not be scored twice or
    # scored after being shown.
    record.random_sample.append(record.most_positive_activation_records[0])
    record.random_sample_by_quantile[0].append(record.most_positive_activation_records[1])  # type: ignore[index]
    split = split_excerpts(record)
    shown = {r.window_index for r in split.explain}
    scored = [r.window_index for r in split.score]
    assert shown.isdisjoint(scored)
    assert len(scored) == len(set(scored))
    assert split.score_top == record.most_positive_activation_records[1::2]
    assert record.most_positive_activation_records[0] in split.explain


def test_attention_head_offset() -> None:
    record = head_record(offset=1)
    scored = explain_and_score(record, BaselineExplainer(), BaselineSimulator())
    parsed = BaselineExplanation.parse(scored.explanation)
    assert parsed is not None and parsed.sections["offset"] == {1: 10}
    assert scored.scores.roc_auc_score == 1.0
    assert scored.scores.ev_correlation_score == pytest.approx(1.0)
    other = BaselineExplainer().explain(head_record(3), split_excerpts(head_record(3)).explain)
    control = score_explanation(record, other, BaselineSimulator(), split_excerpts(record).score)
    assert control.scores.roc_auc_score is not None and control.scores.roc_auc_score < 0.6


def test_format_round_trip_and_foreign_text() -> None:
    text = 'tokens " \\"q\\"" (10), "a;b" (3); after "\\n" (2)'
    parsed = BaselineExplanation.parse(text)
    assert parsed is not None and parsed.format() == text
    assert parsed.sections == {"tokens": {' "q"': 10, "a;b": 3}, "after": {"\n": 2}}
    assert BaselineExplanation.parse("mentions of marriage") is None
    # Text in another form simulates to zeros: no score rather than an error.
    record = neuron_record(" cat", seed=5)
    scored = score_explanation(
        record, "mentions of cats", BaselineSimulator(), record.random_sample
    )
    assert scored.scores.ev_correlation_score is None


def test_dead_component() -> None:
    record = neuron_record(" none of these", seed=6)
    scored = explain_and_score(record, BaselineExplainer(), BaselineSimulator())
    assert scored.explanation == NO_ACTIVITY
    assert scored.scores.ev_correlation_score is None
