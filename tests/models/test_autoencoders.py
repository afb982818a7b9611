"""Sparse autoencoders: files written here in OpenAI's and SAELens' formats load to the latents
their own encoder formulas give (written out below from the formats' definitions, independently of
the library), the two formats agree on the same weights, and the native format round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from neuron_explainer.models import HookedTransformer, ModelConfig
from neuron_explainer.models.autoencoder_formats import (
    AutoencoderFormatError,
    load_autoencoder,
    openai_hook_name,
    save_autoencoder,
)
from neuron_explainer.models.autoencoders import AutoencoderConfig, SparseAutoencoder

D_IN, N_LATENTS, K = 24, 96, 6


def random_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """One autoencoder's weights in SAELens' layout: W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d]."""
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, N_LATENTS, generator=g) / D_IN**0.5,
        "b_enc": 0.1 * torch.randn(N_LATENTS, generator=g),
        "W_dec": torch.randn(N_LATENTS, D_IN, generator=g) / N_LATENTS**0.5,
        "b_dec": torch.randn(D_IN, generator=g),
    }


def inputs(n: int = 50) -> torch.Tensor:
    return 2 + 3 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(7))


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Reference TopK: zero all but the k largest entries of each row, ReLU the kept ones."""
    kth = pre.sort(dim=-1, descending=True).values[:, k - 1 : k]
    return torch.where(pre >= kth, pre.clamp(min=0), torch.zeros_like(pre))


def openai_layer_norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenAI's input normalization: (x - mean) / (unbiased std + 1e-5)."""
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).pow(2).sum(-1, keepdim=True).div(x.shape[-1] - 1).sqrt()
    return (x - mu) / (std + 1e-5), mu, std


# ---- writers of the two formats -----------------------------------------------------------------


def write_openai(
    folder: Path, w: dict[str, torch.Tensor], activation: str, layer: int = 3, location: str = ""
) -> Path:
    """A `sparse_autoencoder.Autoencoder.state_dict()` as torch.save writes it, at their layout
    `<location>_v5_32k/autoencoders/<layer>.pt`."""
    state: dict[str, object] = {
        "pre_bias": w["b_dec"],
        "latent_bias": w["b_enc"],
        "encoder.weight": w["W_enc"].T.contiguous(),  # nn.Linear(d, n): [n, d]
        "decoder.weight": w["W_dec"].T.contiguous(),  # nn.Linear(n, d): [d, n]
        "stats_last_nonzero": torch.zeros(N_LATENTS, dtype=torch.long),
        "latents_activation_frequency": torch.ones(N_LATENTS),
        "latents_mean_square": torch.zeros(N_LATENTS),
        "activation": activation,
    }
    if activation == "TopK":
        state["activation_state_dict"] = {"k": K, "postact_fn": "ReLU"}
    else:
        state["activation_state_dict"] = {}
    path = folder / f"{location or 'resid_delta_mlp'}_v5_32k" / "autoencoders" / f"{layer}.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path


def write_saelens(folder: Path, w: dict[str, torch.Tensor], cfg: dict[str, object]) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in w.items()}, str(folder / "sae_weights.safetensors"))
    base = {"d_in": D_IN, "d_sae": N_LATENTS, "dtype": "float32", "device": "cpu"}
    (folder / "cfg.json").write_text(json.dumps(base | cfg))
    return folder


SAELENS_TOPK_PRE6 = {
    "architecture": "standard",
    "hook_name": "blocks.8.hook_resid_pre",
    "activation_fn_str": "topk",
    "activation_fn_kwargs": {"k": K},
    "apply_b_dec_to_input": True,
    "normalize_activations": "none",
    "sae_lens_version": "5.4.0",
}
SAELENS_TOPK_V6 = {
    "architecture": "topk",
    "k": K,
    "apply_b_dec_to_input": True,
    "normalize_activations": "none",
    "reshape_activations": "none",
    "metadata": {"hook_name": "blocks.8.hook_resid_pre", "sae_lens_version": "6.5.1"},
}


# ---- OpenAI ------------------------------------------------------------------------------------


