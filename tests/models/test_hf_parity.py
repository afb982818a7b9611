"""Logits parity with Hugging Face `transformers` on random small configs, through the real loaders.

Every model is saved by `transformers` itself and loaded with `load_model(folder)`, so the weight
conversion is exercised, not bypassed. All parameters (norm gains and biases included) are
perturbed, since HF's init (ones and zeros) would hide mapping mistakes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from neuron_explainer.models import KVCache, export_hf, load_model
from neuron_explainer.models.layers import side_by_side

VOCAB = 300


def _perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _hf_model(kind: str, **overrides: object) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=VOCAB, **overrides
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        common = dict(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=160,
            num_attention_heads=8,
            max_position_embeddings=128,
            vocab_size=VOCAB,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
        )
        common.update(overrides)  # type: ignore[arg-type]
        config_class, model_class = FAMILIES[kind]
        config = getattr(transformers, config_class)(**common)
        # Gemma 2 soft-caps attention scores, which only the eager attention does.
        model = getattr(transformers, model_class)._from_config(config, attn_implementation="eager")
    _perturb(model, seed=1)
    return model.eval()


FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
}
# Per-family settings that exercise what the family adds: sliding windows shorter than the batch's
# 11 positions, soft-caps small enough to bend the scores and logits, per-head dims apart from
# d_model / n_heads, rotary scaling and partial rotary.
GEMMA = {"head_dim": 16, "query_pre_attn_scalar": 24, "num_key_value_heads": 2}
FAMILY_CASES: dict[str, tuple[str, dict[str, object]]] = {
    "llama31_rope_scaling": (
        "llama",
        {
            "num_key_value_heads": 2,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "llama32_tied_rope_scaling": (
        "llama",
        {
            "tie_word_embeddings": True,
            "num_key_value_heads": 4,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        },
    ),
    "mistral_sliding_window": ("mistral", {"num_key_value_heads": 2, "sliding_window": 4}),
    "qwen3_qk_norm": ("qwen3", {"num_key_value_heads": 2, "head_dim": 16}),
    "gemma2_softcaps_sliding": (
        "gemma2",
        GEMMA
        | {
            "sliding_window": 3,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "gemma3_local_global": (
        "gemma3",
        GEMMA
        | {
            "num_hidden_layers": 3,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        },
    ),
    "olmo2_post_norms": ("olmo2", {"num_key_value_heads": 4}),
    "phi3_fused": ("phi3", {"num_key_value_heads": 2, "pad_token_id": 0}),
    "pythia_parallel_partial_rotary": (
        "gpt_neox",
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "partial_rotary_factor": 0.25,
            "layer_norm_eps": 1e-5,
            "hidden_act": "gelu",
        },
    ),
    "gpt_neox_sequential": ("gpt_neox", {"use_parallel_residual": False}),
}


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three right-padded rows of different lengths."""
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, VOCAB, (3, 11), generator=gen)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    tokens[mask == 0] = 0
    return tokens, mask


CASES = {
    "gpt2": ("gpt2", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 8}),
    "llama_untied": ("llama", {"tie_word_embeddings": False, "num_key_value_heads": 8}),
    "llama_gqa_kv1": ("llama", {"num_key_value_heads": 1}),
    "llama_gqa_kv2": ("llama", {"num_key_value_heads": 2}),
    "llama_attention_bias": ("llama", {"attention_bias": True, "num_key_value_heads": 4}),
    "qwen2_qkv_bias": ("qwen2", {"num_key_value_heads": 2, "tie_word_embeddings": False}),
} | FAMILY_CASES


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_on_padded_batch(case: str, tmp_path: Path) -> None:
    kind, overrides = CASES[case]
    hf = _hf_model(kind, **overrides)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, device="cpu")
    tokens, mask = _batch()
    with torch.no_grad():
        want = hf(input_ids=tokens, attention_mask=mask).logits
        got = ours(tokens, mask)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() <= 1e-4
    # A padded row equals the same prompt run alone.
    with torch.no_grad():
        alone = ours(tokens[2, :4][None])
    assert (alone[0] - got[2, :4]).abs().max() <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_generation_steps_match_transformers(case: str, tmp_path: Path) -> None:
    """The loaders store each block's query/key/value and gate/up weights side by side, and a
    generation step (one position, key/value cache) runs them as one product: each step's logits
    equal transformers' full forward at that position, biases and every family's extras included."""
    kind, overrides = CASES[case]
    hf = _hf_model(kind, **overrides)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, device="cpu")
    block = ours.blocks[0]
    assert side_by_side(block.attn.q_proj, block.attn.k_proj, block.attn.v_proj) is not None
    if block.mlp.gated:
        assert side_by_side(block.mlp.w_in, block.mlp.w_up) is not None
    tokens = _batch()[0][0]
    with torch.no_grad():
        want = hf(input_ids=tokens[None]).logits[0]
        cache = KVCache()
        steps = [ours(tokens[None, :4], kv_cache=cache)[0, -1]]
        steps += [ours(tokens[None, t : t + 1], kv_cache=cache)[0, -1] for t in range(4, 11)]
    assert (torch.stack(steps) - want[3:]).abs().max() <= 1e-4


