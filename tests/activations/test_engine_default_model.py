"""The engine on the real default model: IOI circuit facts, token-space views, long prompts."""

from __future__ import annotations

import torch

from neuron_explainer.activations import (
    AttentionTraceType,
    Engine,
    NodeAblation,
    NodeIndex,
    NodeToTrace,
    NodeType,
    SubRequest,
)
from neuron_explainer.models import HookedTransformer

IOI = "When Mary and John went to the store, John gave a drink to"


def plain_logit_diff(
    model: HookedTransformer, prompt: str, target: str, distractor: str, zero_heads: list[NodeIndex]
) -> float:
    """D from a plain forward with the given head pairs' attention probabilities set to zero."""
    assert model.tokenizer is not None
    ids = torch.tensor([model.tokenizer.encode(prompt)])

    def zero(x: torch.Tensor, hook: object) -> torch.Tensor:
        x = x.clone()
        for n in zero_heads:
            if hook.name == f"blocks.{n.layer}.attn.hook_pattern":  # type: ignore[attr-defined]
                x[0, n.component, n.token, n.attended_token] = 0.0
        return x

    with torch.no_grad(), model.hooks(fwd=[(lambda name: name.endswith("hook_pattern"), zero)]):
        logits = model(ids)[0, -1]
    t, d = model.tokenizer.single_token_id(target), model.tokenizer.single_token_id(distractor)
    return float(logits[t] - logits[d])


def test_ioi_name_mover_heads_and_their_ablation(default_model: HookedTransformer) -> None:
    model = default_model
    assert model.tokenizer is not None
    [result] = Engine(model).run(
        [SubRequest(IOI, target_tokens=[" Mary"], distractor_tokens=[" John"], top_and_bottom_k=10)]
    )
    mary = result.token_strings.index(" Mary")
    last = len(result.tokens) - 1
    de = result.metrics["direct_effect"]
    ranked = sorted(range(len(result.nodes)), key=lambda j: -(de[j] or 0.0))
    top10 = [result.nodes[j] for j in ranked[:10]]
    movers = [
        n
        for n in top10
        if n.node_type == NodeType.ATTENTION_HEAD and n.token == last and n.attended_token == mary
    ]
    assert movers, f"no head at the last token attending to ' Mary' among {top10}"

    top_heads = [
        result.nodes[j] for j in ranked if result.nodes[j].node_type == NodeType.ATTENTION_HEAD
    ][:3]
    [ablated] = Engine(model).run(
        [
            SubRequest(
                IOI,
                target_tokens=[" Mary"],
                distractor_tokens=[" John"],
                node_ablations=[NodeAblation(n) for n in top_heads],
                token_views=False,
            )
        ]
    )
    independent = plain_logit_diff(model, IOI, " Mary", " John", top_heads)
    assert ablated.direction_value < result.direction_value - 0.5
    assert abs(ablated.direction_value - independent) < 1e-4 * max(1.0, abs(independent))


def test_output_token_view_is_the_logit_lens_of_the_write(default_model: HookedTransformer) -> None:
    model = default_model
    [result] = Engine(model).run(
        [
            SubRequest(
                "The capital of France is", target_tokens=[" Paris"], distractor_tokens=[" London"]
            )
        ]
    )
    neurons = [n for n in result.nodes if n.node_type == NodeType.MLP_NEURON]
    heads = [n for n in result.nodes if n.node_type == NodeType.ATTENTION_HEAD]
    assert neurons and heads
    ids = torch.tensor([result.tokens])
    _, cache = model.run_with_cache(ids)
    gain, w_u = model.ln_final.weight, model.W_U
    for node in neurons[:3] + heads[:3]:
        L, t = node.layer, node.token
        if node.node_type == NodeType.MLP_NEURON:
            a = cache[f"blocks.{L}.mlp.hook_post"][0, t, node.component]
            write = a * model.blocks[L].mlp.w_out.weight[:, node.component]
        else:
            attn = model.blocks[L].attn
            kv = node.component // (attn.n_heads // attn.n_kv_heads)
            v = cache[f"blocks.{L}.attn.hook_v"][0, node.attended_token, kv]
            dh = attn.d_head
            w_o = attn.o_proj.weight[:, node.component * dh : (node.component + 1) * dh]
            a = cache[f"blocks.{L}.attn.hook_pattern"][0, node.component, t, node.attended_token]
            write = a * (w_o @ v)
        lens = (write * gain) @ w_u
        lens = lens - lens.mean()
        want = lens.topk(5).indices.tolist()
        view = result.token_views[node]
        assert [s.token for s in view.upvoted_output_tokens[:5]] == want
        assert abs(view.upvoted_output_tokens[0].score - float(lens.max())) < 1e-3 * float(
            lens.abs().max()
        )
        assert [s.token for s in view.downvoted_output_tokens[:5]] == lens.topk(
            5, largest=False
        ).indices.tolist()


