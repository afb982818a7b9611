"""Collated datasets of autoencoder latents: which autoencoders a store was built with.

    autoencoders = load_autoencoders(["~/.cache/tdb/autoencoders/smollm2-135m"], model)
    collate_latents(model, corpus, "latents.sqlite", autoencoders, n_tokens=65_536)

A latent's activation is `encode()` of the activation at its autoencoder's hook point
(families.py), so a latent store only means something together with those autoencoders. Their
identity (hook point, sizes, source path, SHA-256 of the encoder weights) goes into the store's
metadata table under the key `autoencoders` ({family: {layer: identity}}) as soon as the store has
its first commit; resuming a store with other autoencoders is refused, like resuming with other
settings. Readers that do not know the key ignore it; `tdb dataset-info` shows it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from neuron_explainer.datasets.collate import ProgressCallback, collate
from neuron_explainer.datasets.corpus import Corpus, TokenWindows
from neuron_explainer.datasets.families import FAMILIES, LatentFamily, use_autoencoders
from neuron_explainer.datasets.merge import merge_stores
from neuron_explainer.datasets.records import DatasetError
from neuron_explainer.datasets.store import DatasetMetadata
from neuron_explainer.models.autoencoder_formats import load_autoencoder_specs
from neuron_explainer.models.autoencoders import SparseAutoencoder
from neuron_explainer.models.transformer import HookedTransformer

AUTOENCODERS_KEY = "autoencoders"


def load_autoencoders(specs: Iterable[str], model: HookedTransformer) -> list[SparseAutoencoder]:
    """Every autoencoder named by `[HOOK=]PATH` specs, as `tdb serve --autoencoder` reads them (a
    folder may hold several; see autoencoder_formats.load_autoencoder_specs), checked against `model`
    and on its device."""
    autoencoders = load_autoencoder_specs(list(specs), device=model.device)
    for ae in autoencoders:
        ae.check_compatible(model)
    return autoencoders


def stored_autoencoders(store: str | Path) -> dict[str, Any] | None:
    """The autoencoders a store's latents were collated with ({family: {layer: identity}}), or
    None when it records none (or does not exist)."""
    if not Path(store).is_file():
        return None
    conn = sqlite3.connect(f"{Path(store).resolve().as_uri()}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM metadata WHERE key = ?", (AUTOENCODERS_KEY,))
        found = row.fetchone()
    except sqlite3.DatabaseError:
        return None
    finally:
        conn.close()
    return None if found is None else dict(json.loads(found[0]))


def record_autoencoders(store: str | Path, provenance: dict[str, Any]) -> bool:
    """Write `provenance` under the `autoencoders` key once the store has metadata (its first
    commit); returns whether it did. Raises DatasetError when it records other autoencoders."""
    conn = sqlite3.connect(store, timeout=30)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows = dict(conn.execute("SELECT key, value FROM metadata").fetchall())
        except sqlite3.OperationalError:  # no metadata table yet
            rows = {}
        if not rows:
            conn.execute("ROLLBACK")
            return False
        if AUTOENCODERS_KEY in rows:
            conn.execute("ROLLBACK")
            _check_same_autoencoders(store, json.loads(rows[AUTOENCODERS_KEY]), provenance)
            return True
        conn.execute(
            "INSERT INTO metadata VALUES (?, ?)", (AUTOENCODERS_KEY, json.dumps(provenance))
        )
        conn.execute("COMMIT")
        return True
    finally:
        conn.close()


def _check_same_autoencoders(
    store: str | Path, found: dict[str, Any], provenance: dict[str, Any]
) -> None:
    def weights(p: dict[str, Any]) -> dict[tuple[str, str], str]:
        return {
            (f, layer): ident["sha256"]
            for f, layers in p.items()
            for layer, ident in layers.items()
        }

    if weights(found) != weights(provenance):
        differ = sorted(
            f"{f} layer {layer}"
            for f, layer in weights(found).keys() | weights(provenance).keys()
            if weights(found).get((f, layer)) != weights(provenance).get((f, layer))
        )
        raise DatasetError(
            f"{store} was collated with other autoencoders ({', '.join(differ)} differ); pass the "
            "same --autoencoder paths to resume, or write to a new file"
        )


def collate_latents(
    model: HookedTransformer,
    corpus: Corpus | TokenWindows,
    out_path: str | Path,
    autoencoders: Sequence[SparseAutoencoder],
    families: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    on_progress: ProgressCallback | None = None,
    **collate_args: Any,
) -> DatasetMetadata:
    """`collate` with the latent families of `autoencoders` bound to them.

    families: default the latent families of the sides the autoencoders cover; neuron and head
    families may be added. layers: default the layers the autoencoders cover; every latent family
    must have an autoencoder at every layer. Other arguments as for `collate`; the store records
    the autoencoders (module doc)."""
    previous = dict(FAMILIES)
    try:
        bound = {f.name: f for f in use_autoencoders(autoencoders)}
        return _collate_bound(
            model, corpus, out_path, bound, families, layers, on_progress, collate_args
        )
    finally:  # the registry as it was: unbound latent families, or what a caller had bound
        FAMILIES.clear()
        FAMILIES.update(previous)


def _collate_bound(
    model: HookedTransformer,
    corpus: Corpus | TokenWindows,
    out_path: str | Path,
    bound: dict[str, LatentFamily],
    families: Sequence[str] | None,
    layers: Sequence[int] | None,
    on_progress: ProgressCallback | None,
    collate_args: dict[str, Any],
) -> DatasetMetadata:
    if not bound:
        raise ValueError("collate_latents needs at least one autoencoder")
    names = list(families) if families else list(bound)
    latent = [bound[n] for n in names if n in bound]
    unbound = [n for n in names if n not in bound and isinstance(FAMILIES.get(n), LatentFamily)]
    if unbound:
        raise ValueError(f"no autoencoder given for {', '.join(unbound)}")
    if not latent:
        raise ValueError(
            f"autoencoders were given but --families ({', '.join(names)}) has none of their "
            f"latent families ({', '.join(bound)})"
        )
    if layers is None:
        layers = sorted({layer for f in latent for layer in f.autoencoders})
    for family in latent:
        for layer in layers:
            family.autoencoder(layer)  # a ValueError naming the missing one
    provenance = {f.name: f.provenance() for f in latent}
    if Path(out_path).is_file():
        found = stored_autoencoders(out_path)
        if found is not None:
            _check_same_autoencoders(out_path, found, provenance)
    recorded = False

    def progress(done: int, total: int, rate: float) -> None:
        nonlocal recorded
        if not recorded:
            recorded = record_autoencoders(out_path, provenance)
        if on_progress is not None:
            on_progress(done, total, rate)

    meta = collate(
        model,
        corpus,
        out_path,
        families=names,
        layers=layers,
        on_progress=progress,
        **collate_args,
    )
    if not recorded:
        record_autoencoders(out_path, provenance)
    return meta


def shared_autoencoders(stores: Sequence[str | Path]) -> dict[str, Any] | None:
    """The autoencoders that stores to be merged were collated with (None for no latents); raises
    DatasetError when they differ (shards of one latent collation agree)."""
    found = [stored_autoencoders(p) for p in stores]
    for path, other in zip(stores, found, strict=True):
        if (other is None) != (found[0] is None):
            raise DatasetError(f"{stores[0]} and {path} differ in recording autoencoders")
        if other is not None and found[0] is not None:
            _check_same_autoencoders(path, other, found[0])
    return found[0]


def merge_shards(inputs: Sequence[str | Path], out_path: str | Path) -> DatasetMetadata:
    """`merge_stores`, and the autoencoders the inputs were collated with recorded in the result
    (`tdb merge-datasets`; `tdb collate --ray`'s last step)."""
    autoencoders = shared_autoencoders(inputs)
    meta = merge_stores(inputs, out_path)
    if autoencoders is not None:
        record_autoencoders(out_path, autoencoders)
    return meta
