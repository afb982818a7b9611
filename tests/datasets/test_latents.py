"""Collated datasets of autoencoder latents agree with a brute-force `encode()` of the hooked
activations on the same windows.

The default model runs on ~2k tokens of prose with four autoencoders written to disk in the native
format and loaded back from their common folder: MLP-side at layers 1 (`hook_mlp_out`) and 3
(`mlp.hook_post`, with OpenAI's layer norm on its input), attention-side (`hook_attn_out`) at
layers 1 (with SAELens' constant-norm rescaling) and 3. Their weights are random (seeded): the test is about collation, not about what
the latents mean.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from neuron_explainer.cli import main as datasets_cli
from neuron_explainer.datasets import DatasetError, DatasetStore, TokenWindows, tokenize
from neuron_explainer.datasets.corpus import folder_corpus
from neuron_explainer.datasets.families import (
    FAMILIES,
    LatentFamily,
    autoencoder_identity,
    use_autoencoders,
)
from neuron_explainer.datasets.latents import (
    collate_latents,
    load_autoencoders,
    stored_autoencoders,
)
from neuron_explainer.models import HookedTransformer
from neuron_explainer.models.autoencoder_formats import save_autoencoder
from neuron_explainer.models.autoencoders import AutoencoderConfig, SparseAutoencoder
from neuron_explainer.models.config import hook_width
from tests.datasets.test_collate import cache_until
from tests.servers import Server, call, start_server, stop_server

WINDOW = 32
N_WINDOWS = 64
BATCH = 16
K, RANDOM, PER_BIN = 6, 4, 2
N_LATENTS = 512
HOOKS = {
    ("mlp_autoencoder_latent", 1): ("blocks.1.hook_mlp_out", "none"),
    ("mlp_autoencoder_latent", 3): ("blocks.3.mlp.hook_post", "layer_norm"),
    ("attention_autoencoder_latent", 1): ("blocks.1.hook_attn_out", "constant_norm_rescale"),
    ("attention_autoencoder_latent", 3): ("blocks.3.hook_attn_out", "none"),
}


def random_autoencoder(
    model: HookedTransformer, hook_name: str, normalize: str, seed: int, k: int = 16
) -> SparseAutoencoder:
    width = hook_width(model.cfg, hook_name)
    assert width is not None
    cfg = AutoencoderConfig(
        hook_name=hook_name,
        d_in=width,
        n_latents=N_LATENTS,
        activation="topk",
        k=k,
        normalize=normalize,  # type: ignore[arg-type]
    )
    ae = SparseAutoencoder(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ae.W_enc.copy_(torch.randn(N_LATENTS, width, generator=generator) / width**0.5)
        ae.W_dec.copy_(torch.randn(N_LATENTS, width, generator=generator) / width**0.5)
        ae.b_enc.copy_(0.1 * torch.randn(N_LATENTS, generator=generator))
        ae.b_pre.copy_(0.01 * torch.randn(width, generator=generator))
    return ae


def write_autoencoders(model: HookedTransformer, folder: Path, seed: int = 0) -> Path:
    """The autoencoders of HOOKS under `folder`, one native subfolder each."""
    for i, (hook_name, normalize) in enumerate(HOOKS.values()):
        save_autoencoder(
            random_autoencoder(model, hook_name, normalize, seed + i), folder / hook_name
        )
    return folder


@dataclass
class Collated:
    path: Path
    windows: TokenWindows
    autoencoders: dict[str, SparseAutoencoder]  # by hook name
    acts: dict[tuple[str, int], np.ndarray]  # [W, N, n] brute-force latents
    tokens: list[list[str]]


def brute_force(
    model: HookedTransformer, windows: TokenWindows, autoencoders: dict[str, SparseAutoencoder]
) -> dict[tuple[str, int], np.ndarray]:
    """encode() of every hooked activation, in the same batches as the collation."""
    names = [hook for hook, _ in HOOKS.values()]
    out: dict[tuple[str, int], list[np.ndarray]] = {}
    for _, tokens in windows.batches(BATCH, 0, N_WINDOWS):
        cache = cache_until(model, tokens, names)
        for key, (hook, _) in HOOKS.items():
            z = autoencoders[hook].encode(cache[hook])  # [b, n, N]
            out.setdefault(key, []).append(z.transpose(1, 2).numpy())
    return {key: np.concatenate(parts).astype(np.float64) for key, parts in out.items()}


@pytest.fixture(scope="module")
def ae_folder(default_model: HookedTransformer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_autoencoders(default_model, tmp_path_factory.mktemp("autoencoders"))


@pytest.fixture(scope="module")
def collated(
    default_model: HookedTransformer,
    prose_dir: Path,
    ae_folder: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Collated:
    assert default_model.tokenizer is not None
    windows = tokenize(folder_corpus(prose_dir), default_model.tokenizer, WINDOW)
    assert len(windows) >= N_WINDOWS
    autoencoders = load_autoencoders([str(ae_folder)], default_model)
    assert sorted(ae.hook_name for ae in autoencoders) == sorted(h for h, _ in HOOKS.values())
    path = tmp_path_factory.mktemp("latents") / "latents.sqlite"
    meta = collate_latents(
        default_model,
        windows,
        path,
        autoencoders,
        n_tokens=N_WINDOWS * WINDOW,
        batch_size=BATCH,
        k=K,
        random_sample_size=RANDOM,
        quantile_sample_size=PER_BIN,
        window_length=WINDOW,
        progress=False,
    )
    # Families and layers default to what the autoencoders cover.
    assert meta.families == ["mlp_autoencoder_latent", "attention_autoencoder_latent"]
    assert meta.layers == [1, 3]
    assert meta.status == "complete"
    by_hook = {ae.hook_name: ae for ae in autoencoders}
    tokens = [default_model.tokenizer.display_tokens(row) for row in windows.tokens.tolist()]
    return Collated(path, windows, by_hook, brute_force(default_model, windows, by_hook), tokens)


@pytest.mark.parametrize("key", list(HOOKS), ids=lambda k: f"{k[0]}-{k[1]}")
def test_latent_top_k_and_statistics_match_brute_force_encode(
    collated: Collated, key: tuple[str, int]
) -> None:
    family, layer = key
    acts = collated.acts[key]  # [W, N, n]
    assert acts.shape == (N_WINDOWS, N_LATENTS, WINDOW)
    scores = acts.max(axis=2)  # [W, N]
    live = np.flatnonzero(scores.max(axis=0) > 0)
    assert len(live) > 50, "the random autoencoder should have many latents firing"
    strongest = int(scores.max(axis=0).argmax())
    dead = np.flatnonzero(scores.max(axis=0) <= 0)
    check = sorted({strongest, *live[:: max(1, len(live) // 8)].tolist(), *dead[:2].tolist()})
    with DatasetStore(collated.path) as store:
        for index in check:
            record = store.record(family, layer, index)
            s = scores[:, index]
            expected = sorted(range(N_WINDOWS), key=lambda w: (-s[w], w))[:K]
            got = [r.window_index for r in record.most_positive_activation_records]
            # The collation encodes the same activations in the same batches: same top-k, and
            # the kept windows' scores are the top-k scores whatever the ties.
            np.testing.assert_array_equal(s[got], s[expected])
            if s[expected[-1]] > 0:
                assert got == expected
            for r in record.most_positive_activation_records:
                assert r.window_index is not None
                assert r.tokens == collated.tokens[r.window_index]
                np.testing.assert_allclose(
                    r.activations,
                    acts[r.window_index, index].astype(np.float16),
                    rtol=1e-3,
                    atol=1e-4,
                )
            values = acts[:, index].ravel()
            assert record.max_activation == pytest.approx(values.max(), rel=1e-6, abs=1e-12)
            assert record.mean == pytest.approx(values.mean(), rel=1e-5, abs=1e-9)
            assert record.fraction_active == pytest.approx((values > 0).mean(), abs=1e-6)
            assert record.dead == (not (values > 0).any())


def test_store_records_the_autoencoders(collated: Collated) -> None:
    found = stored_autoencoders(collated.path)
    assert found is not None
    for (family, layer), (hook, _) in HOOKS.items():
        identity = found[family][str(layer)]
        assert identity == autoencoder_identity(collated.autoencoders[hook])
        assert identity["hookName"] == hook and identity["nLatents"] == N_LATENTS
        assert identity["source"].endswith(hook)
    # Plain SQL sees one row per latent and layer, as for neurons.
    conn = sqlite3.connect(collated.path)
    try:
        rows = dict(
            conn.execute(
                "SELECT family || ':' || layer, count(*) FROM components GROUP BY family, layer"
            ).fetchall()
        )
    finally:
        conn.close()
    assert rows == {f"{family}:{layer}": N_LATENTS for family, layer in HOOKS}


def test_resuming_with_other_autoencoders_is_refused(
    default_model: HookedTransformer, collated: Collated, tmp_path: Path
) -> None:
    other_folder = write_autoencoders(default_model, tmp_path / "other", seed=7)
    other = load_autoencoders([str(other_folder)], default_model)
    with pytest.raises(DatasetError, match="other autoencoders"):
        collate_latents(
            default_model,
            collated.windows,
            collated.path,
            other,
            n_tokens=N_WINDOWS * WINDOW,
            batch_size=BATCH,
            window_length=WINDOW,
            progress=False,
        )


def test_latent_families_need_an_autoencoder_per_layer_and_side(
    default_model: HookedTransformer, collated: Collated, tmp_path: Path
) -> None:
    windows = collated.windows
    ae = random_autoencoder(default_model, "blocks.2.hook_mlp_out", "none", 0)
    [family] = use_autoencoders([ae])
    assert isinstance(family, LatentFamily) and FAMILIES[family.name] is family
    assert family.hook_names(2) == ["blocks.2.hook_mlp_out"]
    with pytest.raises(ValueError, match="layer 5"):
        family.hook_names(5)
    resid = random_autoencoder(default_model, "blocks.2.hook_resid_post", "none", 0)
    with pytest.raises(ValueError, match="is neither MLP-side"):
        use_autoencoders([resid])
    second = random_autoencoder(default_model, "blocks.2.mlp.hook_post", "none", 1)
    with pytest.raises(ValueError, match="two mlp-side autoencoders for layer 2"):
        use_autoencoders([ae, second])
    # Every family collated needs an autoencoder at every layer collated, checked before the
    # store is created.
    attention = random_autoencoder(default_model, "blocks.3.hook_attn_out", "none", 2)
    out = tmp_path / "never.sqlite"
    with pytest.raises(ValueError, match="needs an mlp-side autoencoder for layer 3"):
        collate_latents(default_model, windows, out, [ae, attention], progress=False)
    assert not out.exists()
    with pytest.raises(ValueError, match="none of their latent families"):
        collate_latents(default_model, windows, out, [ae], families=["mlp_neuron"])


def test_collate_cli_with_autoencoders(
    tiny_model: HookedTransformer,
    tiny_model_dir: Path,
    prose_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    """`tdb collate --autoencoder FOLDER`: the latent families and layers of the folder's
    autoencoders; run again, it leaves the complete store byte-identical; without autoencoders a
    latent family is an error that says what to pass."""
    folder = tmp_path / "aes"
    for layer in (0, 1):
        ae = random_autoencoder(tiny_model, f"blocks.{layer}.hook_attn_out", "none", layer, k=4)
        save_autoencoder(ae, folder / ae.hook_name)
    out = tmp_path / "tiny-latents.sqlite"
    args = ["collate", "--model", str(tiny_model_dir), "--corpus", str(prose_dir)]
    args += ["--tokens", "512", "--window-length", "16", "--batch-size", "8", "--quiet"]
    assert datasets_cli([*args, "--out", str(out), "--autoencoder", str(folder)]) == 0
    before = out.read_bytes()
    assert datasets_cli([*args, "--out", str(out), "--autoencoder", str(folder)]) == 0
    assert out.read_bytes() == before
    assert datasets_cli(["dataset-info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert list(info["autoencoders"]["attention_autoencoder_latent"]) == ["0", "1"]
    with DatasetStore(out) as store:
        meta = store.metadata()
        assert meta.families == ["attention_autoencoder_latent"] and meta.layers == [0, 1]
        record = store.record("attention_autoencoder_latent", 1, 0)
        assert len(record.most_positive_activation_records[0].activations) == 16  # per token
    missing = ["--out", str(tmp_path / "x.sqlite"), "--families", "mlp_autoencoder_latent"]
    assert datasets_cli([*args, *missing]) == 2
    assert "needs --autoencoder PATH" in capsys.readouterr().err
    assert not (tmp_path / "x.sqlite").exists()


@pytest.fixture(scope="module")
def latent_server(
    collated: Collated, ae_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The default model with the autoencoders attached and their latent store."""
    log = tmp_path_factory.mktemp("latent_server") / "server.log"
    args = ["--model", "smollm2-135m", "--device", "cpu", "--autoencoder", str(ae_folder)]
    srv = start_server([*args, "--dataset", str(collated.path)], log)
    yield srv
    stop_server(srv)


