"""Collated activation datasets: corpora, collation, the SQLite store, TDB's JSON layout, and the
records they hold (normalized by the dataset max for display).

    from neuron_explainer.datasets import DatasetStore, collate, load_corpus

See datasets.md at the project root for the formats, the schema and how to build datasets.
"""

from neuron_explainer.datasets.collate import collate
from neuron_explainer.datasets.corpus import (
    Corpus,
    CorpusError,
    TokenWindows,
    load_corpus,
    tokenize,
)
from neuron_explainer.datasets.families import FAMILIES, ComponentFamily, register_family
from neuron_explainer.datasets.merge import merge_stores
from neuron_explainer.datasets.normalization import (
    normalize_by_dataset_max,
    normalize_record,
    token_summaries,
)
from neuron_explainer.datasets.records import (
    ActivationRecord,
    ComponentNotFoundError,
    ComponentRecord,
    DatasetError,
    DatasetNotFoundError,
)
from neuron_explainer.datasets.store import DatasetMetadata, DatasetStore
from neuron_explainer.datasets.tdb_format import (
    export_tdb,
    read_tdb_record,
    read_tdb_record_async,
)

__all__ = [
    "FAMILIES",
    "ActivationRecord",
    "ComponentFamily",
    "ComponentNotFoundError",
    "ComponentRecord",
    "Corpus",
    "CorpusError",
    "DatasetError",
    "DatasetMetadata",
    "DatasetNotFoundError",
    "DatasetStore",
    "TokenWindows",
    "collate",
    "export_tdb",
    "load_corpus",
    "merge_stores",
    "normalize_by_dataset_max",
    "normalize_record",
    "read_tdb_record",
    "read_tdb_record_async",
    "register_family",
    "token_summaries",
    "tokenize",
]
