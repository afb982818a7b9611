"""Loss functions `probs` and `zero`, and the token-pair attribution used by attention-side
latents, on a small random GPT-2 (LayerNorm, biases, learned positions)."""

from __future__ import annotations

import torch

from neuron_explainer.activations import Engine, NodeType, SubRequest
from neuron_explainer.activations.derived_scalars import PassState
from neuron_explainer.activations.node_types.attention_head import token_pair_attribution
from neuron_explainer.models import HookedTransformer
from neuron_explainer.models.hooks import HookPoint

PROMPT = [5, 17, 3, 99, 42, 8, 61, 7]


def test_probs_loss_is_target_probability_and_effects_are_its_gradients(
    model: HookedTransformer,
) -> None:
    [result] = Engine(model).run(
        [SubRequest(PROMPT, target_tokens=[3, 4], loss_fn="probs", top_and_bottom_k=5)]
    )
    post: dict[str, torch.Tensor] = {}

    def leaf(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        post[hook.name] = x.detach().requires_grad_(True)
        return post[hook.name]

    with (
        torch.enable_grad(),
        model.hooks(
            fwd=[("blocks.1.mlp.hook_post", leaf), ("ln_final.hook_scale", lambda x, h: x.detach())]
        ),
    ):
        d = model(torch.tensor([PROMPT]))[0, -1].softmax(-1)[[3, 4]].sum()
        (grad,) = torch.autograd.grad(d, post["blocks.1.mlp.hook_post"])
    d = d.detach()
    assert abs(result.direction_value - d.item()) <= 1e-5 * abs(d.item())
    total = result.metrics["estimated_total_effect"]
    checked = 0
    for j, node in enumerate(result.nodes):
        if node.node_type == NodeType.MLP_NEURON and node.layer == 1:
            a = post["blocks.1.mlp.hook_post"][0, node.token, node.component]
            want = float(a.detach() * grad[0, node.token, node.component])
            assert abs(total[j] - want) <= 1e-5 * abs(want) + 1e-8
            checked += 1
    assert checked


def test_zero_loss_runs_no_backward(model: HookedTransformer) -> None:
    [result] = Engine(model).run([SubRequest(PROMPT, loss_fn="zero", top_and_bottom_k=5)])
    assert result.direction_value == 0.0
    assert all(v == 0 for v in result.metrics["direct_effect"] if v is not None)
    assert all(v == 0 for v in result.metrics["estimated_total_effect"] if v is not None)
    # Activations and write magnitudes still rank the nodes.
    assert any(n.node_type == NodeType.MLP_NEURON for n in result.nodes)
    assert max(v for v in result.metrics["write_magnitude"] if v is not None) > 0


def test_token_pair_attribution_sums_to_attention_output(model: HookedTransformer) -> None:
    tokens = torch.tensor([PROMPT])
    _, cache = model.run_with_cache(tokens)
    state = PassState(model, cache)
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    layer, q = 2, 6
    per_key = token_pair_attribution(state, layer, direction, q)[0]
    attn_out = cache[f"blocks.{layer}.hook_attn_out"][0, q]
    bias = model.blocks[layer].attn.o_proj.bias
    assert bias is not None
    assert torch.allclose(per_key.sum(), (attn_out - bias) @ direction, atol=1e-4)
    assert per_key[q + 1 :].abs().max() == 0  # no attribution to future tokens