def test_openai_topk_latents_follow_their_formula(tmp_path: Path) -> None:
    w = random_weights()
    ae = load_autoencoder(write_openai(tmp_path, w, "TopK", layer=3))
    assert ae.hook_name == "blocks.3.hook_mlp_out"
    assert (ae.cfg.activation, ae.k, ae.cfg.normalize) == ("topk", K, "layer_norm")

    x = inputs()
    x_n, mu, std = openai_layer_norm(x)
    z_ref = topk_relu((x_n - w["b_dec"]) @ w["W_enc"] + w["b_enc"], K)
    recon_ref = (z_ref @ w["W_dec"] + w["b_dec"]) * std + mu

    z, recon = ae(x)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recon, recon_ref, rtol=1e-5, atol=1e-5)
    assert int((z > 0).sum(-1).max()) <= K
    with pytest.raises(ValueError, match="pass the input"):
        ae.decode(z)


def test_openai_relu_latents_follow_their_formula(tmp_path: Path) -> None:
    w = random_weights(1)
    ae = load_autoencoder(write_openai(tmp_path, w, "ReLU", layer=0, location="mlp_post_act"))
    assert ae.hook_name == "blocks.0.mlp.hook_post"
    assert (ae.cfg.activation, ae.cfg.normalize) == ("relu", "none")
    x = inputs()
    z_ref = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).clamp(min=0)
    torch.testing.assert_close(ae.encode(x), z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ae.decode(ae.encode(x)), z_ref @ w["W_dec"] + w["b_dec"])


def test_openai_hook_names_from_their_paths(tmp_path: Path) -> None:
    base = Path("gpt2-small")
    assert openai_hook_name(base / "resid_post_attn_v5_32k/autoencoders/11.pt") == (
        "blocks.11.hook_resid_mid"
    )
    assert openai_hook_name(base / "resid_delta_attn_v5_128k/autoencoders/2.pt") == (
        "blocks.2.hook_attn_out"
    )
    assert openai_hook_name(base / "mlp_post_act_v4/autoencoders/5.pt") == "blocks.5.mlp.hook_post"
    assert openai_hook_name(Path("my_sae.pt")) is None
    # Elsewhere the hook point must be given.
    path = tmp_path / "sae.pt"
    write_openai(tmp_path, random_weights(), "TopK").rename(path)
    with pytest.raises(AutoencoderFormatError, match="pass hook_name"):
        load_autoencoder(path)
    assert load_autoencoder(path, hook_name="blocks.1.hook_mlp_out").hook_name == (
        "blocks.1.hook_mlp_out"
    )


# ---- SAELens -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [SAELENS_TOPK_PRE6, SAELENS_TOPK_V6], ids=["pre-6.0", "6.x"])
def test_saelens_topk_latents_follow_their_formula(tmp_path: Path, cfg: dict[str, object]) -> None:
    w = random_weights(2)
    ae = load_autoencoder(write_saelens(tmp_path / "sae", w, cfg))
    assert ae.hook_name == "blocks.8.hook_resid_pre"
    assert (ae.cfg.activation, ae.k, ae.cfg.normalize) == ("topk", K, "none")
    x = inputs()
    z_ref = topk_relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], K)
    z, recon = ae(x)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recon, z_ref @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)


def test_saelens_relu_without_b_dec_on_the_input(tmp_path: Path) -> None:
    w = random_weights(3)
    cfg = {
        "hook_point": "blocks.2.hook_attn_out",  # the pre-4.0 name of hook_name
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": False,
        "normalize_activations": False,
    }
    ae = load_autoencoder(write_saelens(tmp_path / "sae", w, cfg))
    assert (ae.hook_name, ae.cfg.activation) == ("blocks.2.hook_attn_out", "relu")
    x = inputs()
    z_ref = (x @ w["W_enc"] + w["b_enc"]).clamp(min=0)  # b_dec is not subtracted
    torch.testing.assert_close(ae.encode(x), z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ae.decode(z_ref), z_ref @ w["W_dec"] + w["b_dec"])


