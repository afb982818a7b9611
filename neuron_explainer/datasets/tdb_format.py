"""OpenAI Transformer Debugger's published dataset layout: one JSON file per component.

A TDB dataset is a folder (or URL prefix) holding `<layer>/<index>.json`, each a `NeuronRecord`:

    {"dataclass_name": "NeuronRecord",
     "neuron_id": {"dataclass_name": "NeuronId", "layer_index": 5, "neuron_index": 131},
     "most_positive_activation_records": [{"dataclass_name": "ActivationRecord",
                                           "tokens": [...], "activations": [...]}, ...],
     "random_sample": [...], "random_sample_by_quantile": [[...], ...] | null,
     "quantile_boundaries": [...] | null, "mean": ..., "variance": ..., "skewness": ...,
     "kurtosis": ...}

MLP neurons and attention heads live in different datasets (TDB's GPT-2 small heads are under
`.../attn_write_norm/collated-activations-by-token-pair`); for heads `neuron_index` is the head and
each record's activations are one per token pair (q, k <= q), row by row over the lower triangle.
Some TDB head datasets only keep the last m keys of each query (a band): those records are
expanded to the full lower triangle with zeros outside the band.

`read_tdb_record(dataset, layer, index, family)` reads one record from a local folder or over
HTTP(S) (`read_tdb_record_async` with aiohttp underneath). `export_tdb(store, out_dir)` writes a
native store in this layout, one dataset folder per family: `out_dir/<family>/<layer>/<index>.json`,
plus `out_dir/metadata.json` with the store's provenance.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import aiohttp

from neuron_explainer.datasets.families import FAMILIES
from neuron_explainer.datasets.records import (
    ActivationRecord,
    ComponentNotFoundError,
    ComponentRecord,
    DatasetError,
    DatasetNotFoundError,
    is_per_pair,
)
from neuron_explainer.datasets.store import DatasetStore


def is_url(location: str) -> bool:
    """Whether a dataset location is an http(s) URL (else a local path or file:// URL)."""
    return location.startswith(("http://", "https://"))


def split_family_spec(spec: str, option: str) -> tuple[str | None, str]:
    """`[FAMILY=]LOCATION` (a `--dataset` or `--explanations` value) as (family or None,
    location); a URL's own `=` is not a family's. ValueError naming `option` for an unknown
    family."""
    head, sep, rest = spec.partition("=")
    if not (sep and "/" not in head and not is_url(spec)):
        return None, spec
    if head not in FAMILIES:
        raise ValueError(f"unknown component family {head!r} in {option} {spec!r}")
    return head, rest


def local_path(location: str | Path) -> Path:
    """The path of a local dataset location: a path (`~` expanded) or a file:// URL."""
    text = str(location)
    if text.startswith("file://"):
        return Path(unquote(urlparse(text).path))
    return Path(text).expanduser()


# ---- JSON <-> records -----------------------------------------------------------------------------


def _record_json(record: ActivationRecord) -> dict[str, Any]:
    return {
        "dataclass_name": "ActivationRecord",
        "tokens": record.tokens,
        "activations": record.activations,
    }


def to_tdb_json(record: ComponentRecord) -> dict[str, Any]:
    """A record as TDB's NeuronRecord JSON object (TDB fields only)."""
    return {
        "dataclass_name": "NeuronRecord",
        "neuron_id": {
            "dataclass_name": "NeuronId",
            "layer_index": record.layer,
            "neuron_index": record.index,
        },
        "random_sample": [_record_json(r) for r in record.random_sample],
        "random_sample_by_quantile": None
        if record.random_sample_by_quantile is None
        else [[_record_json(r) for r in group] for group in record.random_sample_by_quantile],
        "quantile_boundaries": record.quantile_boundaries,
        "mean": record.mean,
        "variance": record.variance,
        "skewness": record.skewness,
        "kurtosis": record.kurtosis,
        "most_positive_activation_records": [
            _record_json(r) for r in record.most_positive_activation_records
        ],
    }


def _expand_band(activations: list[float], n: int) -> list[float]:
    """Pair activations of a band-limited TDB head record (each query keeps its last m keys) as
    the full lower triangle, zeros outside the band."""
    full = n * (n + 1) // 2
    missing = full - len(activations)
    # The band drops (n - m)(n - m + 1)/2 pairs; solve for m.
    dropped_rows = (math.isqrt(8 * missing + 1) - 1) // 2
    if dropped_rows * (dropped_rows + 1) // 2 != missing or not 0 < dropped_rows < n:
        raise DatasetError(f"{len(activations)} pair activations fit no band of {n} tokens")
    m = n - dropped_rows
    out = [0.0] * full
    source = 0
    for q in range(n):
        width = min(q + 1, m)
        row_start = q * (q + 1) // 2
        for k in range(q + 1 - width, q + 1):
            out[row_start + k] = float(activations[source])
            source += 1
    return out


def _parse_activation_record(obj: Any, per_pair: bool, where: str) -> ActivationRecord:
    if not isinstance(obj, dict) or "tokens" not in obj or "activations" not in obj:
        raise DatasetError(f"{where}: an activation record needs tokens and activations")
    tokens = [str(t) for t in obj["tokens"]]
    activations = [float(a) for a in obj["activations"]]
    n = len(tokens)
    if per_pair:
        if len(activations) < n * (n + 1) // 2:
            activations = _expand_band(activations, n)
        elif len(activations) != n * (n + 1) // 2:
            raise DatasetError(
                f"{where}: {len(activations)} activations for {n} tokens; a head record has "
                f"{n * (n + 1) // 2} (one per token pair)"
            )
    elif len(activations) != n:
        raise DatasetError(f"{where}: {len(activations)} activations for {n} tokens")
    return ActivationRecord(tokens, activations)


def _optional_float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def from_tdb_json(
    data: Any, family: str, layer: int, index: int, where: str = "record"
) -> ComponentRecord:
    """A TDB NeuronRecord JSON object as a ComponentRecord (fraction active and dead unknown)."""
    if not isinstance(data, dict) or "most_positive_activation_records" not in data:
        raise DatasetError(f"{where} is not a TDB NeuronRecord")
    per_pair = is_per_pair(family)

    def records(items: Any) -> list[ActivationRecord]:
        return [_parse_activation_record(r, per_pair, where) for r in items or []]

    top = records(data["most_positive_activation_records"])
    by_quantile = data.get("random_sample_by_quantile")
    boundaries = data.get("quantile_boundaries")
    return ComponentRecord(
        family=family,
        layer=int(layer),
        index=int(index),
        max_activation=max((max(r.activations) for r in top if r.activations), default=math.nan),
        most_positive_activation_records=top,
        random_sample=records(data.get("random_sample")),
        random_sample_by_quantile=None
        if by_quantile is None
        else [records(g) for g in by_quantile],
        quantile_boundaries=None if boundaries is None else [float(b) for b in boundaries],
        mean=_optional_float(data.get("mean")),
        variance=_optional_float(data.get("variance")),
        skewness=_optional_float(data.get("skewness")),
        kurtosis=_optional_float(data.get("kurtosis")),
    )


# ---- reading --------------------------------------------------------------------------------------


async def read_tdb_record_async(
    dataset: str | Path,
    layer: int,
    index: int,
    family: str = "mlp_neuron",
    session: aiohttp.ClientSession | None = None,
    timeout: float = 30.0,
) -> ComponentRecord:
    """One record of the TDB dataset at `dataset` (a folder, file:// or http(s):// URL).

    Raises ComponentNotFoundError when the record does not exist (HTTP 404 or no such file),
    DatasetNotFoundError when a local dataset folder does not exist, DatasetError otherwise.
    """
    text = str(dataset)
    if not is_url(text):
        return await asyncio.to_thread(_read_local, local_path(text), layer, index, family)
    url = f"{text.rstrip('/')}/{int(layer)}/{int(index)}.json"
    own_session = session is None
    client = session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
    try:
        async with client.get(url) as response:
            if response.status == 404:
                raise ComponentNotFoundError(f"no {family} record at {url} (HTTP 404)")
            if response.status != 200:
                raise DatasetError(f"{url}: HTTP {response.status} {response.reason}")
            body = await response.read()
    except aiohttp.ClientError as e:
        raise DatasetError(f"cannot read {url}: {e}") from e
    finally:
        if own_session:
            await client.close()
    try:
        data = json.loads(body)
    except ValueError as e:
        raise DatasetError(f"{url} is not JSON ({e})") from e
    return from_tdb_json(data, family, layer, index, where=url)


def _read_local(folder: Path, layer: int, index: int, family: str) -> ComponentRecord:
    if not folder.is_dir():
        raise DatasetNotFoundError(f"no TDB dataset folder at {folder}")
    path = folder / str(int(layer)) / f"{int(index)}.json"
    if not path.is_file():
        raise ComponentNotFoundError(f"no {family} record for layer {layer} index {index} ({path})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DatasetError(f"{path} is not JSON ({e})") from e
    return from_tdb_json(data, family, layer, index, where=str(path))


def read_tdb_record(
    dataset: str | Path, layer: int, index: int, family: str = "mlp_neuron", timeout: float = 30.0
) -> ComponentRecord:
    """Synchronous `read_tdb_record_async` (not callable from inside a running event loop)."""
    return asyncio.run(read_tdb_record_async(dataset, layer, index, family, timeout=timeout))


def list_tdb_components(dataset: str | Path) -> list[tuple[int, int]]:
    """(layer, index) of every record in a local TDB dataset folder, sorted."""
    folder = local_path(dataset)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"no TDB dataset folder at {folder}")
    found = []
    for layer_dir in folder.iterdir():
        if layer_dir.is_dir() and layer_dir.name.isdigit():
            found += [
                (int(layer_dir.name), int(f.stem))
                for f in layer_dir.glob("*.json")
                if f.stem.isdigit()
            ]
    return sorted(found)


# ---- export ---------------------------------------------------------------------------------------


def export_tdb(
    store: DatasetStore | str | Path,
    out_dir: str | Path,
    families: list[str] | None = None,
    layers: list[int] | None = None,
) -> int:
    """Write every record of `store` (optionally only some families/layers) as TDB JSON under
    `out_dir/<family>/<layer>/<index>.json`; returns the number of records written."""
    own = not isinstance(store, DatasetStore)
    source = DatasetStore(store) if not isinstance(store, DatasetStore) else store
    out = Path(out_dir)
    try:
        meta = source.metadata()
        unknown = sorted(set(families or []) - set(meta.families))
        if unknown:
            raise DatasetNotFoundError(f"{source.path} has no {unknown} components")
        written = 0
        for family, layer, index in source.components():
            if (families and family not in families) or (layers and layer not in layers):
                continue
            path = out / family / str(layer) / f"{index}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            record = to_tdb_json(source.record(family, layer, index))
            path.write_text(json.dumps(record, separators=(",", ":")), encoding="utf-8")
            written += 1
        (out / "metadata.json").write_text(
            json.dumps(
                {
                    "datasets": {f: f for f in meta.families if not families or f in families},
                    "source": meta.to_json(),
                },
                indent=2,
            )
            + "\n"
        )
        return written
    finally:
        if own:
            source.close()
