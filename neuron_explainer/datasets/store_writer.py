"""Writing a store: one transaction per commit, and loading a committed running state back.

    writer = StoreWriter(path)            # takes the store's lock (one writer per store)
    lock = StoreLock(path); StoreWriter(path, lock)   # or one taken earlier (`tdb collate`)
    writer.commit(metadata, accumulators, window_tokens, token_display)
    writer.leave_wal(); writer.commit(...); writer.finish(kept)
    acc = load_accumulator(conn, metadata, family, layer, n_components)   # to resume or merge

A commit writes, in one transaction, the statistics of every component, the samples of the
components whose kept windows changed, the tokens of newly kept windows and the metadata (progress),
so a killed run leaves the last commit intact. While a collation runs the file is in WAL mode and
commits only append to the WAL; a thread copies it into the file meanwhile. Before the last commit
the writer switches the store back to a plain single file (journal_mode=DELETE), so the final state
is written once, into the file. The schema is in store.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuron_explainer.datasets.accumulators import (
    EMPTY_KEY,
    FLOAT16_MAX,
    LayerAccumulator,
    SampleSet,
    score_order,
)
from neuron_explainer.datasets.records import DatasetError, positions
from neuron_explainer.datasets.store import (
    SCHEMA,
    DatasetMetadata,
    connect,
    decode_array,
    encode_array,
    null_if_nan,
)


class StoreLock:
    """The right to write one store: an exclusive lock on the empty file `STORE.lock` beside it.

    One writer per store: a second collation of the same file fails at once instead of
    interleaving commits. Taking the lock writes nothing to the store, so `tdb collate` takes it
    before loading the model. Held until `release`, or until the process ends, however it ends.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open(self.path.with_name(self.path.name + ".lock"), "w")  # noqa: SIM115
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._file.close()
            raise DatasetError(
                f"another process is writing {self.path} (a collation still running?)"
            ) from e

    def release(self) -> None:
        self._file.close()

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class StoreWriter:
    """Writes accumulators, windows and metadata; each `commit` is one transaction. Takes the
    store's lock, or uses `lock` when the caller holds it already (and then leaves it held)."""

    def __init__(self, path: str | Path, lock: StoreLock | None = None) -> None:
        self.path = Path(path)
        self._own_lock = lock is None
        self._lock = lock if lock is not None else StoreLock(self.path)
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
        token_dtype = metadata.token_dtype
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
                ((w, encode_array(window_tokens[w], token_dtype)) for w in new_windows),
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
        if self._own_lock:
            self._lock.release()


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
            null_if_nan(stats["max_activation"][i]),
            null_if_nan(stats["mean"][i]),
            null_if_nan(stats["variance"][i]),
            null_if_nan(stats["skewness"][i]),
            null_if_nan(stats["kurtosis"][i]),
            null_if_nan(stats["fraction_active"][i]) if acc.n_values else None,
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
            a = {name: memoryview(encode_array(t[j].cpu(), "float32")) for name, t in acts.items()}
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
    p = positions(family, metadata.window_length)
    acc = LayerAccumulator(family, layer, n_components, p, config, device)
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
            np.stack([decode_array(r[7], "float32", (len(config.quantiles),)) for r in stats])
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
        4: (None, (k, p)),
        5: ("int64", (r,)),
        6: ("int64", (r,)),
        7: (None, (r, p)),
        8: ("int64", (bins * q,)),
        9: ("int64", (bins * q,)),
        10: (None, (bins * q, p)),
    }
    columns: dict[int, torch.Tensor] = {}
    for column, (dtype, shape) in shapes.items():
        stacked = np.stack(
            [
                decode_array(row[column], dtype or row[1], shape).astype(dtype or "float32")
                for row in rows
            ]
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
        columns[10].reshape(n_components * bins, q, p),
    )
    return acc