def test_read_api_serves_latent_records_by_side(latent_server: Server, collated: Collated) -> None:
    for family, layer in HOOKS:
        side = "mlp" if family.startswith("mlp") else "attention"
        index = int(collated.acts[(family, layer)].max(axis=(0, 2)).argmax())
        body = {"nodeType": "autoencoder_latent", "autoencoderSide": side, "layerIndex": layer}
        status, out = call(latent_server, "/neuron_record", {**body, "componentIndex": index})
        assert status == 200, out
        with DatasetStore(collated.path) as store:
            want = store.record(family, layer, index)
        assert out["autoencoderSide"] == side and out["nodeType"] == "autoencoder_latent"
        got_top = [(r["tokens"], r["activations"]) for r in out["mostPositiveActivationRecords"]]
        assert got_top == [(r.tokens, r.activations) for r in want.most_positive_activation_records]
        assert out["maxActivation"] == pytest.approx(want.max_activation)
    # Both sides are collated at layer 1: a request must say which.
    body = {"nodeType": "autoencoder_latent", "layerIndex": 1, "componentIndex": 0}
    status, out = call(latent_server, "/neuron_record", body)
    assert status == 400 and "autoencoderSide" in out["message"]
    status, out = call(latent_server, "/neuron_record", {**body, "layerIndex": 2})
    assert status == 404, out


