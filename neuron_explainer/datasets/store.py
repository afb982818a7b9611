"""The native collated-dataset store: one SQLite file per collation (stdlib sqlite3). This module
holds its format (schema, metadata, array encoding) and reading; store_writer.py writes it.

Schema (all arrays are little-endian blobs; numpy.frombuffer reads them):

    metadata(key TEXT PRIMARY KEY, value TEXT)          -- JSON values, see `DatasetMetadata`
    components(family, layer, idx,                      -- one row per component: statistics
        max_activation, mean, variance, skewness, kurtosis, fraction_active REAL, dead INTEGER,
        n_values INTEGER, m2, m3, m4 REAL, n_active INTEGER,   -- running moments (resume, merge)
        quantile_boundaries BLOB float32[len(quantiles)],       -- NULL before calibration
        PRIMARY KEY (family, layer, idx)) WITHOUT ROWID
    samples(family, layer, idx,                         -- one row per component: kept windows
        acts_dtype TEXT,                                -- 'float16' or 'float32', for *_acts
        top_windows BLOB int64[k], top_scores BLOB float32[k], top_acts BLOB [k, P],
        random_windows BLOB int64[r], random_keys BLOB int64[r], random_acts BLOB [r, P],
        quantile_windows BLOB int64[bins, q], quantile_keys BLOB int64[bins, q],
        quantile_acts BLOB [bins, q, P],
        PRIMARY KEY (family, layer, idx))
    windows(window_index INTEGER PRIMARY KEY, tokens BLOB)  -- token ids (uint16 or int32)
    vocabulary(token_id INTEGER PRIMARY KEY, token TEXT)    -- display strings of the ids used

A window index of -1 marks an empty slot (fewer windows seen than slots). P is the window length
for per-token families and n(n+1)/2 for attention heads (pairs (q, k <= q) row by row). Samples
refer to windows by index, so each window's tokens are stored once however many components keep
it; only windows some component keeps are stored. Statistics rows are rewritten at every commit,
sample rows only when a component's kept windows changed.

The metadata table has one row per `DatasetMetadata` field, under its camelCase name
(`to_json`/`from_json`); other keys (the autoencoders of a latent store, latents.py) may be added.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from neuron_explainer.datasets.accumulators import AccumulatorConfig
from neuron_explainer.datasets.records import (
    ActivationRecord,
    ComponentNotFoundError,
    ComponentRecord,
    DatasetError,
    DatasetNotFoundError,
    camel_case,
    camel_json,
    from_camel_json,
    positions,
)

FORMAT_VERSION = 1
StoreStatus = Literal["in_progress", "complete"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS metadata (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS components (
    family TEXT NOT NULL, layer INTEGER NOT NULL, idx INTEGER NOT NULL,
    max_activation REAL, mean REAL, variance REAL, skewness REAL, kurtosis REAL,
    fraction_active REAL, dead INTEGER,
    n_values INTEGER NOT NULL, m2 REAL, m3 REAL, m4 REAL, n_active INTEGER NOT NULL,
    quantile_boundaries BLOB,
    PRIMARY KEY (family, layer, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS samples (
    family TEXT NOT NULL, layer INTEGER NOT NULL, idx INTEGER NOT NULL,
    acts_dtype TEXT NOT NULL,
    top_windows BLOB NOT NULL, top_scores BLOB NOT NULL, top_acts BLOB NOT NULL,
    random_windows BLOB NOT NULL, random_keys BLOB NOT NULL, random_acts BLOB NOT NULL,
    quantile_windows BLOB NOT NULL, quantile_keys BLOB NOT NULL, quantile_acts BLOB NOT NULL,
    PRIMARY KEY (family, layer, idx)
);
CREATE TABLE IF NOT EXISTS windows (window_index INTEGER PRIMARY KEY, tokens BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS vocabulary (token_id INTEGER PRIMARY KEY, token TEXT NOT NULL);
"""


@dataclass
class DatasetMetadata:
    """Provenance and settings of a store (the `metadata` table)."""

    format_version: int
    tool_version: str
    model: dict[str, Any]  # name, nLayers, dModel, dMlp, nHeads, vocabSize
    corpus: dict[str, Any]  # name, hash, description
    window_length: int
    n_windows_total: int  # windows in the whole collation (all shards)
    window_ranges: list[list[int]]  # [start, end) ranges this store covers
    n_tokens: int  # tokens processed so far
    families: list[str]
    layers: list[int]
    k: int
    random_sample_size: int
    quantile_sample_size: int
    quantiles: list[float]
    calibration_windows: int
    seed: int
    active_threshold: float
    batch_size: int
    dtype: str
    status: StoreStatus
    next_window: int  # resume point within the current range
    created_at: str
    updated_at: str
    shard: str | None = None
    merged_from: list[str] = field(default_factory=list)
    token_dtype: str = "uint16"

    def accumulator_config(self) -> AccumulatorConfig:
        return AccumulatorConfig(
            k=self.k,
            random_sample_size=self.random_sample_size,
            quantile_sample_size=self.quantile_sample_size,
            quantiles=tuple(self.quantiles),
            calibration_windows=self.calibration_windows,
            seed=self.seed,
            active_threshold=self.active_threshold,
        )

    def to_json(self) -> dict[str, Any]:
        """The metadata table's keys and values (formatVersion, nTokens, windowLength, ...)."""
        return camel_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetMetadata:
        """From the metadata table's keys and values; keys of other fields are ignored."""
        return from_camel_json(cls, data)

    def check_same(self, other: DatasetMetadata, fields: Sequence[str], what: str) -> None:
        """DatasetError listing the `fields` in which the two differ, after `what`."""
        differ = [f for f in fields if getattr(self, f) != getattr(other, f)]
        if differ:
            detail = "; ".join(
                f"{camel_case(f)}: {getattr(self, f)!r} vs {getattr(other, f)!r}" for f in differ
            )
            raise DatasetError(
                f"{what} different settings ({detail}); pass the same arguments, or write to a "
                "new file"
            )


