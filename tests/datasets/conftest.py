"""Fixtures for the collated-dataset tests: a prose corpus that exists on any machine (the
docstrings and essays of Python standard-library modules), and a tiny random Llama with SmolLM2's
tokenizer, saved as a Hugging Face folder so subprocesses load it in a fraction of a second."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

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
