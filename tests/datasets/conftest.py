"""Fixtures for the collated-dataset tests: a prose corpus that exists on any machine (the
docstrings and essays of Python standard-library modules), and a tiny random Llama with SmolLM2's
tokenizer, saved as a Hugging Face folder so subprocesses load it in a fraction of a second."""

from __future__ import annotations

import importlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from neuron_explainer.datasets import DatasetStore, collate, export_tdb
from neuron_explainer.datasets.corpus import folder_corpus
from neuron_explainer.models import HookedTransformer, ModelConfig, export_hf, load_model
from tests.datasets.helpers import torch_threads

# Modules whose documentation is long, plain English prose.
PROSE_MODULES = (
    "argparse",
    "cmd",
    "configparser",
    "copy",
    "csv",
    "difflib",
    "heapq",
    "json",
    "random",
    "sched",
    "smtplib",
    "statistics",
    "timeit",
    "unittest",
)


def stdlib_prose() -> dict[str, str]:
    """{module name: its docstring (and heapq's essay)}, each one document."""
    docs = {}
    for name in PROSE_MODULES:
        module = importlib.import_module(name)
        text = (module.__doc__ or "") + "\n\n" + str(getattr(module, "__about__", ""))
        docs[name] = text.strip()
    return docs


@pytest.fixture(scope="session")
def prose_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of .txt files, a few thousand tokens of varied English."""
    folder = tmp_path_factory.mktemp("prose")
    for name, text in stdlib_prose().items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(
    default_model: HookedTransformer, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A 2-layer random Llama (GQA, 4 heads) with SmolLM2's tokenizer, as a HF folder."""
    cfg = ModelConfig(
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        d_mlp=96,
        vocab_size=default_model.cfg.vocab_size,
        n_ctx=128,
        name="tiny",
    )
    torch.manual_seed(0)
    model = HookedTransformer(cfg)
    model.tokenizer = default_model.tokenizer
    return export_hf(model.requires_grad_(False).eval(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> HookedTransformer:
    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_store(
    tiny_model: HookedTransformer, prose_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("tdb") / "store.sqlite"
    with torch_threads(1):
        collate(
            tiny_model,
            folder_corpus(prose_dir),
            path,
            n_tokens=64 * 16,
            window_length=16,
            batch_size=16,
            k=5,
            random_sample_size=4,
            quantile_sample_size=2,
            progress=False,
        )
    return path


@pytest.fixture(scope="session")
def exported(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tdb-json")
    with DatasetStore(tiny_store) as store:
        n = export_tdb(store, out)
        assert n == len(store.components())
    return out


@pytest.fixture(scope="session")
def http_root(exported: Path) -> Iterator[str]:
    """`python -m http.server` serving the exported folder on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=exported,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{root}/metadata.json", timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.05)
        yield root
    finally:
        server.terminate()
        server.wait()