def test_input_token_views_are_gradients_dotted_with_embeddings(
    default_model: HookedTransformer,
) -> None:
    """Neuron: d pre / d resid (norm scale fixed) · W_E. Head: the same for the query and key sides."""
    model = default_model
    [result] = Engine(model).run(
        [SubRequest(IOI, target_tokens=[" Mary"], distractor_tokens=[" John"])]
    )
    ids = torch.tensor([result.tokens])
    checked = {NodeType.MLP_NEURON: 0, NodeType.ATTENTION_HEAD: 0}
    for node in result.nodes:
        if node.node_type not in checked or checked[node.node_type] >= 2:
            continue
        checked[node.node_type] += 1
        L = node.layer
        resid_name = (
            f"blocks.{L}.hook_resid_{'mid' if node.node_type == NodeType.MLP_NEURON else 'pre'}"
        )
        scale_name = (
            f"blocks.{L}.{'ln2' if node.node_type == NodeType.MLP_NEURON else 'ln1'}.hook_scale"
        )
        saved: dict[str, torch.Tensor] = {}

        def leaf(
            x: torch.Tensor, hook: object, saved: dict[str, torch.Tensor] = saved
        ) -> torch.Tensor:
            saved["resid"] = x.detach().requires_grad_(True)
            return saved["resid"]

        def keep(x: torch.Tensor, hook: object, saved: dict[str, torch.Tensor] = saved) -> None:
            saved[hook.name] = x  # type: ignore[attr-defined]

        names = [
            f"blocks.{L}.mlp.hook_pre",
            f"blocks.{L}.attn.hook_rot_q",
            f"blocks.{L}.attn.hook_rot_k",
        ]
        with (
            torch.enable_grad(),
            model.hooks(
                fwd=[(resid_name, leaf), (scale_name, lambda x, h: x.detach())]
                + [(n, keep) for n in names]
            ),
        ):
            model(ids)
        view = result.token_views[node]
        if node.node_type == NodeType.MLP_NEURON:
            pre = saved[f"blocks.{L}.mlp.hook_pre"][0, node.token, node.component]
            (grad,) = torch.autograd.grad(pre, saved["resid"])
            sides = [(grad[0, node.token], view.upvoting_input_tokens)]
        else:
            attn = model.blocks[L].attn
            kv = node.component // (attn.n_heads // attn.n_kv_heads)
            q = saved[f"blocks.{L}.attn.hook_rot_q"][0, node.token, node.component]
            k = saved[f"blocks.{L}.attn.hook_rot_k"][0, node.attended_token, kv]
            (gq,) = torch.autograd.grad(
                q @ k.detach() / attn.d_head**0.5, saved["resid"], retain_graph=True
            )
            (gk,) = torch.autograd.grad(q.detach() @ k / attn.d_head**0.5, saved["resid"])
            sides = [
                (gq[0, node.token], view.upvoting_input_tokens),
                (gk[0, node.attended_token], view.upvoting_key_tokens),
            ]
        for grad_vec, scored in sides:
            scores = model.W_E @ grad_vec
            assert [s.token for s in scored[:5]] == scores.topk(5).indices.tolist()
            assert abs(scored[0].score - float(scores.max())) <= 1e-4 * float(scores.abs().max())
    assert all(v == 2 for v in checked.values())


def test_trace_sentence_and_upstream_only(default_model: HookedTransformer) -> None:
    model = default_model
    node = NodeIndex(NodeType.ATTENTION_HEAD, layer=10, token=13, component=2, attended_token=1)
    [result] = Engine(model).run(
        [
            SubRequest(
                IOI,
                upstream_node_to_trace=NodeToTrace(node, AttentionTraceType.KEY),
                top_and_bottom_k=5,
            )
        ]
    )
    assert result.trace_description is not None
    assert "attn L10 H2" in result.trace_description and "' Mary'" in result.trace_description
    assert "through the key" in result.trace_description
    assert result.nodes and all(n.write_position <= 2 * 10 for n in result.nodes)


def test_long_prompt_runs_and_decomposes(default_model: HookedTransformer) -> None:
    """A 512-token prompt (bench/request.py covers 1024) runs and direct effects still sum to D."""
    model = default_model
    assert model.tokenizer is not None
    ids = (model.tokenizer.encode(IOI + " Mary. ") * 40)[:512]
    [result] = Engine(model).run(
        [
            SubRequest(
                ids,
                target_tokens=[" Mary"],
                distractor_tokens=[" John"],
                top_and_bottom_k=3,
                token_views=False,
            )
        ]
    )
    sums = result.token_sums
    total = sum(
        sum(sums[key]["direct_effect"])
        for key in ("embedding", "mlp_neuron", "attention_head_attended_from")
    )
    assert abs(total + result.bias_direct_effect - result.direction_value) < 1e-3 * max(
        1.0, abs(result.direction_value)
    )
    assert len(result.token_sums["attention_head_attended_to"]["activation"]) == 512


def test_a_request_too_large_for_memory_is_refused_before_running(
    default_model: HookedTransformer,
) -> None:
    """Within the context length but far beyond this machine's memory: a clear 413, not an OOM."""
    from neuron_explainer.activations import PromptTooLongError
    from neuron_explainer.activations.engine import available_memory

    engine = Engine(default_model)
    free = available_memory(default_model.device)
    assert free is not None and engine.estimated_bytes(1, 8000) > free
    try:
        engine.run([SubRequest([5] * 8000, target_tokens=[" the"])])
    except PromptTooLongError as e:
        assert e.kind == "too_large" and "GiB" in e.message and "shorter prompts" in e.message
    else:
        raise AssertionError("an 8000-token request should have been refused")
