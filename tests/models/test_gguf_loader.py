"""The GGUF loader on files this test writes with gguf's own writer, in llama.cpp's layout.

Q and K rows are written permuted the way llama.cpp's converter permutes them. Q4_1 and Q8_0
quantize each row on its own, so a row permutation commutes with quantization: the reference is a
Hugging Face Llama holding dequantize(quantize(W)) in the plain HF layout, which involves no
un-permutation at all.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from neuron_explainer.models import load_model
from neuron_explainer.models.tokenizer_files import bytes_to_unicode

D, D_MLP, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2
HEAD_DIM = D // HEADS
MERGES = [("t", "h"), ("th", "e"), ("Ġ", "the"), ("a", "n")]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The permutation llama.cpp's converter applies to Q/K rows (HF rotate-half -> interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def round_trip(w: np.ndarray, qtype: Q) -> np.ndarray:
    return dequantize(quantize(w, qtype), qtype).reshape(w.shape)


def vocab() -> list[str]:
    alphabet = bytes_to_unicode()
    return [alphabet[b] for b in range(256)] + [a + b for a, b in MERGES]


def write_gguf(path: Path, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a small llama GGUF; returns the HF-layout weights the reference should hold."""
    rng = np.random.default_rng(seed)
    tokens = vocab()
    n_vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(D_MLP)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * n_vocab)
    writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)

    ref: dict[str, np.ndarray] = {}

    def tensor(gguf_name: str, hf_name: str, w: np.ndarray, qtype: Q, n_head: int = 0) -> None:
        w = w.astype(np.float32)
        if qtype == Q.F32:
            ref[hf_name] = w
            writer.add_tensor(gguf_name, w)
            return
        ref[hf_name] = round_trip(w, qtype)  # what the file will hold, in HF layout
        stored = llama_cpp_permute(w, n_head) if n_head else w
        writer.add_tensor(gguf_name, quantize(stored, qtype), raw_dtype=qtype)

    def randn(*shape: int, scale: float = 0.2) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * scale

    tensor("token_embd.weight", "model.embed_tokens.weight", randn(n_vocab, D, scale=1.0), Q.Q8_0)
    tensor("output_norm.weight", "model.norm.weight", 1 + randn(D), Q.F32)
    if not tied:
        tensor("output.weight", "lm_head.weight", randn(n_vocab, D), Q.Q8_0)
    for i in range(LAYERS):
        hf = f"model.layers.{i}."
        tensor(f"blk.{i}.attn_norm.weight", hf + "input_layernorm.weight", 1 + randn(D), Q.F32)
        tensor(
            f"blk.{i}.ffn_norm.weight", hf + "post_attention_layernorm.weight", 1 + randn(D), Q.F32
        )
        tensor(f"blk.{i}.attn_q.weight", hf + "self_attn.q_proj.weight", randn(D, D), Q.Q4_1, HEADS)
        kv = KV_HEADS * HEAD_DIM
        tensor(
            f"blk.{i}.attn_k.weight", hf + "self_attn.k_proj.weight", randn(kv, D), Q.Q4_1, KV_HEADS
        )
        tensor(f"blk.{i}.attn_v.weight", hf + "self_attn.v_proj.weight", randn(kv, D), Q.Q8_0)
        tensor(f"blk.{i}.attn_output.weight", hf + "self_attn.o_proj.weight", randn(D, D), Q.Q4_1)
        tensor(f"blk.{i}.ffn_gate.weight", hf + "mlp.gate_proj.weight", randn(D_MLP, D), Q.Q4_1)
        tensor(f"blk.{i}.ffn_up.weight", hf + "mlp.up_proj.weight", randn(D_MLP, D), Q.Q8_0)
        tensor(f"blk.{i}.ffn_down.weight", hf + "mlp.down_proj.weight", randn(D, D_MLP), Q.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ref


def reference_model(ref: dict[str, np.ndarray], tied: bool) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        num_hidden_layers=LAYERS,
        hidden_size=D,
        intermediate_size=D_MLP,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=len(vocab()),
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in ref.items()}, strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_matches_reference_forward(tied: bool, tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    ref = write_gguf(path, tied)
    ours = load_model(path, device="cpu")
    assert ours.cfg.n_kv_heads == KV_HEADS and ours.cfg.tied_embeddings == tied
    hf = reference_model(ref, tied)
    tokens = torch.randint(0, len(vocab()), (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, 8:] = 0
    with torch.no_grad():
        want = hf(input_ids=tokens, attention_mask=mask).logits
        got = ours(tokens, mask)
    assert (got[mask.bool()] - want[mask.bool()]).abs().max() <= 1e-4
    # The tokenizer came from the file's metadata, merges included.
    assert ours.tokenizer is not None
    assert ours.tokenizer.encode(" the") == [256 + MERGES.index(("Ġ", "the"))]


def test_unsupported_gguf_architecture_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="mamba"):
        load_model(path, device="cpu")
