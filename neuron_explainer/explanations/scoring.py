"""Scores of a simulation: how well predicted activations match the true ones.

For per-token families (MLP neurons, autoencoder latents) the three scores of Bills et al. (2023),
each over all scored excerpts pooled (one vector of true and one of predicted activations, not a
mean of per-excerpt scores):

    ev_correlation_score          Pearson correlation of predicted and true activations
    rsquared_score                1 - Σ(true - a·pred - b)² / Σ(true - mean(true))²  with a, b the
                                  least-squares fit of true on pred (so = correlation², sign kept)
    absolute_dev_explained_score  1 - mean|true - pred'| / mean|true|, pred' = pred rescaled
                                  to the true activations' scale by that least-squares fit

A score is None (JSON null) when it is undefined: constant true activations (a component never
active on the scored excerpts) or constant predictions. For attention heads each scored token pair
is a binary label (its activation is at least `HEAD_LABEL_FRACTION` of the component's maximum) and
the score is the ROC AUC of the predictions against those labels (None without both labels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# A token pair is "strongly attending" when its activation is at least this fraction of the
# head's dataset maximum.
HEAD_LABEL_FRACTION = 0.5


@dataclass(frozen=True)
class Scores:
    """The scores of one simulation; None where undefined."""

    ev_correlation_score: float | None
    rsquared_score: float | None
    absolute_dev_explained_score: float | None
    roc_auc_score: float | None = None

    @property
    def best(self) -> float | None:
        """The headline score: ROC AUC for heads, the correlation otherwise."""
        return self.roc_auc_score if self.roc_auc_score is not None else self.ev_correlation_score


def _pooled(values: Sequence[Sequence[float]] | Sequence[np.ndarray]) -> np.ndarray:
    if len(values) == 0:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values])


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def correlation_scores(
    true: Sequence[Sequence[float]] | Sequence[np.ndarray],
    predicted: Sequence[Sequence[float]] | Sequence[np.ndarray],
) -> Scores:
    """The three per-token scores of predicted against true activations, one sequence per
    excerpt (excerpts of any lengths; each pair of the same length), pooled."""
    t, p = _pooled(true), _pooled(predicted)
    if t.shape != p.shape:
        raise ValueError(f"true and predicted activations differ in length ({t.size} vs {p.size})")
    if t.size < 2:
        return Scores(None, None, None)
    tc, pc = t - t.mean(), p - p.mean()
    tt, pp = float(tc @ tc), float(pc @ pc)
    # Relative thresholds: float noise in a constant vector is no signal.
    if tt <= 1e-12 * max(float(t @ t), 1e-30) or pp <= 1e-12 * max(float(p @ p), 1e-30):
        return Scores(None, None, None)
    r = float(tc @ pc) / math.sqrt(tt * pp)
    r = max(-1.0, min(1.0, r))
    slope = float(tc @ pc) / pp
    fitted = t.mean() + slope * pc
    rsquared = 1.0 - float(((t - fitted) ** 2).sum()) / tt
    mean_abs = float(np.abs(t).mean())
    abs_dev = None if mean_abs == 0 else 1.0 - float(np.abs(t - fitted).mean()) / mean_abs
    return Scores(_finite(r), _finite(math.copysign(rsquared, r)), abs_dev)


def roc_auc(labels: np.ndarray, predictions: np.ndarray) -> float | None:
    """Area under the ROC curve: the probability that a random positive is predicted above a
    random negative (ties count one half). None unless both labels occur."""
    y = np.asarray(labels, dtype=bool).ravel()
    s = np.asarray(predictions, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    # Mann-Whitney U with average ranks for ties.
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # 1-based mean rank of the tie group
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def head_scores(
    true: Sequence[Sequence[float]] | Sequence[np.ndarray],
    predicted: Sequence[Sequence[float]] | Sequence[np.ndarray],
    max_activation: float,
) -> Scores:
    """Attention heads: the per-pair correlation scores and the ROC AUC of the predictions
    against the labels `true >= HEAD_LABEL_FRACTION · max_activation`."""
    scores = correlation_scores(true, predicted)
    auc = None
    if math.isfinite(max_activation) and max_activation > 0:
        auc = roc_auc(_pooled(true) >= HEAD_LABEL_FRACTION * max_activation, _pooled(predicted))
    return Scores(
        scores.ev_correlation_score,
        scores.rsquared_score,
        scores.absolute_dev_explained_score,
        auc,
    )
