"""Collated activation datasets: corpora, collation, the SQLite store, and TDB's JSON layout.

    from neuron_explainer.datasets import DatasetStore, collate, load_corpus

See datasets.md at the project root for the formats, the schema and how to build datasets.
"""

from neuron_explainer.datasets.collate import collate, merge_stores
from neuron_explainer.datasets.corpus import (
    Corpus,
    CorpusError,
    TokenWindows,
    load_corpus,
    tokenize,
)
from neuron_explainer.datasets.families import FAMILIES, ComponentFamily, register_family
from neuron_explainer.datasets.store import (
    ActivationRecord,
    ComponentNotFoundError,
    ComponentRecord,
    DatasetError,
    DatasetMetadata,
    DatasetNotFoundError,
    DatasetStore,
)
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
    "read_tdb_record",
    "read_tdb_record_async",
    "register_family",
    "tokenize",
]
