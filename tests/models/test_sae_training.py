"""Training TopK autoencoders on the default model's first layers, on a few thousand tokens of
prose: the reconstruction loss falls, the metrics are reported and sane, an interrupted run resumes
to exactly the weights of an uninterrupted one, and the evaluation scores a perfect
reconstruction as lossless."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from neuron_explainer.cli import main
from neuron_explainer.datasets.corpus import Corpus, TokenWindows, tokenize
from neuron_explainer.models import HookedTransformer, ModelConfig, export_hf
from neuron_explainer.models.autoencoder_formats import load_autoencoder
from neuron_explainer.models.autoencoders import AutoencoderConfig, SparseAutoencoder
from neuron_explainer.training.autoencoders import (
    TrainingConfig,
    TrainingInterrupted,
    capture,
    train_autoencoders,
)
from neuron_explainer.training.evaluation import evaluate

PROSE_MODULES = ("argparse", "difflib", "heapq", "json", "random", "statistics", "unittest")


def prose_documents() -> list[str]:
    """Long English docstrings of standard-library modules: text that exists on any machine."""
    return [importlib.import_module(name).__doc__ or "" for name in PROSE_MODULES]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small matrices run faster on one torch thread; two only wait on each other (and, on a
    busy machine, on everything else)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def windows(default_model: HookedTransformer) -> TokenWindows:
    assert default_model.tokenizer is not None
    corpus = Corpus("stdlib-prose", lambda: iter(prose_documents()))
    return tokenize(corpus, default_model.tokenizer, window_length=32)


def small_config(**changes: object) -> TrainingConfig:
    settings: dict[str, object] = dict(
        hook="blocks.{L}.hook_mlp_out",
        # Layers 1 and 2 have a few tokens 30x larger than the rest (heavy tails that make a
        # few thousand tokens a noisy sample); 3 and 4 do not.
        layers=(3, 4),
        n_latents=512,
        k=32,
        n_tokens=2560,  # 80 windows of 32: 20 steps of 4 windows
        batch_size=4,
        window_length=32,
        eval_windows=4,
        dead_after_tokens=600,
    )
    return TrainingConfig(**(settings | changes))  # type: ignore[arg-type]


def test_training_reduces_the_loss_and_reports_sane_metrics(
    default_model: HookedTransformer, windows: TokenWindows, tmp_path: Path
) -> None:
    config = small_config()
    summary = train_autoencoders(default_model, windows, config, tmp_path, progress=False)

    assert summary == json.loads((tmp_path / "metrics.json").read_text())
    assert not (tmp_path / "checkpoint.pt").exists()
    assert summary["status"] == "complete"
    assert summary["tokens_trained"] == 2560 and summary["steps"] == 20
    assert summary["tokens_per_second"] > 0
    clean = summary["eval"]["loss_clean"]
    assert 0 < clean < 20
    assert list(summary["autoencoders"]) == ["blocks.3.hook_mlp_out", "blocks.4.hook_mlp_out"]
    for name, m in summary["autoencoders"].items():
        curve = m["train_nmse"]
        assert len(curve) == 20 and m["train_nmse_first"] == curve[0]
        # The loss falls (each step sees new tokens, so the curve is noisy: compare averages).
        assert np.mean(curve[-5:]) < 0.85 * curve[0], curve
        assert m["fraction_variance_explained"] == pytest.approx(1 - m["nmse"])
        assert 0.1 < m["fraction_variance_explained"] <= 1
        assert 0 < m["l0"] <= config.k
        assert 0 <= m["dead_fraction"] <= 1
        assert m["dead_window_tokens"] == 600
        assert m["loss_clean"] == clean
        assert np.isfinite(m["loss_spliced"])
        assert m["loss_increase"] == pytest.approx(m["loss_spliced"] - clean)

        # The autoencoder on disk is the native format, attaches where it was trained, and its
        # decoder rows have unit norm.
        ae = load_autoencoder(tmp_path / name)
        ae.check_compatible(default_model)
        assert (ae.hook_name, ae.n_latents, ae.k, ae.d_in) == (name, 512, 32, 576)
        assert ae.cfg.metadata["metrics"]["nmse"] == m["nmse"]
        torch.testing.assert_close(ae.W_dec.norm(dim=-1), torch.ones(512))

    # A finished run is not redone.
    again = train_autoencoders(default_model, windows, config, tmp_path, progress=False)
    assert again == summary


def test_an_interrupted_run_resumes_to_the_same_weights(
    default_model: HookedTransformer, windows: TokenWindows, tmp_path: Path
) -> None:
    config = small_config(layers=(3,), n_tokens=1280)  # 10 steps
    straight = train_autoencoders(default_model, windows, config, tmp_path / "a", progress=False)

    def kill_after_step_6(step: int, total: int, rate: float) -> None:
        if step == 6:
            raise TrainingInterrupted

    with pytest.raises(TrainingInterrupted):
        train_autoencoders(
            default_model,
            windows,
            config,
            tmp_path / "b",
            checkpoint_every_steps=4,
            progress=False,
            on_step=kill_after_step_6,
        )
    assert (tmp_path / "b" / "checkpoint.pt").is_file()
    assert not (tmp_path / "b" / "metrics.json").exists()

    steps_run: list[int] = []
    resumed = train_autoencoders(
        default_model,
        windows,
        config,
        tmp_path / "b",
        progress=False,
        on_step=lambda step, total, rate: steps_run.append(step),
    )
    assert steps_run == [5, 6, 7, 8, 9, 10]  # from the checkpoint written after step 4
    name = "blocks.3.hook_mlp_out"
    a, b = load_autoencoder(tmp_path / "a" / name), load_autoencoder(tmp_path / "b" / name)
    for param in ("W_enc", "b_enc", "W_dec", "b_pre"):
        assert torch.equal(getattr(a, param), getattr(b, param)), param
    assert (
        resumed["autoencoders"][name]["train_nmse"] == straight["autoencoders"][name]["train_nmse"]
    )

    with pytest.raises(ValueError, match="different settings"):
        train_autoencoders(default_model, windows, small_config(layers=(3,), k=4), tmp_path / "b")


def test_capture_stops_after_the_last_hook(default_model: HookedTransformer) -> None:
    tokens = torch.tensor([[1, 2, 3, 4]])
    seen: list[str] = []
    with default_model.hooks(fwd=[(lambda n: True, lambda x, hook: seen.append(hook.name))]):
        values = capture(default_model, tokens, ["blocks.1.hook_mlp_out", "blocks.0.hook_attn_out"])
    assert set(values) == {"blocks.1.hook_mlp_out", "blocks.0.hook_attn_out"}
    assert seen[-1] == "blocks.1.hook_mlp_out"
    assert "blocks.1.hook_resid_post" not in seen and "hook_logits" not in seen


def test_a_perfect_reconstruction_costs_no_loss(
    default_model: HookedTransformer, windows: TokenWindows
) -> None:
    """W_enc = W_dec = [I; -I] with TopK(d) reconstructs every x exactly (the positive part of each
    ±x_i is kept), so the spliced model's loss equals the clean loss and the NMSE is 0."""
    d = default_model.cfg.d_model
    ae = SparseAutoencoder(
        AutoencoderConfig(hook_name="blocks.1.hook_mlp_out", d_in=d, n_latents=2 * d, k=d)
    )
    identity = torch.cat([torch.eye(d), -torch.eye(d)])
    ae.W_enc.data, ae.W_dec.data = identity.clone(), identity.clone()
    result = evaluate(default_model, {ae.hook_name: ae}, windows.tokens[:2], skip_positions=1)
    layer = result["layers"][ae.hook_name]
    assert layer["nmse"] < 1e-10
    assert layer["loss_spliced"] == pytest.approx(result["loss_clean"], abs=1e-5)
    assert layer["l0"] <= d


