"""The embedded default model, SmolLM2-135M-Instruct: known completions, batching, generation, the
CLI, and export to a Hugging Face folder that `transformers` runs with the same logits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from neuron_explainer.models import HookedTransformer, generate

CAPITAL = "The capital of France is"
IOI = "When Mary and John went to the store, John gave a drink to"


def next_token_probs(model: HookedTransformer, prompt: str) -> torch.Tensor:
    assert model.tokenizer is not None
    ids = torch.tensor(model.tokenizer.encode(prompt))
    with torch.no_grad():
        return model(ids[None], logits_positions=torch.tensor([len(ids) - 1]))[0].softmax(-1)


@pytest.mark.parametrize(("prompt", "expected"), [(CAPITAL, " Paris"), (IOI, " Mary")])
def test_known_completions(default_model: HookedTransformer, prompt: str, expected: str) -> None:
    assert default_model.tokenizer is not None
    probs = next_token_probs(default_model, prompt)
    top = int(probs.argmax())
    assert default_model.tokenizer.token_display(top) == expected
    assert probs[top] > 0.5


def test_padded_batch_equals_prompts_alone(default_model: HookedTransformer) -> None:
    prompts = [CAPITAL, IOI, "1, 2, 3,"]
    tokens, mask = default_model.to_tokens(prompts)
    last = mask.sum(1) - 1
    with torch.no_grad():
        batched = default_model(tokens, mask, logits_positions=last)
    for i, prompt in enumerate(prompts):
        alone = next_token_probs(default_model, prompt).log()
        assert (batched[i].log_softmax(-1) - alone).abs().max() < 1e-4


def test_generation(default_model: HookedTransformer) -> None:
    tok = default_model.tokenizer
    assert tok is not None
    greedy = tok.decode(generate(default_model, "1, 2, 3, 4, 5,", max_new_tokens=6).tolist())
    assert greedy.startswith(" 6, 7")
    a = generate(default_model, CAPITAL, max_new_tokens=5, temperature=1.0, seed=3).tolist()
    b = generate(default_model, CAPITAL, max_new_tokens=5, temperature=1.0, seed=3).tolist()
    assert a == b  # seeded sampling is reproducible
    top1 = generate(default_model, CAPITAL, max_new_tokens=5, temperature=1.0, top_k=1, seed=4)
    assert top1.tolist() == generate(default_model, CAPITAL, max_new_tokens=5).tolist()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "neuron_explainer.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_demo_and_errors() -> None:
    demo = run_cli("demo", "--device", "cpu")
    assert demo.returncode == 0, demo.stderr
    assert "' Paris'" in demo.stdout and "' Mary'" in demo.stdout
    missing = run_cli("info", "--model", "/nonexistent/model")
    assert missing.returncode == 2
    assert "point at a local folder" in missing.stderr.lower() or "local folder" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_export_hf_runs_in_transformers(default_model: HookedTransformer, tmp_path: Path) -> None:
    out = tmp_path / "smollm2-hf"
    result = run_cli("export-hf", "smollm2-135m", str(out))
    assert result.returncode == 0, result.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    tok = default_model.tokenizer
    assert tok is not None
    for prompt in (CAPITAL, IOI):
        ids = tok.encode(prompt)
        assert hf_tok(prompt)["input_ids"] == ids
        with torch.no_grad():
            want = hf(input_ids=torch.tensor([ids])).logits
            got = default_model(torch.tensor([ids]))
        assert (got - want).abs().max() <= 1e-4
