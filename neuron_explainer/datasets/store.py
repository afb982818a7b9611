"""The native collated-dataset store: one SQLite file per collation (stdlib sqlite3).

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
for per-token families and n(n+1)/2 for attention heads (pairs (q, k <= q) row by row). Records
refer to windows by index, so each excerpt's tokens are stored once however many components keep
it; only windows some component keeps are stored. Statistics rows are rewritten at every commit,
sample rows only when a component's kept windows changed.

Writes happen in one transaction per commit (`StoreWriter.commit`), so a killed run leaves the last
commit intact. While a collation runs the file is in WAL mode; the finished store is switched back
to a plain single file (journal_mode=DELETE).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuron_explainer.datasets.accumulators import (
    EMPTY_KEY,
    FLOAT16_MAX,
    AccumulatorConfig,
    LayerAccumulator,
    SampleSet,
    score_order,
)
from neuron_explainer.datasets.families import FAMILIES

FORMAT_VERSION = 1

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


class DatasetError(Exception):
    """A collated dataset that cannot be read or written as asked."""


class DatasetNotFoundError(DatasetError, LookupError):
    """No dataset at the given path or URL (the server answers 404)."""


class ComponentNotFoundError(DatasetError, LookupError):
    """The dataset exists but holds no record for this component (the server answers 404)."""


# ---- records, as the API and datasets.md name them ------------------------------------------------


@dataclass
class ActivationRecord:
    """One excerpt: its tokens and the component's activation at each token (for attention heads,
    at each pair (q, k <= q), flattened row by row over the lower triangle)."""

    tokens: list[str]
    activations: list[float]
    windowIndex: int | None = None  # API field name


@dataclass
class ComponentRecord:
    """Everything a collated dataset holds about one component. Field names follow the API
    (datasets.md), so `asdict(record)` is the JSON the server sends."""

    family: str
    layer: int
    index: int
    maxActivation: float
    mostPositiveActivationRecords: list[ActivationRecord]
    randomSample: list[ActivationRecord]
    randomSampleByQuantile: list[list[ActivationRecord]] | None
    quantileBoundaries: list[float] | None
    mean: float
    variance: float
    skewness: float
    kurtosis: float
    fractionActive: float | None = None
    dead: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DatasetMetadata:
    """Provenance and settings of a store (the `metadata` table)."""

    formatVersion: int
    toolVersion: str
    model: dict[str, Any]
    corpus: dict[str, Any]  # name, hash, description
    windowLength: int
    nWindowsTotal: int  # windows in the whole collation (all shards)
    windowRanges: list[list[int]]  # [start, end) ranges this store covers
    nTokens: int  # tokens processed so far
    families: list[str]
    layers: list[int]
    k: int
    randomSampleSize: int
    quantileSampleSize: int
    quantiles: list[float]
    calibrationWindows: int
    seed: int
    activeThreshold: float
    batchSize: int
    dtype: str
    status: str  # "in_progress" or "complete"
    nextWindow: int  # resume point within the current range
    createdAt: str
    updatedAt: str
    shard: str | None = None
    mergedFrom: list[str] = field(default_factory=list)
    tokenDtype: str = "uint16"

    def accumulator_config(self) -> AccumulatorConfig:
        return AccumulatorConfig(
            k=self.k,
            random_sample_size=self.randomSampleSize,
            quantile_sample_size=self.quantileSampleSize,
            quantiles=tuple(self.quantiles),
            calibration_windows=self.calibrationWindows,
            seed=self.seed,
            active_threshold=self.activeThreshold,
        )

    def positions(self, family: str) -> int:
        n = self.windowLength
        per_pair = (
            FAMILIES[family].per_token_pair
            if family in FAMILIES
            else family.startswith("attention")
        )
        return n * (n + 1) // 2 if per_pair else n

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---- encoding -------------------------------------------------------------------------------------


def _blob(x: torch.Tensor | np.ndarray, dtype: str) -> bytes:
    array = x.numpy() if isinstance(x, torch.Tensor) else x
    return np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def _array(blob: bytes, dtype: str, shape: Sequence[int]) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def _real(x: float) -> float | None:
    return None if x != x else float(x)  # NaN -> NULL


def _float(x: float | None) -> float:
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
    known = DatasetMetadata.__dataclass_fields__
    return DatasetMetadata(**{k: v for k, v in values.items() if k in known})


# ---- writing --------------------------------------------------------------------------------------


class StoreWriter:
    """Writes accumulators, windows and metadata; each `commit` is one transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # One writer per store: a second collation of the same file fails at once instead of
        # interleaving commits (the lock is released when the process ends, however it ends).
        self._lock_file = open(self.path.with_name(self.path.name + ".lock"), "w")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._lock_file.close()
            raise DatasetError(
                f"another process is writing {self.path} (a collation still running?)"
            ) from e
        self.conn = connect(self.path)
        self.conn.isolation_level = None  # explicit BEGIN/COMMIT
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.executescript(SCHEMA)
        # Commits only append to the WAL; copying it into the file (and the fsyncs that go with
        # it, ~2 s for a full commit of 30 layers here) happens on another thread meanwhile.
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._checkpointer = _Checkpointer(self.path)
        self.stored_windows: set[int] = {
            int(r[0]) for r in self.conn.execute("SELECT window_index FROM windows")
        }
        self.stored_token_ids: set[int] = {
            int(r[0]) for r in self.conn.execute("SELECT token_id FROM vocabulary")
        }

    def existing_metadata(self) -> DatasetMetadata | None:
        if self.conn.execute("SELECT count(*) FROM metadata").fetchone()[0] == 0:
            return None
        return read_metadata(self.conn, str(self.path))

    def commit(
        self,
        metadata: DatasetMetadata,
        accumulators: Iterable[LayerAccumulator],
        window_tokens: dict[int, np.ndarray],
        token_display: Callable[[int], str],
    ) -> set[int]:
        """One transaction: statistics of every component, samples of the dirty ones, the tokens
        of newly kept windows (`window_tokens` must hold every kept window not yet stored) and
        their display strings (`token_display(id)`), and the metadata (progress). Returns the
        windows the given accumulators keep."""
        accumulators = list(accumulators)
        kept: set[int] = set()
        for acc in accumulators:
            for s in (acc.top, acc.random, acc.by_quantile):
                kept.update(int(w) for w in torch.unique(s.windows).tolist() if w >= 0)
        new_windows = sorted(kept - self.stored_windows)
        missing = [w for w in new_windows if w not in window_tokens]
        if missing:
            raise DatasetError(f"tokens of windows {missing[:5]} were not provided")
        token_dtype = metadata.tokenDtype
        new_ids: set[int] = set()
        for w in new_windows:
            new_ids.update(int(t) for t in np.unique(window_tokens[w]))
        new_ids -= self.stored_token_ids
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            for acc in accumulators:
                c.executemany(
                    "INSERT OR REPLACE INTO components VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _component_rows(acc),
                )
                c.executemany(
                    "INSERT OR REPLACE INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _sample_rows(acc),
                )
            c.executemany(
                "INSERT OR REPLACE INTO windows VALUES (?, ?)",
                ((w, _blob(window_tokens[w], token_dtype)) for w in new_windows),
            )
            c.executemany(
                "INSERT OR REPLACE INTO vocabulary VALUES (?, ?)",
                ((i, token_display(i)) for i in sorted(new_ids)),
            )
            c.executemany(
                "INSERT OR REPLACE INTO metadata VALUES (?, ?)",
                ((k, json.dumps(v)) for k, v in metadata.to_json().items()),
            )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        self.stored_windows.update(new_windows)
        self.stored_token_ids.update(new_ids)
        for acc in accumulators:
            acc.dirty.zero_()
        self._checkpointer.request()
        return kept

    def leave_wal(self) -> bool:
        """Before the last commit: copy the WAL into the file and switch to a rollback journal,
        so the final (largest) commit is written once, into the file, instead of into the WAL
        and then copied (~2 s less at the end of a 30-layer collation here). Needs exclusive
        access: while another connection reads the store it stays in WAL mode (returns False)."""
        self._checkpointer.close()
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            mode = self.conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
        except sqlite3.OperationalError:
            return False
        return str(mode).lower() == "delete"

    def finish(self, kept: set[int] | None = None) -> None:
        """Drop windows no component keeps any more (`kept`: the windows the committed samples
        hold, read from the store when not given), then make the file a plain single file."""
        self._checkpointer.close()
        if kept is None:
            kept = set()
            for blobs in self.conn.execute(
                "SELECT top_windows, random_windows, quantile_windows FROM samples"
            ):
                for blob in blobs:
                    kept.update(np.frombuffer(blob, dtype="<i8").tolist())
        unused = sorted(self.stored_windows - kept)
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        c.executemany("DELETE FROM windows WHERE window_index = ?", ((w,) for w in unused))
        c.execute("COMMIT")
        self.stored_windows -= set(unused)
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            c.execute("PRAGMA journal_mode = DELETE")
        except sqlite3.OperationalError:
            # Another connection reads the store (a server showing it while it is built): leaving
            # WAL mode needs exclusive access. Everything is checkpointed into the main file; it
            # stays in WAL mode, which every SQLite reader handles, and is compacted another time.
            return
        # Rewritten sample rows leave free pages; compact the file when they are a large share.
        free = c.execute("PRAGMA freelist_count").fetchone()[0]
        if free > 0.1 * c.execute("PRAGMA page_count").fetchone()[0]:
            c.execute("VACUUM")

    def close(self) -> None:
        self._checkpointer.close()
        self.conn.close()
        self._lock_file.close()  # releases the lock


