"""OpenAI TDB's published explanation files: `<root>/<layer>/<index>.jsonl`, one JSON line per
component (a folder, or an http(s) URL prefix).

Neurons (and autoencoder latents): `{"dataclass_name": "NeuronSimulationResults", "neuron_id":
{"dataclass_name": "NeuronId", "layer_index": L, "neuron_index": i}, "scored_explanations":
[{"dataclass_name": "ScoredExplanation", "explanation": ..., "scored_simulation":
{"dataclass_name": "ScoredSimulation", "scored_sequence_simulations": [...],
"ev_correlation_score": ..., "rsquared_score": ..., "absolute_dev_explained_score": ...}}]}`.
Heads: `AttentionSimulationResults` with `attention_head_id` and `ScoredAttentionExplanation`s
whose `scored_attention_simulation` holds `attention_simulations` and `roc_auc_score`.

Stores keep scores, not per-excerpt simulations, so an export from a store has empty
`scored_sequence_simulations` / `attention_simulations`; explanations read from TDB's files keep
the whole `scored_simulation` object and write it back unchanged.
"""

from __future__ import annotations

import json
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuron_explainer.datasets.records import is_per_pair
from neuron_explainer.datasets.store import connect
from neuron_explainer.explanations.scoring import Scores
from neuron_explainer.explanations.store import has_explanations, read_explanations


@dataclass(frozen=True)
class TdbExplanation:
    explanation: str
    scores: Scores
    simulation: dict[str, Any] = field(default_factory=dict)  # TDB's scored simulation, as read


def _neuron_id(layer: int, index: int) -> dict[str, Any]:
    return {"dataclass_name": "NeuronId", "layer_index": layer, "neuron_index": index}


def to_tdb_json(
    family: str, layer: int, index: int, explanations: list[TdbExplanation]
) -> dict[str, Any]:
    """One component's results in TDB's form."""
    if is_per_pair(family):
        return {
            "dataclass_name": "AttentionSimulationResults",
            "attention_head_id": _neuron_id(layer, index),
            "scored_explanations": [
                {
                    "dataclass_name": "ScoredAttentionExplanation",
                    "explanation": e.explanation,
                    "scored_attention_simulation": e.simulation
                    or {
                        "dataclass_name": "ScoredAttentionSimulation",
                        "attention_simulations": [],
                        "roc_auc_score": e.scores.roc_auc_score,
                    },
                }
                for e in explanations
            ],
        }
    return {
        "dataclass_name": "NeuronSimulationResults",
        "neuron_id": _neuron_id(layer, index),
        "scored_explanations": [
            {
                "dataclass_name": "ScoredExplanation",
                "explanation": e.explanation,
                "scored_simulation": e.simulation
                or {
                    "dataclass_name": "ScoredSimulation",
                    "scored_sequence_simulations": [],
                    "ev_correlation_score": e.scores.ev_correlation_score,
                    "rsquared_score": e.scores.rsquared_score,
                    "absolute_dev_explained_score": e.scores.absolute_dev_explained_score,
                },
            }
            for e in explanations
        ],
    }


def from_tdb_json(data: dict[str, Any]) -> list[TdbExplanation]:
    """The explanations of one component's TDB results (either kind)."""
    out = []
    for item in data.get("scored_explanations") or []:
        if "scored_attention_simulation" in item:
            sim = item["scored_attention_simulation"] or {}
            scores = Scores(None, None, None, sim.get("roc_auc_score"))
        else:
            sim = item.get("scored_simulation") or {}
            scores = Scores(
                sim.get("ev_correlation_score"),
                sim.get("rsquared_score"),
                sim.get("absolute_dev_explained_score"),
            )
        out.append(TdbExplanation(str(item["explanation"]), scores, sim))
    return out


def read_tdb_explanations(location: str | Path, layer: int, index: int) -> list[TdbExplanation]:
    """`<location>/<layer>/<index>.jsonl` from a folder or an http(s) URL prefix."""
    where = str(location).rstrip("/")
    if where.startswith(("http://", "https://")):
        with urllib.request.urlopen(f"{where}/{layer}/{index}.jsonl", timeout=30) as resp:
            text = resp.read().decode()
    else:
        text = (Path(where) / str(layer) / f"{index}.jsonl").read_text(encoding="utf-8")
    line = next(line for line in text.splitlines() if line.strip())
    return from_tdb_json(json.loads(line))


def write_tdb_explanations(
    root: str | Path, family: str, layer: int, index: int, explanations: list[TdbExplanation]
) -> Path:
    path = Path(root) / str(layer) / f"{index}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_tdb_json(family, layer, index, explanations)) + "\n")
    return path


def export_explanations(store: str | Path, out_dir: str | Path) -> int:
    """Every explanation in a store (all methods, best first, failed ones left out) in TDB's
    layout, one folder per family: `<out_dir>/<family>/<layer>/<index>.jsonl`. Returns the number
    of files written."""
    conn = connect(store, readonly=True)
    try:
        if not has_explanations(conn):
            return 0
        nodes = conn.execute(
            "SELECT DISTINCT family, layer, idx FROM explanations WHERE error IS NULL "
            "ORDER BY family, layer, idx"
        ).fetchall()
        by_family: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for family, layer, index in nodes:
            by_family[family].append((int(layer), int(index)))
        n = 0
        for family, components in by_family.items():
            for layer, index in components:
                found = [e for e in read_explanations(conn, family, layer, index) if not e.failed]
                rows = [TdbExplanation(e.explanation or "", e.scores) for e in found]
                write_tdb_explanations(Path(out_dir) / family, family, layer, index, rows)
                n += 1
        return n
    finally:
        conn.close()
