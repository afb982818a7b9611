"""Fixtures shared by the engine's tests."""

from __future__ import annotations

import pytest
import torch

from neuron_explainer.models import HookedTransformer, ModelConfig


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    """A small random GPT-2 (3 layers, d_model 64, vocabulary 120) with perturbed weights, so that
    biases and norms are not at their initial values. Modules needing another model define their
    own `model`."""
    torch.manual_seed(0)
    cfg = ModelConfig.gpt2(n_layers=3, d_model=64, n_heads=4, d_mlp=128, vocab_size=120, n_ctx=32)
    m = HookedTransformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.requires_grad_(False).eval()