class _Checkpointer:
    """A thread with its own connection that checkpoints the WAL (PASSIVE: it never blocks the
    writer or readers) whenever asked. A checkpoint that fails is harmless: the next one, or
    `finish`, copies the same frames."""

    def __init__(self, path: Path) -> None:
        self._conn = connect(path)
        self._wanted = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wanted.set()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._wanted.set()
        self._thread.join()
        self._conn.close()

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closing:
                return
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")


def _component_rows(acc: LayerAccumulator) -> Iterator[tuple[Any, ...]]:
    stats = {k: v.cpu().tolist() for k, v in acc.statistics().items()}
    m2, m3, m4 = (t.cpu().tolist() for t in (acc.m2, acc.m3, acc.m4))
    n_active = acc.n_active.cpu().tolist()
    boundaries = None if acc.boundaries is None else _row_views(acc.boundaries.cpu().numpy(), "<f4")
    for i in range(acc.n_components):
        yield (
            acc.family,
            acc.layer,
            i,
            _real(stats["max_activation"][i]),
            _real(stats["mean"][i]),
            _real(stats["variance"][i]),
            _real(stats["skewness"][i]),
            _real(stats["kurtosis"][i]),
            _real(stats["fraction_active"][i]) if acc.n_values else None,
            int(n_active[i] == 0) if acc.n_values else None,
            acc.n_values,
            m2[i],
            m3[i],
            m4[i],
            n_active[i],
            None if boundaries is None else boundaries[i],
        )