@pytest.mark.parametrize("serialization", ["pytorch_model.bin", "sharded_safetensors"])
def test_other_checkpoint_layouts(serialization: str, tmp_path: Path) -> None:
    hf = _hf_model("llama", num_key_value_heads=2, tie_word_embeddings=False)
    if serialization == "pytorch_model.bin":
        # Older checkpoints (transformers 5 no longer writes this layout itself).
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        hf.save_pretrained(tmp_path, max_shard_size="50KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path, device="cpu")
    tokens, mask = _batch()
    with torch.no_grad():
        want = hf(input_ids=tokens, attention_mask=mask).logits
        got = ours(tokens, mask)
    assert (got[mask.bool()] - want[mask.bool()]).abs().max() <= 1e-4


@pytest.mark.parametrize("case", ["gpt2", "llama_gqa_kv2", "qwen2_qkv_bias"])
def test_export_hf_round_trip(case: str, tmp_path: Path) -> None:
    """Our export loads in transformers with equal logits, and back in ours with equal weights."""
    kind, overrides = CASES[case]
    _hf_model(kind, **overrides).save_pretrained(tmp_path / "src")
    ours = load_model(tmp_path / "src", device="cpu")
    export_hf(ours, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens, mask = _batch()
    with torch.no_grad():
        want = hf(input_ids=tokens, attention_mask=mask).logits
        got = ours(tokens, mask)
    assert (got[mask.bool()] - want[mask.bool()]).abs().max() <= 1e-4
    again = load_model(tmp_path / "out", device="cpu")
    for (name, a), (_, b) in zip(
        ours.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_missing_model_error_says_how_to_point_at_a_folder(tmp_path: Path) -> None:
    from neuron_explainer.models import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="local folder"):
        load_model("no-such-model-anywhere")
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("repo", ["gpt2", "openai-community/gpt2"])
def test_names_resolve_from_a_local_hf_cache(
    repo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = tmp_path / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / "0123abcd"
    hf = _hf_model("gpt2")
    hf.save_pretrained(snapshot)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model = load_model("gpt2", device="cpu")
    tokens, mask = _batch()
    with torch.no_grad():
        want = hf(input_ids=tokens, attention_mask=mask).logits
        assert (model(tokens, mask)[mask.bool()] - want[mask.bool()]).abs().max() <= 1e-4


def test_unsupported_architecture_is_one_error_naming_it_and_the_supported_list(
    tmp_path: Path,
) -> None:
    from neuron_explainer.models.architectures import ARCHITECTURES, UnsupportedArchitectureError

    (tmp_path / "config.json").write_text('{"model_type": "mamba", "hidden_size": 64}')
    with pytest.raises(UnsupportedArchitectureError) as error:
        load_model(tmp_path, device="cpu")
    message = str(error.value)
    assert "'mamba'" in message
    for supported in ("gemma3_text", "gemma2", "qwen3", "gpt_neox", "olmo2", "phi3", "gpt2"):
        assert supported in ARCHITECTURES and supported in message


def test_unsupported_rope_scaling_is_an_error(tmp_path: Path) -> None:
    import json

    from neuron_explainer.models.architectures import UnsupportedArchitectureError

    _hf_model("llama").config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="yarn"):
        load_model(tmp_path, device="cpu")
