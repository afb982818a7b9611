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

from neuron_explainer.models import export_hf, load_model

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
        if kind == "qwen2":
            model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
        else:
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    _perturb(model, seed=1)
    return model.eval()


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
}


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