def _sample_rows(acc: LayerAccumulator) -> Iterator[tuple[Any, ...]]:
    """Rows of the `samples` table for the dirty components of `acc`. Each field is converted to
    its little-endian storage type once for all rows, and each row's blob is a zero-copy view of
    its slice (sqlite3 binds any buffer as a BLOB)."""
    rows = acc.dirty.nonzero().flatten()
    if rows.numel() == 0:
        return
    bins = acc.config.n_bins
    n = len(rows)
    q_rows = (rows[:, None] * bins + torch.arange(bins, device=rows.device)).flatten()
    ids = {
        "top_w": acc.top.windows[rows],
        "top_v": acc.top.values[rows],
        "rnd_w": acc.random.windows[rows],
        "rnd_o": acc.random.order[rows],
        "q_w": acc.by_quantile.windows[q_rows].reshape(n, -1),
        "q_o": acc.by_quantile.order[q_rows].reshape(n, -1),
    }
    acts = {
        "top_a": acc.top.sorted_acts(rows).reshape(n, -1),
        "rnd_a": acc.random.sorted_acts(rows).reshape(n, -1),
        "q_a": acc.by_quantile.sorted_acts(q_rows).reshape(n, -1),
    }
    fields = {
        name: _row_views(t.cpu().numpy(), "<f4" if name == "top_v" else "<i8")
        for name, t in ids.items()
    }
    largest = torch.stack([a.abs().amax(dim=1) for a in acts.values()]).amax(dim=0)
    wide = (largest > FLOAT16_MAX).cpu().tolist()  # such rows keep float32 activations
    with np.errstate(over="ignore"):  # the wide rows' float16 copies are not used
        half = {name: _row_views(a.cpu().numpy(), "<f2") for name, a in acts.items()}
    for j, i in enumerate(rows.cpu().tolist()):
        if wide[j]:
            a = {name: memoryview(_blob(t[j].cpu(), "float32")) for name, t in acts.items()}
        else:
            a = {name: views[j] for name, views in half.items()}
        yield (
            acc.family,
            acc.layer,
            i,
            "float32" if wide[j] else "float16",
            fields["top_w"][j],
            fields["top_v"][j],
            a["top_a"],
            fields["rnd_w"][j],
            fields["rnd_o"][j],
            a["rnd_a"],
            fields["q_w"][j],
            fields["q_o"][j],
            a["q_a"],
        )