def test_prompt_activations_of_a_latent_scaled_by_its_dataset_max(
    latent_server: Server, collated: Collated, default_model: HookedTransformer
) -> None:
    """/derived_scalars for an attention-side latent: encode() of the hooked activation on the
    prompt (computed here), divided by the maximum in the latent store."""
    family, layer = "attention_autoencoder_latent", 1
    index = int(collated.acts[(family, layer)].max(axis=(0, 2)).argmax())
    prompt = "It is a truth universally acknowledged, that a single man"
    body = {
        "prompt": prompt,
        "nodeType": "autoencoder_latent",
        "autoencoderSide": "attention",
        "layerIndex": layer,
        "componentIndex": index,
        "normalizeByDatasetMax": True,
    }
    status, out = call(latent_server, "/derived_scalars", body)
    assert status == 200, out
    with DatasetStore(collated.path) as store:
        scale = store.record(family, layer, index).max_activation
    hook = HOOKS[(family, layer)][0]
    tokens = torch.tensor([out["tokenIds"]])
    expected = collated.autoencoders[hook].encode(cache_until(default_model, tokens, [hook])[hook])
    np.testing.assert_allclose(out["values"], expected[0, :, index].numpy(), rtol=1e-4, atol=1e-5)
    assert out["datasetMax"] == pytest.approx(scale)
    np.testing.assert_allclose(out["normalizedValues"], np.array(out["values"]) / scale, rtol=1e-6)