def test_tdb_train_sae_command(
    default_model: HookedTransformer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tdb train-sae` end to end on a tiny random Llama saved as a Hugging Face folder."""
    cfg = ModelConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        d_mlp=48,
        vocab_size=default_model.cfg.vocab_size,
        n_ctx=64,
        name="tiny",
    )
    torch.manual_seed(0)
    tiny = HookedTransformer(cfg)
    tiny.tokenizer = default_model.tokenizer
    model_dir = export_hf(tiny.requires_grad_(False).eval(), tmp_path / "tiny")
    corpus_dir = tmp_path / "prose"
    corpus_dir.mkdir()
    for name, text in zip(PROSE_MODULES, prose_documents(), strict=True):
        (corpus_dir / f"{name}.txt").write_text(text)
    out = tmp_path / "saes"
    argv = [
        "train-sae",
        f"--model={model_dir}",
        "--hook=blocks.{L}.hook_attn_out",
        "--layers=0-1",
        "--latents=64",
        "--k=4",
        "--tokens=1024",
        "--batch-size=4",
        "--window-length=32",
        "--eval-windows=4",
        f"--corpus={corpus_dir}",
        f"--out={out}",
        "--quiet",
    ]
    assert main(argv) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert list(summary["autoencoders"]) == ["blocks.0.hook_attn_out", "blocks.1.hook_attn_out"]
    assert "blocks.1.hook_attn_out" in capsys.readouterr().err  # the metrics table
    assert load_autoencoder(out / "blocks.0.hook_attn_out").d_in == 32
    assert main([*argv[:-2], "--k=5", f"--out={out}", "--quiet"]) == 2  # other settings: refused
