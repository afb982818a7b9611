"""Explanations and scores inside a collated store (the same SQLite file; datasets.md, section
"Explanations", documents the tables):

    explanation_methods(method_id INTEGER PRIMARY KEY,
        explainer TEXT, simulator TEXT, model TEXT, prompt_version TEXT,  -- UNIQUE together
        created_at TEXT)
    explanations(family, layer, idx, method_id,         -- one row per component and method
        explanation TEXT,                                -- NULL when it failed
        ev_correlation_score, rsquared_score, absolute_dev_explained_score,
        roc_auc_score REAL,                              -- NULL where undefined (or failed)
        n_scored_excerpts INTEGER,                       -- held-out excerpts scored
        error TEXT,                                      -- why it failed, else NULL
        PRIMARY KEY (family, layer, idx, method_id)) WITHOUT ROWID

    explanation_judge_scores(family, layer, idx, method_id,   -- the explanation judged
        scorer TEXT,                                     -- 'detection' | 'fuzzing' (judge.py)
        judge_model TEXT, judge_prompt_version TEXT,
        accuracy, balanced_accuracy REAL,                -- NULL when it failed
        n_items, n_unanswered INTEGER,
        error TEXT,
        PRIMARY KEY (family, layer, idx, method_id, scorer, judge_model, judge_prompt_version))

The judge table came later: a writer creates it in a store that lacks it (nothing else changes),
and readers treat a store without it as having no judge scores, so older stores stay readable.
Rows carry no timestamps, so a batch interrupted and rerun leaves the same table as one run
through. Writing takes the store's lock (`STORE.lock`, as a collation does): one writer at a time.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuron_explainer.datasets.store import connect, utc_now
from neuron_explainer.datasets.store_writer import StoreLock
from neuron_explainer.explanations.methods import Method
from neuron_explainer.explanations.scoring import Scores

SCHEMA = """
CREATE TABLE IF NOT EXISTS explanation_methods (
    method_id INTEGER PRIMARY KEY,
    explainer TEXT NOT NULL, simulator TEXT NOT NULL, model TEXT NOT NULL,
    prompt_version TEXT NOT NULL, created_at TEXT NOT NULL,
    UNIQUE (explainer, simulator, model, prompt_version)
);
CREATE TABLE IF NOT EXISTS explanations (
    family TEXT NOT NULL, layer INTEGER NOT NULL, idx INTEGER NOT NULL,
    method_id INTEGER NOT NULL REFERENCES explanation_methods (method_id),
    explanation TEXT,
    ev_correlation_score REAL, rsquared_score REAL, absolute_dev_explained_score REAL,
    roc_auc_score REAL,
    n_scored_excerpts INTEGER NOT NULL,
    error TEXT,
    PRIMARY KEY (family, layer, idx, method_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS explanation_judge_scores (
    family TEXT NOT NULL, layer INTEGER NOT NULL, idx INTEGER NOT NULL,
    method_id INTEGER NOT NULL REFERENCES explanation_methods (method_id),
    scorer TEXT NOT NULL, judge_model TEXT NOT NULL, judge_prompt_version TEXT NOT NULL,
    accuracy REAL, balanced_accuracy REAL,
    n_items INTEGER NOT NULL, n_unanswered INTEGER NOT NULL,
    error TEXT,
    PRIMARY KEY (family, layer, idx, method_id, scorer, judge_model, judge_prompt_version)
) WITHOUT ROWID;
"""

Node = tuple[str, int, int]  # (family, layer, index)


@dataclass(frozen=True)
class StoredExplanation:
    """One row of the explanations table, with its method."""

    family: str
    layer: int
    index: int
    method: Method
    explanation: str | None
    scores: Scores
    n_scored_excerpts: int
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def score(self) -> float | None:
        return self.scores.best


class ExplanationWriter:
    """Adds explanation rows to a store; `write` commits one batch as one transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = StoreLock(self.path)
        try:
            self.conn = connect(self.path)
            self.conn.isolation_level = None  # explicit transactions
            self.conn.executescript(SCHEMA)
        except BaseException:
            self._lock.release()
            raise

    def close(self) -> None:
        self.conn.close()
        self._lock.release()

    def __enter__(self) -> ExplanationWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def method_id(self, method: Method) -> int:
        key = (method.explainer, method.simulator, method.model, method.prompt_version)
        row = self.conn.execute(
            "SELECT method_id FROM explanation_methods WHERE explainer = ? AND simulator = ? "
            "AND model = ? AND prompt_version = ?",
            key,
        ).fetchone()
        if row is None:
            cur = self.conn.execute(
                "INSERT INTO explanation_methods (explainer, simulator, model, prompt_version, "
                "created_at) VALUES (?, ?, ?, ?, ?)",
                (*key, utc_now()),
            )
            return int(cur.lastrowid or 0)
        return int(row[0])

    def done(self, method_id: int) -> set[Node]:
        """The components that have a row (succeeded or failed) for this method."""
        rows = self.conn.execute(
            "SELECT family, layer, idx FROM explanations WHERE method_id = ?", (method_id,)
        )
        return {(str(f), int(lay), int(i)) for f, lay, i in rows}

    def write(self, method_id: int, rows: Iterable[StoredExplanation]) -> None:
        values = [
            (
                r.family,
                r.layer,
                r.index,
                method_id,
                r.explanation,
                r.scores.ev_correlation_score,
                r.scores.rsquared_score,
                r.scores.absolute_dev_explained_score,
                r.scores.roc_auc_score,
                r.n_scored_excerpts,
                r.error,
            )
            for r in rows
        ]
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany(
                "INSERT OR REPLACE INTO explanations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def judged(self, judge_model: str, prompt_version: str) -> set[tuple[str, int, int, int, str]]:
        """(family, layer, index, method_id, scorer) of every judge row of this judge."""
        rows = self.conn.execute(
            "SELECT family, layer, idx, method_id, scorer FROM explanation_judge_scores "
            "WHERE judge_model = ? AND judge_prompt_version = ?",
            (judge_model, prompt_version),
        )
        return {(str(f), int(lay), int(i), int(m), str(sc)) for f, lay, i, m, sc in rows}

    def write_judged(self, rows: Iterable[JudgeScoreRow]) -> None:
        """Judge scores (one transaction), each for the explanation of `method_id`."""
        values = [
            (
                r.family,
                r.layer,
                r.index,
                r.method_id,
                r.scorer,
                r.judge_model,
                r.judge_prompt_version,
                r.accuracy,
                r.balanced_accuracy,
                r.n_items,
                r.n_unanswered,
                r.error,
            )
            for r in rows
        ]
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany(
                "INSERT OR REPLACE INTO explanation_judge_scores VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise


@dataclass(frozen=True)
class JudgeScoreRow:
    """One row of explanation_judge_scores: a judge's score of one stored explanation."""

    family: str
    layer: int
    index: int
    method_id: int
    scorer: str
    judge_model: str
    judge_prompt_version: str
    accuracy: float | None
    balanced_accuracy: float | None
    n_items: int
    n_unanswered: int
    error: str | None = None
    method: Method | None = None  # the judged explanation's method, when read back


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None


def read_judge_scores(
    conn: sqlite3.Connection, family: str, layer: int, index: int
) -> list[JudgeScoreRow]:
    """Every judge score of one component's explanations (none in a store without the table),
    ordered by method, scorer and judge."""
    if not _has_table(conn, "explanation_judge_scores"):
        return []
    rows = conn.execute(
        "SELECT j.family, j.layer, j.idx, j.method_id, j.scorer, j.judge_model, "
        "j.judge_prompt_version, j.accuracy, j.balanced_accuracy, j.n_items, j.n_unanswered, "
        "j.error, m.explainer, m.simulator, m.model, m.prompt_version "
        "FROM explanation_judge_scores j JOIN explanation_methods m USING (method_id) "
        "WHERE j.family = ? AND j.layer = ? AND j.idx = ? "
        "ORDER BY j.method_id, j.scorer, j.judge_model, j.judge_prompt_version",
        (family, layer, index),
    ).fetchall()
    return [
        JudgeScoreRow(
            str(r[0]),
            int(r[1]),
            int(r[2]),
            int(r[3]),
            str(r[4]),
            str(r[5]),
            str(r[6]),
            r[7],
            r[8],
            int(r[9]),
            int(r[10]),
            r[11],
            Method(r[12], r[13], r[14], r[15]),
        )
        for r in rows
    ]


def explanation_rows(
    conn: sqlite3.Connection,
) -> list[tuple[str, int, int, int, str]]:
    """(family, layer, index, method_id, explanation) of every explanation that did not fail."""
    if not has_explanations(conn):
        return []
    rows = conn.execute(
        "SELECT family, layer, idx, method_id, explanation FROM explanations "
        "WHERE error IS NULL AND explanation IS NOT NULL ORDER BY family, layer, idx, method_id"
    ).fetchall()
    return [(str(f), int(lay), int(i), int(m), str(e)) for f, lay, i, m, e in rows]


_SELECT = (
    "SELECT e.family, e.layer, e.idx, m.explainer, m.simulator, m.model, m.prompt_version, "
    "e.explanation, e.ev_correlation_score, e.rsquared_score, e.absolute_dev_explained_score, "
    "e.roc_auc_score, e.n_scored_excerpts, e.error "
    "FROM explanations e JOIN explanation_methods m USING (method_id)"
)


def _row(row: tuple[Any, ...]) -> StoredExplanation:
    return StoredExplanation(
        family=row[0],
        layer=int(row[1]),
        index=int(row[2]),
        method=Method(row[3], row[4], row[5], row[6]),
        explanation=row[7],
        scores=Scores(row[8], row[9], row[10], row[11]),
        n_scored_excerpts=int(row[12]),
        error=row[13],
    )


def has_explanations(conn: sqlite3.Connection) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'explanations'"
        ).fetchone()
        is not None
    )


def read_explanations(
    conn: sqlite3.Connection, family: str, layer: int, index: int
) -> list[StoredExplanation]:
    """Every method's explanation of one component, best score first (failed ones last)."""
    if not has_explanations(conn):
        return []
    rows = conn.execute(
        _SELECT + " WHERE e.family = ? AND e.layer = ? AND e.idx = ?", (family, layer, index)
    ).fetchall()
    return sorted((_row(r) for r in rows), key=_rank)


def _rank(e: StoredExplanation) -> tuple[int, float, str]:
    score = e.score
    return (e.failed, -score if score is not None else float("inf"), e.method.label())


def best_explanations(
    conn: sqlite3.Connection, family: str | None = None, layer: int | None = None
) -> dict[Node, StoredExplanation]:
    """The best explanation (highest score over all methods; failed ones never) of every
    component that has one, optionally of one family and layer."""
    if not has_explanations(conn):
        return {}
    where, args = ["e.error IS NULL"], list[object]()
    if family is not None:
        where.append("e.family = ?")
        args.append(family)
    if layer is not None:
        where.append("e.layer = ?")
        args.append(layer)
    best: dict[Node, StoredExplanation] = {}
    for row in conn.execute(_SELECT + " WHERE " + " AND ".join(where), args):
        e = _row(row)
        key = (e.family, e.layer, e.index)
        if key not in best or _rank(e) < _rank(best[key]):
            best[key] = e
    return best


def all_explanations(conn: sqlite3.Connection, method: Method) -> list[StoredExplanation]:
    """Every row of one method, sorted by component."""
    if not has_explanations(conn):
        return []
    rows = conn.execute(
        _SELECT + " WHERE m.explainer = ? AND m.simulator = ? AND m.model = ? "
        "AND m.prompt_version = ? ORDER BY e.family, e.layer, e.idx",
        (method.explainer, method.simulator, method.model, method.prompt_version),
    ).fetchall()
    return [_row(r) for r in rows]


class ExplanationReader:
    """Read access to a store's explanations (its own read-only connection; thread-safe): what a
    server opens beside the store's records."""

    def __init__(self, path: str | Path) -> None:
        self._conn = connect(path, readonly=True)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._conn.close()

    def explanations(self, family: str, layer: int, index: int) -> list[StoredExplanation]:
        """Every method's explanation of one component, best first (`read_explanations`)."""
        with self._lock:
            return read_explanations(self._conn, family, layer, index)

    def best(self, family: str, layer: int, index: int) -> StoredExplanation | None:
        """The highest-scoring explanation that did not fail, or None."""
        found = [e for e in self.explanations(family, layer, index) if not e.failed]
        return found[0] if found else None

    def best_of_layer(self, family: str, layer: int) -> dict[Node, StoredExplanation]:
        """The best explanation of every component of one family and layer that has one."""
        with self._lock:
            return best_explanations(self._conn, family, layer)
