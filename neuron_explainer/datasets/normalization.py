"""What the read API shows beside raw activations: activations normalized by the component's
dataset max, and per-token summaries of token-pair activations.

    normalize_by_dataset_max([0.5, 3.0, -0.1], 2.0)     # [0.25, 1.0, -0.05]
    token_summaries(pair_values, n_tokens)               # total/max in and out per token
    normalize_record(record)                             # a component record as /neuron_record
                                                         # and /attention_head_record send it

The same two functions serve a collated dataset's activation records and a custom prompt's values
(/derived_scalars, /derived_attention_scalars), so both are on one scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neuron_explainer.datasets.records import ActivationRecord, ComponentRecord, is_per_pair


def normalize_by_dataset_max(values: Sequence[float], dataset_max: float) -> list[float]:
    """values / dataset_max, clipped to [-1, 1]: 1 is the largest activation the component has in
    its dataset, and a value beyond it (a custom prompt that activates the component more than
    any window of the corpus, an activation record's float16 value rounded above the float32
    max, a negative value larger in size than the max) is shown as at the max. The raw values
    stay beside the normalized ones. Zeros when dataset_max is not a positive finite number."""
    if not (math.isfinite(dataset_max) and dataset_max > 0):
        return [0.0] * len(values)
    scaled = np.asarray(values, dtype=np.float64) / dataset_max
    return np.clip(scaled, -1.0, 1.0).tolist()


@dataclass
class TokenSummaries:
    """Per token of a token-pair activation list: "in" over the pairs where the token is the key
    (read by itself and the later tokens), "out" over the pairs where it is the query (reading
    itself and the earlier tokens); the sum and the maximum of each."""

    total_in: list[float]
    max_in: list[float]
    total_out: list[float]
    max_out: list[float]


def token_summaries(pair_values: Sequence[float], n_tokens: int) -> TokenSummaries:
    """Summaries of n(n+1)/2 values over the pairs (q, k <= q), row by row over the lower
    triangle ((0,0), (1,0), (1,1), (2,0), ...), as activation records and
    /derived_attention_scalars hold them. Raises ValueError for another number of values."""
    values = np.asarray(pair_values, dtype=np.float64)
    queries, keys = np.tril_indices(n_tokens)  # in the same order, row by row
    if len(values) != len(queries):
        raise ValueError(
            f"{len(values)} pair values for {n_tokens} tokens; expected {len(queries)}"
        )
    max_in, max_out = np.full(n_tokens, -np.inf), np.full(n_tokens, -np.inf)
    np.maximum.at(max_in, keys, values)
    np.maximum.at(max_out, queries, values)
    return TokenSummaries(
        total_in=np.bincount(keys, weights=values, minlength=n_tokens).tolist(),
        max_in=max_in.tolist(),
        total_out=np.bincount(queries, weights=values, minlength=n_tokens).tolist(),
        max_out=max_out.tolist(),
    )


# ---- component records as the read API sends them -------------------------------------------------


@dataclass
class NormalizedActivationRecord:
    """An activation record with its activations normalized by the dataset max."""

    tokens: list[str]
    activations: list[float]
    window_index: int | None
    normalized_activations: list[float]


@dataclass
class NormalizedPairActivationRecord(NormalizedActivationRecord):
    """A token-pair activation record, also with its per-token summaries: raw, and normalized
    (the max summaries by the dataset max, the totals by the largest total of the same kind in
    the component record)."""

    summaries: TokenSummaries
    normalized_summaries: TokenSummaries


@dataclass
class NormalizedComponentRecord:
    """The activation records of `record`, normalized (`NormalizedPairActivationRecord`s for
    token-pair families); the statistics are those of `record`."""

    record: ComponentRecord
    most_positive_activation_records: list[NormalizedActivationRecord]
    random_sample: list[NormalizedActivationRecord]
    random_sample_by_quantile: list[list[NormalizedActivationRecord]] | None


def normalize_record(record: ComponentRecord) -> NormalizedComponentRecord:
    """`record` with every activation record normalized by its max activation and, for a
    token-pair family, summarized per token."""
    scale = record.max_activation
    summaries: dict[int, TokenSummaries] = {}
    if is_per_pair(record.family):
        summaries = {
            id(r): token_summaries(r.activations, len(r.tokens))
            for r in record.activation_records()
        }
    total_in_scale = max((max(t.total_in, default=0.0) for t in summaries.values()), default=0.0)
    total_out_scale = max((max(t.total_out, default=0.0) for t in summaries.values()), default=0.0)

    def one(r: ActivationRecord) -> NormalizedActivationRecord:
        normalized = normalize_by_dataset_max(r.activations, scale)
        if id(r) not in summaries:
            return NormalizedActivationRecord(r.tokens, r.activations, r.window_index, normalized)
        t = summaries[id(r)]
        return NormalizedPairActivationRecord(
            r.tokens,
            r.activations,
            r.window_index,
            normalized,
            summaries=t,
            normalized_summaries=TokenSummaries(
                total_in=normalize_by_dataset_max(t.total_in, total_in_scale),
                max_in=normalize_by_dataset_max(t.max_in, scale),
                total_out=normalize_by_dataset_max(t.total_out, total_out_scale),
                max_out=normalize_by_dataset_max(t.max_out, scale),
            ),
        )

    by_quantile = record.random_sample_by_quantile
    return NormalizedComponentRecord(
        record=record,
        most_positive_activation_records=[one(r) for r in record.most_positive_activation_records],
        random_sample=[one(r) for r in record.random_sample],
        random_sample_by_quantile=None
        if by_quantile is None
        else [[one(r) for r in group] for group in by_quantile],
    )
