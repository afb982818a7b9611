"""Generation under node ablations (processing.generate) with the key/value cache against rerunning
the whole prefix with the ablation hooks on at every step: the same tokens, and at every step the
logits of a full forward of the prefix under the same ablations. Random GPT-2 (learned positions: an
embedding ablation scales `hook_pos_embed` too) and Llama (rotary, grouped-query) models, and the
default model. Latent ablations are in test_autoencoder_latents.py."""

from __future__ import annotations

import pytest
import torch

from neuron_explainer.activations import Engine, NodeAblation, NodeIndex, NodeType
from neuron_explainer.activations.processing import generate
from neuron_explainer.models import HookedTransformer, KVCache
from neuron_explainer.models.generation import next_token_logits
from tests.models.test_generation import CONFIGS, random_model

PROMPT = [2, 7, 1, 8, 2, 8, 1, 8, 2, 8]
# Prompt positions: each ablation acts at the prompt and reaches later tokens through the cache.
ABLATIONS = {
    "neuron": [NodeAblation(NodeIndex(NodeType.MLP_NEURON, 0, 9, 5), 4.0)],
    "head row": [NodeAblation(NodeIndex(NodeType.ATTENTION_HEAD, 0, 9, 1))],
    "head pair": [NodeAblation(NodeIndex(NodeType.ATTENTION_HEAD, 0, 6, 2, attended_token=3), 1.0)],
    "embedding": [NodeAblation(NodeIndex(NodeType.EMBEDDING, 0, 8))],
    "several": [
        NodeAblation(NodeIndex(NodeType.EMBEDDING, 0, 2)),
        NodeAblation(NodeIndex(NodeType.MLP_NEURON, 1, 4, 7), -3.0),
        NodeAblation(NodeIndex(NodeType.ATTENTION_HEAD, 1, 9, 0)),
    ],
}


@pytest.fixture(params=list(CONFIGS))
def model(request: pytest.FixtureRequest) -> HookedTransformer:
    return random_model(CONFIGS[request.param])


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_cached_generation_under_ablations_equals_rerunning_the_prefix(
    model: HookedTransformer, name: str
) -> None:
    engine, ablations = Engine(model), ABLATIONS[name]
    cached = generate(engine, PROMPT, 16, node_ablations=ablations)
    assert cached == generate(engine, PROMPT, 16, node_ablations=ablations, use_cache=False)
    sampled = [
        generate(engine, PROMPT, 16, 2.0, seed=5, node_ablations=ablations, use_cache=use_cache)
        for use_cache in (True, False)
    ]
    assert sampled[0] == sampled[1]

    # Every step's logits against a full forward of the prefix with the ablation hooks on.
    hooks = engine.ablation_hooks([ablations])
    seq, cache = torch.tensor(PROMPT), KVCache()
    moved = 0.0
    with torch.no_grad():
        for _ in range(8):
            logits = next_token_logits(model, seq, cache, prefill_hooks=hooks)
            with model.hooks(fwd=hooks):
                full = model(seq[None])[0, -1]
            assert (logits - full).abs().max() < 1e-4
            if len(seq) > len(PROMPT):
                moved = max(moved, float((logits - model(seq[None])[0, -1]).abs().max()))
            seq = torch.cat([seq, logits.argmax()[None]])
    assert moved > 1e-3  # the ablation reaches the new positions, through the cache


# ---- the default model ----------------------------------------------------------------------------

IOI = "When Mary and John went to the store, John gave a drink to"


@pytest.mark.parametrize(
    "ablations",
    [
        [NodeAblation(NodeIndex(NodeType.MLP_NEURON, 3, 10, 100), 20.0)],
        [
            NodeAblation(NodeIndex(NodeType.ATTENTION_HEAD, L, 13, h))
            for L in (20, 25)
            for h in range(9)
        ],
        [NodeAblation(NodeIndex(NodeType.EMBEDDING, 0, 2))],
    ],
    ids=["neuron", "head rows", "embedding"],
)
def test_default_model_generation_under_ablations(
    default_model: HookedTransformer, ablations: list[NodeAblation]
) -> None:
    engine = Engine(default_model)
    cached = generate(engine, IOI, 6, node_ablations=ablations)
    assert cached == generate(engine, IOI, 6, node_ablations=ablations, use_cache=False)
