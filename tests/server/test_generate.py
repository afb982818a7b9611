"""`/generate` over HTTP (it uses the key/value cache): greedy tokens equal the library's generation
rerunning the whole prefix, and the smallest temperatures the API accepts behave as greedy instead of
producing NaN probabilities."""

from __future__ import annotations

from neuron_explainer.activations import Engine
from neuron_explainer.activations.processing import generate
from neuron_explainer.models import HookedTransformer
from tests.servers import Server, post

PROMPT = "Once upon a time, in a small village by the sea,"


def test_generate_equals_uncached_library_generation(
    server: Server, default_model: HookedTransformer
) -> None:
    out = post(server, "/generate", {"prompt": PROMPT, "maxNewTokens": 16})
    assert out["tokenIds"] == generate(Engine(default_model), PROMPT, 16, use_cache=False)


def test_tiny_temperatures_are_greedy(server: Server) -> None:
    greedy = post(server, "/generate", {"prompt": PROMPT, "maxNewTokens": 8})["tokenIds"]
    for temperature in (1e-300, 5e-324, 1e-30):
        body = {"prompt": PROMPT, "maxNewTokens": 8, "temperature": temperature, "seed": 1}
        assert post(server, "/generate", body)["tokenIds"] == greedy
