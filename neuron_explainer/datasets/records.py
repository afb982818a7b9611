"""What a collated dataset holds about one component, whatever its format (store or TDB JSON).

The words: a *window* is a slice of the corpus's token stream, named by its index; an *activation
record* (an excerpt, in datasets.md's prose) is one window's tokens with a component's activation
at each token (for token-pair families, at each pair (q, k <= q), flattened row by row over the
lower triangle); a *component record* holds everything about one component: its activation
records (the top-activating ones, a random sample, random samples by score quantile) and its
statistics.

Python fields are snake_case. The JSON the project writes (the API, a store's metadata table) has
camelCase keys: `camel_json` is the one conversion, `from_camel_json` its inverse.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any, TypeVar

from neuron_explainer.datasets.families import FAMILIES


class DatasetError(Exception):
    """A collated dataset that cannot be read or written as asked."""


class DatasetNotFoundError(DatasetError, LookupError):
    """No dataset at the given path or URL (the server answers 404)."""


class ComponentNotFoundError(DatasetError, LookupError):
    """The dataset exists but holds no record for this component (the server answers 404)."""


@dataclass
class ActivationRecord:
    """One window's tokens and the component's activation at each token (for token-pair
    families, at each pair (q, k <= q), flattened row by row over the lower triangle)."""

    tokens: list[str]
    activations: list[float]
    window_index: int | None = None  # None in TDB's JSON layout


@dataclass
class ComponentRecord:
    """Everything a collated dataset holds about one component (datasets.md lists the fields
    under their JSON names, which `to_json` writes)."""

    family: str
    layer: int
    index: int
    max_activation: float
    most_positive_activation_records: list[ActivationRecord]
    random_sample: list[ActivationRecord]
    random_sample_by_quantile: list[list[ActivationRecord]] | None
    quantile_boundaries: list[float] | None
    mean: float
    variance: float
    skewness: float
    kurtosis: float
    fraction_active: float | None = None  # None in TDB's JSON layout
    dead: bool | None = None

    def activation_records(self) -> list[ActivationRecord]:
        """Every activation record: the top ones, the random sample, then the quantile bins."""
        records = self.most_positive_activation_records + self.random_sample
        for group in self.random_sample_by_quantile or []:
            records += group
        return records

    def to_json(self) -> dict[str, Any]:
        """The record with camelCase keys (maxActivation, mostPositiveActivationRecords, ...)."""
        return camel_json(self)


def is_per_pair(family: str) -> bool:
    """Whether a family's activations run over token pairs (attention heads) instead of tokens.
    A family not registered in this process is per pair when its name says attention."""
    return FAMILIES[family].per_token_pair if family in FAMILIES else family.startswith("attention")


def positions(family: str, window_length: int) -> int:
    """P, the number of activations per activation record: n tokens, or n(n+1)/2 token pairs."""
    n = window_length
    return n * (n + 1) // 2 if is_per_pair(family) else n


# ---- JSON keys ------------------------------------------------------------------------------------


def camel_case(name: str) -> str:
    """n_windows_total -> nWindowsTotal."""
    first, *rest = name.split("_")
    return first + "".join(part.capitalize() for part in rest)


def snake_case(key: str) -> str:
    """nWindowsTotal -> n_windows_total (the inverse of `camel_case`)."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in key)


def camel_json(value: Any) -> Any:
    """A dataclass as JSON: its fields (and those of dataclasses in it, also inside lists) under
    camelCase keys. Plain dicts are values and keep their keys."""
    if is_dataclass(value) and not isinstance(value, type):
        return {camel_case(f.name): camel_json(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, list):
        return [camel_json(item) for item in value]
    return value


T = TypeVar("T")


def from_camel_json(cls: type[T], data: dict[str, Any]) -> T:
    """A flat dataclass from camelCase JSON; keys that are not its fields are ignored."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{snake_case(k): v for k, v in data.items() if snake_case(k) in known})