def _row_views(array: np.ndarray, dtype: str) -> list[memoryview]:
    """One read-only byte view per row of a 2-D array, after a single conversion to `dtype`."""
    converted = np.ascontiguousarray(array, dtype=np.dtype(dtype))
    flat = memoryview(converted.reshape(-1).view(np.uint8).data)
    step = converted.shape[1] * converted.itemsize
    return [flat[j * step : (j + 1) * step] for j in range(converted.shape[0])]


def load_accumulator(
    conn: sqlite3.Connection,
    metadata: DatasetMetadata,
    family: str,
    layer: int,
    n_components: int,
    device: torch.device | str = "cpu",
) -> LayerAccumulator:
    """The running state of one (family, layer) as last committed."""
    config = metadata.accumulator_config()
    positions = metadata.positions(family)
    acc = LayerAccumulator(family, layer, n_components, positions, config, device)
    stats = conn.execute(
        "SELECT idx, n_values, mean, m2, m3, m4, n_active, quantile_boundaries FROM components "
        "WHERE family = ? AND layer = ? ORDER BY idx",
        (family, layer),
    ).fetchall()
    if len(stats) != n_components:
        raise DatasetError(
            f"{family} layer {layer}: the store has {len(stats)} components, expected {n_components}"
        )
    acc.n_values = int(stats[0][1])
    for name, column in (("mean", 2), ("m2", 3), ("m3", 4), ("m4", 5)):
        values = [0.0 if r[column] is None else float(r[column]) for r in stats]
        setattr(acc, name, torch.tensor(values, dtype=torch.float64, device=acc.device))
    acc.n_active = torch.tensor([int(r[6]) for r in stats], dtype=torch.int64, device=acc.device)
    if stats[0][7] is not None:
        acc.boundaries = torch.from_numpy(
            np.stack([_array(r[7], "float32", (len(config.quantiles),)) for r in stats])
        ).to(acc.device)

    k, r, q, bins = config.k, config.random_sample_size, config.quantile_sample_size, config.n_bins
    rows = conn.execute(
        "SELECT idx, acts_dtype, top_windows, top_scores, top_acts, random_windows, random_keys, "
        "random_acts, quantile_windows, quantile_keys, quantile_acts FROM samples "
        "WHERE family = ? AND layer = ? ORDER BY idx",
        (family, layer),
    ).fetchall()
    if not rows:
        return acc  # nothing committed yet
    if len(rows) != n_components:
        raise DatasetError(
            f"{family} layer {layer}: {len(rows)} sample rows, expected {n_components}"
        )
    shapes = {
        2: ("int64", (k,)),
        3: ("float32", (k,)),
        4: (None, (k, positions)),
        5: ("int64", (r,)),
        6: ("int64", (r,)),
        7: (None, (r, positions)),
        8: ("int64", (bins * q,)),
        9: ("int64", (bins * q,)),
        10: (None, (bins * q, positions)),
    }
    columns: dict[int, torch.Tensor] = {}
    for column, (dtype, shape) in shapes.items():
        stacked = np.stack(
            [_array(row[column], dtype or row[1], shape).astype(dtype or "float32") for row in rows]
        )
        columns[column] = torch.from_numpy(stacked).to(acc.device)

    def sample_set(
        windows: torch.Tensor, order: torch.Tensor, values: torch.Tensor, acts: torch.Tensor
    ) -> SampleSet:
        n_rows, size = windows.shape
        slots = torch.arange(size, device=acc.device).expand(n_rows, size).contiguous()
        return SampleSet(order, windows, values, slots, acts)

    top_windows, top_scores = columns[2], columns[3]
    top_order = torch.where(
        top_windows >= 0, score_order(top_scores, top_windows.clamp(min=0)), EMPTY_KEY
    )
    no_values = torch.full_like(columns[5], 0, dtype=torch.float32)
    acc.top = sample_set(top_windows, top_order, top_scores, columns[4])
    acc.random = sample_set(columns[5], columns[6], no_values, columns[7])
    acc.by_quantile = sample_set(
        columns[8].reshape(n_components * bins, q),
        columns[9].reshape(n_components * bins, q),
        torch.zeros(n_components * bins, q, device=acc.device),
        columns[10].reshape(n_components * bins, q, positions),
    )
    return acc


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
        self._vocabulary: dict[int, str] | None = None

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

    def _tokens(self, ids: np.ndarray) -> list[str]:
        # A store still being written gains vocabulary rows: reload when an id is missing.
        if self._vocabulary is None or any(int(i) not in self._vocabulary for i in ids):
            self._vocabulary = dict(self._conn.execute("SELECT token_id, token FROM vocabulary"))
        vocab = self._vocabulary
        return [vocab.get(int(i), f"<{int(i)}>") for i in ids]

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
                meta.randomSampleSize,
                meta.quantileSampleSize,
                len(meta.quantiles) + 1,
            )
            positions = meta.positions(family)
            groups: list[tuple[np.ndarray, np.ndarray]] = []
            if samples is not None:
                dtype = samples[0]
                groups = [
                    (_array(samples[1], "int64", (k,)), _array(samples[2], dtype, (k, positions))),
                    (_array(samples[3], "int64", (r,)), _array(samples[4], dtype, (r, positions))),
                    (
                        _array(samples[5], "int64", (bins * q,)),
                        _array(samples[6], dtype, (bins * q, positions)),
                    ),
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
                        blob, dtype=np.dtype(meta.tokenDtype).newbyteorder("<")
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
            maxActivation=_float(stats[0]),
            mostPositiveActivationRecords=top,
            randomSample=rnd,
            randomSampleByQuantile=by_quantile,
            quantileBoundaries=None
            if stats[7] is None
            else _array(stats[7], "float32", (len(meta.quantiles),)).tolist(),
            mean=_float(stats[1]),
            variance=_float(stats[2]),
            skewness=_float(stats[3]),
            kurtosis=_float(stats[4]),
            fractionActive=None if stats[5] is None else float(stats[5]),
            dead=None if stats[6] is None else bool(stats[6]),
        )

    def _not_found(self, family: str, layer: int, index: int) -> str:
        meta = self._metadata
        if family not in meta.families:
            return f"{self.path} has no {family!r} components (it holds {', '.join(meta.families)})"
        if int(layer) not in meta.layers:
            return f"{self.path} has no {family} components in layer {layer} (layers {meta.layers})"
        return f"{self.path} has no {family} component {index} in layer {layer}"