def test_saelens_unsupported_features_are_refused(tmp_path: Path) -> None:
    w = random_weights()
    jumprelu = write_saelens(
        tmp_path / "jumprelu",
        w | {"threshold": torch.ones(N_LATENTS)},
        {"architecture": "jumprelu", "hook_name": "blocks.0.hook_resid_post"},
    )
    with pytest.raises(AutoencoderFormatError, match="jumprelu"):
        load_autoencoder(jumprelu)
    scaled = write_saelens(
        tmp_path / "scaled",
        w,
        SAELENS_TOPK_PRE6 | {"normalize_activations": "expected_average_only_in"},
    )
    with pytest.raises(AutoencoderFormatError, match="expected_average_only_in"):
        load_autoencoder(scaled)


# ---- the same weights in both formats ------------------------------------------------------------


@pytest.mark.parametrize("activation", ["ReLU", "TopK"])
def test_openai_and_saelens_agree_on_the_same_weights(tmp_path: Path, activation: str) -> None:
    w = random_weights(4)
    openai = load_autoencoder(write_openai(tmp_path / "openai", w, activation, layer=8))
    cfg: dict[str, object] = {
        "hook_name": "blocks.8.hook_mlp_out",
        "apply_b_dec_to_input": True,
        "activation_fn_str": "relu",
        "normalize_activations": "none",
    }
    if activation == "TopK":
        # OpenAI's TopK autoencoders layer-norm their input; SAELens calls that layer_norm.
        cfg |= {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}}
        cfg |= {"normalize_activations": "layer_norm"}
    saelens = load_autoencoder(write_saelens(tmp_path / "saelens", w, cfg))
    assert openai.hook_name == saelens.hook_name == "blocks.8.hook_mlp_out"
    x = inputs()
    for a, b in zip(openai(x), saelens(x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- native format -------------------------------------------------------------------------------


def test_native_round_trip(tmp_path: Path) -> None:
    source = load_autoencoder(write_openai(tmp_path, random_weights(5), "TopK"))
    folder = save_autoencoder(source, tmp_path / "native")
    assert sorted(p.name for p in folder.iterdir()) == [
        "autoencoder.json",
        "autoencoder.safetensors",
    ]
    loaded = load_autoencoder(folder)
    assert loaded.cfg == source.cfg
    assert loaded.cfg.metadata == source.cfg.metadata
    for name in ("W_enc", "b_enc", "W_dec", "b_pre"):
        assert torch.equal(getattr(loaded, name), getattr(source, name)), name
    x = inputs()
    for a, b in zip(loaded(x), source(x), strict=True):
        assert torch.equal(a, b)
    # The config file alone names the folder too.
    assert load_autoencoder(folder / "autoencoder.json").cfg == source.cfg


def test_decoder_directions() -> None:
    cfg = AutoencoderConfig(hook_name="blocks.0.hook_mlp_out", d_in=D_IN, n_latents=N_LATENTS, k=K)
    ae = SparseAutoencoder(cfg)
    ae.W_dec.data = random_weights()["W_dec"]
    assert ae.decoder_directions() is ae.W_dec
    unit = ae.decoder_directions(unit=True)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(N_LATENTS))
    torch.testing.assert_close(unit * ae.W_dec.norm(dim=-1, keepdim=True), ae.W_dec)
    # Latent j alone reconstructs b_pre + z_j W_dec[j].
    z = torch.zeros(N_LATENTS)
    z[5] = 2.0
    torch.testing.assert_close(ae.decode(z), ae.b_pre + 2.0 * ae.W_dec[5])


def test_check_compatible_with_a_model(tmp_path: Path) -> None:
    cfg = ModelConfig(n_layers=2, d_model=D_IN, n_heads=4, d_mlp=40, vocab_size=50, n_ctx=16)
    model = HookedTransformer(cfg)
    ae = load_autoencoder(write_openai(tmp_path, random_weights(), "ReLU", layer=1))
    ae.check_compatible(model)  # blocks.1.hook_mlp_out, width d_model
    wrong_width = load_autoencoder(
        tmp_path / "resid_delta_mlp_v5_32k/autoencoders/1.pt", hook_name="blocks.1.mlp.hook_post"
    )
    with pytest.raises(ValueError, match="has 40 there"):
        wrong_width.check_compatible(model)
    missing = load_autoencoder(
        tmp_path / "resid_delta_mlp_v5_32k/autoencoders/1.pt", hook_name="blocks.7.hook_mlp_out"
    )
    with pytest.raises(ValueError, match="does not have"):
        missing.check_compatible(model)
