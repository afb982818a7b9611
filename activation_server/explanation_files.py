"""TDB's published explanation files served beside the datasets (`tdb serve --explanations`).

A spec is `[FAMILY=]LOCATION`: a folder or an http(s) URL prefix holding `<layer>/<index>.jsonl`
(one `NeuronSimulationResults` or `AttentionSimulationResults` line each; tdb_format.py) for one
family (FAMILY, default mlp_neuron), or a folder as `tdb export-explanations` writes it, with one
`<family>/<layer>/<index>.jsonl` tree per family.

A component without a file simply has no explanation here (no such file, HTTP 404). What was read
is kept in memory, absent files included, so each file is read once. A URL that cannot be reached
at all is one error when the server starts (`check`), naming it; if it stops answering later, the
lookups that fail are logged and give nothing. Reads are synchronous (urllib): the server calls
them from worker threads.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from neuron_explainer.datasets.families import FAMILIES
from neuron_explainer.datasets.records import DatasetError, DatasetNotFoundError
from neuron_explainer.datasets.tdb_format import is_url, local_path, split_family_spec
from neuron_explainer.explanations.methods import Method
from neuron_explainer.explanations.store import StoredExplanation
from neuron_explainer.explanations.tdb_format import from_tdb_json

log = logging.getLogger(__name__)

DEFAULT_FAMILY = "mlp_neuron"
# The method explanations read from TDB's files are shown with (their files do not say theirs).
TDB_FILES_METHOD = Method("tdb-files", "tdb-files", "", "published")
TIMEOUT_S = 10.0


def _n_scored(simulation: dict[str, object]) -> int:
    for key in ("scored_sequence_simulations", "attention_simulations"):
        value = simulation.get(key)
        if isinstance(value, list):
            return len(value)
    return 0


@dataclass
class ExplanationFiles:
    """One `--explanations` location: family -> folder or URL prefix of `<layer>/<index>.jsonl`."""

    spec: str
    location: str
    family_locations: dict[str, str]
    _cache: dict[tuple[str, int, int], list[StoredExplanation]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_spec(cls, spec: str) -> ExplanationFiles:
        """Parse `[FAMILY=]LOCATION`. ValueError for an unknown family, DatasetNotFoundError for
        a local folder that does not exist."""
        family, location = split_family_spec(spec, "--explanations")
        if is_url(location):
            return cls(spec, location, {family or DEFAULT_FAMILY: location.rstrip("/")})
        folder = local_path(location)
        if not folder.is_dir():
            raise DatasetNotFoundError(f"--explanations {spec!r}: no folder at {folder}")
        if family is not None:
            return cls(spec, location, {family: str(folder)})
        per_family = {f: str(folder / f) for f in FAMILIES if (folder / f).is_dir()}
        return cls(spec, location, per_family or {DEFAULT_FAMILY: str(folder)})

    @property
    def families(self) -> list[str]:
        return list(self.family_locations)

    def check(self) -> None:
        """DatasetError naming the URL when a URL location cannot be reached at all (an HTTP
        answer of any status, a 404 for the bare prefix included, counts as reachable)."""
        for where in self.family_locations.values():
            if not is_url(where):
                continue
            try:
                with urllib.request.urlopen(where + "/", timeout=TIMEOUT_S):
                    pass
            except urllib.error.HTTPError:
                pass  # it answered
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise DatasetError(f"--explanations: cannot reach {where}: {reason}") from e

    def _read(self, where: str, layer: int, index: int) -> str | None:
        """The file's text, or None when there is no such file."""
        if is_url(where):
            url = f"{where}/{layer}/{index}.jsonl"
            try:
                with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
                    return str(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                if e.code != 404:
                    log.warning("--explanations: %s answered %s", url, e.code)
                return None
            except (urllib.error.URLError, OSError) as e:
                log.warning("--explanations: cannot read %s: %s", url, getattr(e, "reason", e))
                return None
        path = Path(where) / str(layer) / f"{index}.jsonl"
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def explanations(self, family: str, layer: int, index: int) -> list[StoredExplanation]:
        """The component's explanations in the files, as TDB ordered them; [] without a file."""
        where = self.family_locations.get(family)
        if where is None:
            return []
        key = (family, layer, index)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        text = self._read(where, layer, index)
        found: list[StoredExplanation] = []
        if text is not None:
            try:
                line = next(line for line in text.splitlines() if line.strip())
                parsed = from_tdb_json(json.loads(line))
            except (StopIteration, ValueError, KeyError, TypeError, AttributeError) as e:
                log.warning(
                    "--explanations: %s/%s/%s.jsonl is not a TDB explanation file (%s)",
                    where,
                    layer,
                    index,
                    e,
                )
                parsed = []
            found = [
                StoredExplanation(
                    family,
                    layer,
                    index,
                    TDB_FILES_METHOD,
                    e.explanation,
                    e.scores,
                    _n_scored(e.simulation),
                )
                for e in parsed
            ]
        with self._lock:
            self._cache[key] = found
        return found
