"""The collated datasets a server reads, by name: native stores and TDB JSON layouts.

    datasets = DatasetRegistry()
    datasets.add("smollm2.tdb.sqlite")                       # a native store (all its families)
    datasets.add("attention_head=https://host/heads/")       # a TDB layout of one family
    datasets.add("/data/gpt2-tdb/")                          # a folder written by `tdb export-tdb`
    info, record = await datasets.record("mlp_neuron", 5, 131)

A spec is `[FAMILY=]LOCATION`. LOCATION is a store file (.sqlite/.db or any existing file), a
folder, or an http(s) URL. A folder or URL in TDB's layout holds `<layer>/<index>.json` for one
family (FAMILY, default mlp_neuron), or, as `tdb export-tdb` writes, `<family>/<layer>/<index>.json`
for several with a `metadata.json` listing them.

A store may not exist yet (the server builds the default one in the background): it is opened on
first use, and until then lookups say it is still being built. Records of a store are read in a
worker thread; TDB records over HTTP with aiohttp. What a dataset is, as /neuron_datasets_metadata
describes it, is a `DatasetInfoModel` (schemas.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import aiohttp

from activation_server.explanation_files import ExplanationFiles
from activation_server.schemas import DatasetInfoModel
from neuron_explainer.datasets.records import (
    ComponentNotFoundError,
    ComponentRecord,
    DatasetError,
    DatasetNotFoundError,
)
from neuron_explainer.datasets.store import DatasetStore
from neuron_explainer.datasets.tdb_format import (
    is_url,
    local_path,
    read_tdb_record_async,
    split_family_spec,
)
from neuron_explainer.explanations.store import ExplanationReader, StoredExplanation

DEFAULT_TDB_FAMILY = "mlp_neuron"


@dataclass
class _StoreSource:
    name: str
    path: Path
    store: DatasetStore | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    explanation_reader: ExplanationReader | None = None

    def explanations(self, family: str, layer: int, index: int) -> list[StoredExplanation]:
        """The explanations the store holds for one component (none before it is written)."""
        if self.open() is None:
            return []
        with self.lock:
            if self.explanation_reader is None:
                self.explanation_reader = ExplanationReader(self.path)
            reader = self.explanation_reader
        return reader.explanations(family, layer, index)

    def best_of_layer(
        self, family: str, layer: int
    ) -> dict[tuple[str, int, int], StoredExplanation]:
        if self.open() is None:
            return {}
        with self.lock:
            if self.explanation_reader is None:
                self.explanation_reader = ExplanationReader(self.path)
            reader = self.explanation_reader
        return reader.best_of_layer(family, layer)

    def open(self) -> DatasetStore | None:
        with self.lock:
            if self.store is None and self.path.is_file():
                try:
                    self.store = DatasetStore(self.path)
                except DatasetError:
                    return None  # created but not yet committed: still being built
            return self.store

    def info(self) -> DatasetInfoModel:
        store = self.open()
        if store is None:
            return DatasetInfoModel(
                name=self.name, kind="store", location=str(self.path), families=[], available=False
            )
        meta = store.refresh_metadata()
        return DatasetInfoModel(
            name=self.name,
            kind="store",
            location=str(self.path),
            families=list(meta.families),
            available=True,
            model_name=meta.model.get("name"),
            n_tokens=meta.n_tokens,
            status=meta.status,
            layers=list(meta.layers),
            window_length=meta.window_length,
            corpus=meta.corpus.get("name"),
            updated_at=meta.updated_at,
        )

    async def record(self, family: str, layer: int, index: int) -> ComponentRecord:
        store = await asyncio.to_thread(self.open)
        if store is None:
            raise DatasetNotFoundError(
                f"dataset {self.name!r} ({self.path}) is not written yet; if the server is "
                "building it, see GET /jobs for its progress"
            )
        return await asyncio.to_thread(store.record, family, layer, index)


@dataclass
class _TdbSource:
    name: str
    location: str
    family_locations: dict[str, str]  # family -> folder or URL prefix of <layer>/<index>.json
    session: aiohttp.ClientSession | None = None

    def info(self) -> DatasetInfoModel:
        return DatasetInfoModel(
            name=self.name,
            kind="tdb",
            location=self.location,
            families=list(self.family_locations),
            available=True,
        )

    async def record(self, family: str, layer: int, index: int) -> ComponentRecord:
        if family not in self.family_locations:
            raise ComponentNotFoundError(
                f"dataset {self.name!r} has no {family!r} records "
                f"(it holds {', '.join(self.family_locations)})"
            )
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        return await read_tdb_record_async(
            self.family_locations[family], layer, index, family, session=self.session
        )


_Source = _StoreSource | _TdbSource


def _best_first(e: StoredExplanation) -> tuple[bool, float]:
    """Sort key: explanations that did not fail, highest score first (no score: last)."""
    score = e.score
    return (e.failed, -score if score is not None else float("inf"))


def _name_of(location: str) -> str:
    if is_url(location):
        parts = [p for p in urlparse(location).path.split("/") if p]
        return parts[-1] if parts else urlparse(location).netloc
    path = local_path(location)
    return path.stem if path.suffix in (".sqlite", ".db") else path.name


def _is_store(location: str) -> bool:
    if is_url(location):
        return False
    path = local_path(location)
    return path.suffix in (".sqlite", ".db") or path.is_file()


def _tdb_families(location: str, family: str | None) -> dict[str, str]:
    """family -> location of its `<layer>/<index>.json` files, for a local folder."""
    if family is not None:
        return {family: location}
    folder = local_path(location)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"no dataset at {location} (neither a store file nor a folder)")
    listed = _listed_families(folder / "metadata.json")
    if listed:
        return {f: str(folder / sub) for f, sub in listed.items()}
    return {DEFAULT_TDB_FAMILY: str(folder)}


def _listed_families(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    datasets = data.get("datasets") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in datasets.items()} if isinstance(datasets, dict) else {}


class DatasetRegistry:
    """Named datasets, in the order added; lookups by family pick the first that has it."""

    def __init__(self) -> None:
        self._sources: dict[str, _Source] = {}
        self._explanation_files: list[ExplanationFiles] = []

    def add_explanations(self, spec: str) -> ExplanationFiles:
        """Add TDB's published explanation files (`[FAMILY=]PATH|URL`, explanation_files.py):
        their explanations join those of the stores for every component of their families."""
        files = ExplanationFiles.from_spec(spec)
        self._explanation_files.append(files)
        return files

    def file_explanations(self, family: str, layer: int, index: int) -> list[StoredExplanation]:
        """The component's explanations in the `--explanations` files (blocking reads)."""
        found: list[StoredExplanation] = []
        for files in self._explanation_files:
            found += files.explanations(family, layer, index)
        return found

    def add(self, spec: str, name: str | None = None) -> str:
        """Add a dataset from a `[FAMILY=]LOCATION` spec; returns its name. A store file need
        not exist yet. Raises DatasetNotFoundError for a local folder that does not exist and
        ValueError for an unknown family."""
        family, location = split_family_spec(spec, "--dataset")
        base = name or _name_of(location)
        name = base
        for n in range(2, 1000):
            if name not in self._sources:
                break
            name = f"{base}-{n}"
        if family is None and _is_store(location):
            self._sources[name] = _StoreSource(name, local_path(location))
        elif is_url(location):
            self._sources[name] = _TdbSource(
                name, location, {family or DEFAULT_TDB_FAMILY: location}
            )
        else:
            self._sources[name] = _TdbSource(name, location, _tdb_families(location, family))
        return name

    async def add_url_root(self, url: str, name: str | None = None) -> str:
        """Add a TDB root over HTTP whose `metadata.json` lists families (as `tdb export-tdb`
        writes); without one, the URL is a single mlp_neuron layout."""
        families = {DEFAULT_TDB_FAMILY: url}
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
                session.get(url.rstrip("/") + "/metadata.json") as response,
            ):
                if response.status == 200:
                    data = json.loads(await response.read())
                    listed = data.get("datasets") if isinstance(data, dict) else None
                    if isinstance(listed, dict) and listed:
                        families = {str(f): f"{url.rstrip('/')}/{sub}" for f, sub in listed.items()}
        except (aiohttp.ClientError, ValueError, TimeoutError):
            pass
        key = self.add(url, name)
        source = self._sources[key]
        assert isinstance(source, _TdbSource)
        source.family_locations = families
        return key

    def names(self) -> list[str]:
        return list(self._sources)

    def infos(self) -> list[DatasetInfoModel]:
        return [s.info() for s in self._sources.values()]

    def _pick(self, family: str, dataset: str | None) -> _Source:
        if dataset is not None:
            for source in self._sources.values():
                location = source.path if isinstance(source, _StoreSource) else source.location
                if dataset in (source.name, str(location)):
                    return source
            known = ", ".join(self._sources) or "none (start the server with --dataset)"
            raise DatasetNotFoundError(f"unknown dataset {dataset!r}; known: {known}")
        if not self._sources:
            raise DatasetNotFoundError(
                "this server has no collated datasets; start it with --dataset PATH|URL "
                "(or --auto-dataset to build one for the default model)"
            )
        for source in self._sources.values():
            info = source.info()
            if family in info.families or not info.available:
                return source
        raise DatasetNotFoundError(
            f"no dataset of this server holds {family!r} records "
            f"(datasets: {', '.join(self._sources)})"
        )

    async def record(
        self, family: str, layer: int, index: int, dataset: str | None = None
    ) -> tuple[DatasetInfoModel, ComponentRecord]:
        """The record of one component from `dataset` (name or location), or from the first
        dataset holding `family`. DatasetNotFoundError / ComponentNotFoundError otherwise."""
        source = self._pick(family, dataset)
        record = await source.record(family, layer, index)
        return source.info(), record

    async def explanations(
        self, family: str, layer: int, index: int, dataset: str | None = None
    ) -> tuple[DatasetInfoModel, list[StoredExplanation]]:
        """The explanations of one component in `dataset` (or the first dataset holding
        `family`), best first; TDB layouts hold none here."""
        source = self._pick(family, dataset)
        found: list[StoredExplanation] = []
        if isinstance(source, _StoreSource):
            found = await asyncio.to_thread(source.explanations, family, layer, index)
        if self._explanation_files:
            files = await asyncio.to_thread(self.file_explanations, family, layer, index)
            found = sorted(found + files, key=_best_first)
        return source.info(), found

    def explanation_lookup(
        self, model_name: str
    ) -> Callable[[str, int, int], StoredExplanation | None]:
        """A function (family, layer, index) -> the best explanation held by the first store of
        `model_name` that holds `family`, else the best in the `--explanations` files, or None;
        it reads each family and layer of a store once (and each file once)."""
        layers: dict[tuple[str, int], dict[tuple[str, int, int], StoredExplanation]] = {}

        def source_of(family: str) -> _StoreSource | None:
            for source in self._sources.values():
                if isinstance(source, _StoreSource):
                    info = source.info()
                    if info.model_name == model_name and family in info.families:
                        return source
            return None

        sources: dict[str, _StoreSource | None] = {}

        def lookup(family: str, layer: int, index: int) -> StoredExplanation | None:
            if family not in sources:
                sources[family] = source_of(family)
            source = sources[family]
            best = None
            if source is not None:
                if (family, layer) not in layers:
                    layers[family, layer] = source.best_of_layer(family, layer)
                best = layers[family, layer].get((family, layer, index))
            if best is None and self._explanation_files:
                ok = [e for e in self.file_explanations(family, layer, index) if not e.failed]
                best = min(ok, key=_best_first) if ok else None
            return best

        return lookup

    async def close(self) -> None:
        for source in self._sources.values():
            if isinstance(source, _StoreSource) and source.explanation_reader is not None:
                source.explanation_reader.close()
            if isinstance(source, _TdbSource) and source.session is not None:
                await source.session.close()
            elif isinstance(source, _StoreSource) and source.store is not None:
                source.store.close()