# Metadata fields that must agree for shards to merge, and for a run to resume a store.
SAME_RUN_FIELDS = (
    "model",
    "corpus",
    "window_length",
    "n_windows_total",
    "families",
    "layers",
    "k",
    "random_sample_size",
    "quantile_sample_size",
    "quantiles",
    "calibration_windows",
    "seed",
    "active_threshold",
    "dtype",
)
RESUME_FIELDS = (*SAME_RUN_FIELDS, "window_ranges", "batch_size", "shard")


def utc_now() -> str:
    """A metadata timestamp (createdAt, updatedAt)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# ---- encoding -------------------------------------------------------------------------------------


def encode_array(x: torch.Tensor | np.ndarray, dtype: str) -> bytes:
    array = x.numpy() if isinstance(x, torch.Tensor) else x
    return np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def decode_array(blob: bytes, dtype: str, shape: Sequence[int]) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def null_if_nan(x: float) -> float | None:
    return None if x != x else float(x)  # NaN -> NULL


def nan_if_null(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def connect(path: str | Path, readonly: bool = False) -> sqlite3.Connection:
    path = Path(path)
    if readonly:
        if not path.is_file():
            raise DatasetNotFoundError(f"no collated dataset at {path}")
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False
        )
    else:
        conn = sqlite3.connect(path, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def read_metadata(conn: sqlite3.Connection, where: str = "") -> DatasetMetadata:
    try:
        rows = conn.execute("SELECT key, value FROM metadata").fetchall()
    except sqlite3.DatabaseError as e:
        raise DatasetNotFoundError(f"{where or 'this file'} is not a collated dataset ({e})") from e
    values = {k: json.loads(v) for k, v in rows}
    if not values:
        raise DatasetNotFoundError(
            f"{where or 'this file'} is not a collated dataset (no metadata)"
        )
    if values.get("formatVersion") != FORMAT_VERSION:
        raise DatasetError(
            f"{where} has format version {values.get('formatVersion')}; this tool reads "
            f"{FORMAT_VERSION}"
        )
    return DatasetMetadata.from_json(values)


def stored_metadata(path: str | Path) -> DatasetMetadata | None:
    """The metadata of the store a collation would resume or find complete, read without writing
    to the file (its bytes and journal mode stay as they are): None when there is no file yet or
    it has no commit yet; DatasetError when the file is something else."""
    path = Path(path)
    if not path.exists():
        return None
    conn = connect(path, readonly=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        if "metadata" not in tables:
            raise DatasetError(f"{path} exists and is not a collated dataset")
        if conn.execute("SELECT count(*) FROM metadata").fetchone()[0] == 0:
            return None
        return read_metadata(conn, str(path))
    except sqlite3.DatabaseError as e:
        raise DatasetError(f"{path} exists and is not a collated dataset ({e})") from e
    finally:
        conn.close()


# ---- reading --------------------------------------------------------------------------------------


class DatasetStore:
    """Read access to one store: `record(family, layer, index)`, `metadata()`, `components()`.

    Safe to share between threads (one connection behind a lock). Reading one component is two
    primary-key lookups plus the tokens of the windows it keeps.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn = connect(self.path, readonly=True)
        self._lock = threading.Lock()
        self._metadata = read_metadata(self._conn, str(self.path))
        # The vocabulary table as arrays indexed by token id: its strings, and which ids it has.
        self._token_text: np.ndarray | None = None
        self._token_known = np.zeros(0, dtype=bool)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> DatasetStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def metadata(self) -> DatasetMetadata:
        return self._metadata

    def refresh_metadata(self) -> DatasetMetadata:
        """Re-read the metadata (a store still being written changes its progress fields)."""
        with self._lock:
            self._metadata = read_metadata(self._conn, str(self.path))
        return self._metadata

    def components(
        self, family: str | None = None, layer: int | None = None
    ) -> list[tuple[str, int, int]]:
        """(family, layer, index) of every component held, sorted."""
        query, args = "SELECT family, layer, idx FROM components", list[object]()
        conditions = []
        if family is not None:
            conditions.append("family = ?")
            args.append(family)
        if layer is not None:
            conditions.append("layer = ?")
            args.append(layer)
        if conditions:
            query += " WHERE " + " AND ".join(conditions)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY family, layer, idx", args).fetchall()
        return [(str(f), int(lay), int(i)) for f, lay, i in rows]

    def _load_vocabulary(self) -> None:
        rows = self._conn.execute("SELECT token_id, token FROM vocabulary").fetchall()
        size = max((int(i) for i, _ in rows), default=-1) + 1
        text = np.empty(size, dtype=object)
        known = np.zeros(size, dtype=bool)
        for i, token in rows:
            text[i], known[i] = token, True
        self._token_text, self._token_known = text, known

    def _has_tokens(self, ids: np.ndarray) -> bool:
        known = self._token_known
        return ids.size == 0 or (int(ids.max()) < len(known) and bool(known[ids].all()))

    def _tokens(self, ids: np.ndarray) -> list[str]:
        ids = ids.astype(np.int64)
        # A store still being written gains vocabulary rows: reload when an id is missing.
        if self._token_text is None or not self._has_tokens(ids):
            self._load_vocabulary()
        assert self._token_text is not None
        if self._has_tokens(ids):
            return list(self._token_text[ids].tolist())
        text, known = self._token_text, self._token_known
        return [text[i] if i < len(known) and known[i] else f"<{i}>" for i in ids.tolist()]

    def record(self, family: str, layer: int, index: int) -> ComponentRecord:
        """The record of one component; ComponentNotFoundError if the store does not hold it."""
        meta = self._metadata
        with self._lock:
            stats = self._conn.execute(
                "SELECT max_activation, mean, variance, skewness, kurtosis, fraction_active, dead, "
                "quantile_boundaries FROM components WHERE family = ? AND layer = ? AND idx = ?",
                (family, int(layer), int(index)),
            ).fetchone()
            samples = self._conn.execute(
                "SELECT acts_dtype, top_windows, top_acts, random_windows, random_acts, "
                "quantile_windows, quantile_acts FROM samples "
                "WHERE family = ? AND layer = ? AND idx = ?",
                (family, int(layer), int(index)),
            ).fetchone()
            if stats is None:
                raise ComponentNotFoundError(self._not_found(family, layer, index))
            k, r, q, bins = (
                meta.k,
                meta.random_sample_size,
                meta.quantile_sample_size,
                len(meta.quantiles) + 1,
            )
            p = positions(family, meta.window_length)
            groups: list[tuple[np.ndarray, np.ndarray]] = []
            if samples is not None:
                dtype = samples[0]
                groups = [  # (windows, activations) of the top, random and quantile samples
                    (
                        decode_array(samples[i], "int64", (n,)),
                        decode_array(samples[i + 1], dtype, (n, p)),
                    )
                    for i, n in ((1, k), (3, r), (5, bins * q))
                ]
            wanted = sorted({int(w) for ws, _ in groups for w in ws if w >= 0})
            window_tokens: dict[int, np.ndarray] = {}
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                rows = self._conn.execute(
                    f"SELECT window_index, tokens FROM windows WHERE window_index IN "
                    f"({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                for w, blob in rows:
                    window_tokens[int(w)] = np.frombuffer(
                        blob, dtype=np.dtype(meta.token_dtype).newbyteorder("<")
                    )
            token_strings = {w: self._tokens(ids) for w, ids in window_tokens.items()}

        def records(windows: np.ndarray, acts: np.ndarray) -> list[ActivationRecord]:
            return [
                ActivationRecord(token_strings[int(w)], acts[j].astype(np.float32).tolist(), int(w))
                for j, w in enumerate(windows)
                if w >= 0
            ]

        top = records(*groups[0]) if groups else []
        rnd = records(*groups[1]) if groups else []
        by_quantile: list[list[ActivationRecord]] | None = None
        if groups and stats[7] is not None:
            qw, qa = groups[2]
            by_quantile = [
                records(qw[j * q : (j + 1) * q], qa[j * q : (j + 1) * q]) for j in range(bins)
            ]
        return ComponentRecord(
            family=family,
            layer=int(layer),
            index=int(index),
            max_activation=nan_if_null(stats[0]),
            most_positive_activation_records=top,
            random_sample=rnd,
            random_sample_by_quantile=by_quantile,
            quantile_boundaries=None
            if stats[7] is None
            else decode_array(stats[7], "float32", (len(meta.quantiles),)).tolist(),
            mean=nan_if_null(stats[1]),
            variance=nan_if_null(stats[2]),
            skewness=nan_if_null(stats[3]),
            kurtosis=nan_if_null(stats[4]),
            fraction_active=None if stats[5] is None else float(stats[5]),
            dead=None if stats[6] is None else bool(stats[6]),
        )

    def _not_found(self, family: str, layer: int, index: int) -> str:
        meta = self._metadata
        if family not in meta.families:
            return f"{self.path} has no {family!r} components (it holds {', '.join(meta.families)})"
        if int(layer) not in meta.layers:
            return f"{self.path} has no {family} components in layer {layer} (layers {meta.layers})"
        return f"{self.path} has no {family} component {index} in layer {layer}"
