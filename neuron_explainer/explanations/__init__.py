"""Explanations of components (MLP neurons, attention heads, autoencoder latents): explainers
write a one-line explanation from a component's top-activating excerpts, simulators predict its
activations from the explanation, scorers compare the predictions with the true activations on
held-out excerpts; `tdb explain` does it for a whole store and keeps the results in it.

    from neuron_explainer.explanations import BASELINE_METHOD, explain_and_score

The no-LLM baseline (baseline.py) runs offline and in milliseconds; datasets.md documents the
tables the results are stored in.
"""

from neuron_explainer.explanations.baseline import explain_baseline, simulate_baseline
from neuron_explainer.explanations.batch import BatchSummary, explain_store, sample_components
from neuron_explainer.explanations.excerpts import ExcerptSplit, split_excerpts
from neuron_explainer.explanations.methods import (
    ALL_EXCERPTS,
    BASELINE_METHOD,
    BackendUnreachableError,
    BaselineExplainer,
    BaselineSimulator,
    ExcerptLimits,
    Explainer,
    ExplanationError,
    Method,
    Scored,
    ScoredExcerpt,
    Simulator,
    explain_and_score,
    score_explanation,
)
from neuron_explainer.explanations.scoring import (
    Scores,
    correlation_scores,
    head_scores,
    roc_auc,
)
from neuron_explainer.explanations.store import (
    ExplanationReader,
    ExplanationWriter,
    StoredExplanation,
    all_explanations,
    best_explanations,
    read_explanations,
)

__all__ = [
    "ALL_EXCERPTS",
    "BASELINE_METHOD",
    "BackendUnreachableError",
    "BaselineExplainer",
    "BaselineSimulator",
    "BatchSummary",
    "ExcerptLimits",
    "ExcerptSplit",
    "Explainer",
    "ExplanationError",
    "ExplanationReader",
    "ExplanationWriter",
    "Method",
    "Scored",
    "ScoredExcerpt",
    "Scores",
    "Simulator",
    "StoredExplanation",
    "all_explanations",
    "best_explanations",
    "correlation_scores",
    "explain_and_score",
    "explain_baseline",
    "explain_store",
    "head_scores",
    "read_explanations",
    "roc_auc",
    "sample_components",
    "score_explanation",
    "simulate_baseline",
    "split_excerpts",
]
