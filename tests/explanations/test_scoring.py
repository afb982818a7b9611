"""Scorers with known answers: a simulator that returns the true activations scores 1, a constant
one has no score (null), a shuffled one scores about 0; ROC AUC by its definition."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neuron_explainer.explanations import correlation_scores, head_scores, roc_auc


def excerpts(seed: int, n: int = 40, length: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Sparse, skewed activations as a neuron has: mostly ~0, a few large.
    return [np.where(rng.random(length) < 0.1, rng.gamma(2.0, 3.0, length), 0.0) for _ in range(n)]


def test_true_activations_score_one() -> None:
    true = excerpts(0)
    scores = correlation_scores(true, true)
    assert scores.ev_correlation_score == pytest.approx(1.0)
    assert scores.rsquared_score == pytest.approx(1.0)
    assert scores.absolute_dev_explained_score == pytest.approx(1.0)
    # Any positive affine map of the truth is as good a simulation (scores are scale-free).
    scaled = correlation_scores(true, [3 * t + 1 for t in true])
    assert scaled.ev_correlation_score == pytest.approx(1.0)
    assert scaled.absolute_dev_explained_score == pytest.approx(1.0)


def test_constant_prediction_or_constant_truth_has_no_score() -> None:
    true = excerpts(1)
    for predicted, actual in (([np.full(64, 5.0)] * 40, true), (true, [np.zeros(64)] * 40)):
        scores = correlation_scores(actual, predicted)
        assert scores.ev_correlation_score is None
        assert scores.rsquared_score is None
        assert scores.absolute_dev_explained_score is None


def test_shuffled_prediction_scores_about_zero() -> None:
    true = excerpts(2, n=200)
    pooled = np.concatenate(true)
    shuffled = np.random.default_rng(3).permutation(pooled).reshape(200, 64)
    scores = correlation_scores(true, list(shuffled))
    assert scores.ev_correlation_score is not None
    assert abs(scores.ev_correlation_score) < 0.05  # 12,800 values: sd of r ~ 0.009
    assert abs(scores.rsquared_score or 0) < 0.01


def test_pooled_not_mean_of_excerpts() -> None:
    # Each excerpt alone is perfectly anticorrelated, pooled they correlate: pooling is the rule.
    true = [np.array([1.0, 0.0]), np.array([11.0, 10.0])]
    predicted = [np.array([0.0, 1.0]), np.array([10.0, 11.0])]
    r = correlation_scores(true, predicted).ev_correlation_score
    expected = np.corrcoef(np.concatenate(true), np.concatenate(predicted))[0, 1]
    assert r == pytest.approx(expected) and r > 0.9


def test_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        correlation_scores([np.zeros(3)], [np.zeros(4)])


def test_roc_auc_definition() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1], dtype=bool)
    assert roc_auc(labels, labels.astype(float)) == 1.0
    assert roc_auc(labels, -labels.astype(float)) == 0.0
    assert roc_auc(labels, np.zeros(6)) == 0.5  # all tied
    assert roc_auc(np.zeros(6, dtype=bool), np.arange(6.0)) is None
    # Against the pairwise definition on random data with ties.
    rng = np.random.default_rng(4)
    y = rng.random(300) < 0.3
    s = rng.integers(0, 5, 300).astype(float) + y
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert roc_auc(y, s) == pytest.approx(pairwise)


def test_head_scores_label_strong_pairs() -> None:
    true = excerpts(5)
    scores = head_scores(true, true, max_activation=float(np.concatenate(true).max()))
    assert scores.roc_auc_score == 1.0 and scores.best == 1.0
    shuffled = [np.random.default_rng(6).permutation(t) for t in true]
    auc = head_scores(true, shuffled, float(np.concatenate(true).max())).roc_auc_score
    assert auc is not None and abs(auc - 0.5) < 0.1
    assert head_scores(true, true, max_activation=math.nan).roc_auc_score is None
