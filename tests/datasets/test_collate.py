"""A collated store agrees with a brute-force computation of every activation on the same windows.

The default model runs on ~3k tokens of prose, layers 1 and 3, both families. The brute force
caches the same hook points in the same batches (so MLP activations are bit-identical) and computes
head write magnitudes independently, from the explicit per-pair write vectors v[k,h] W_O[h].
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from neuron_explainer.datasets import DatasetStore, TokenWindows, collate, tokenize
from neuron_explainer.datasets.accumulators import (
    QUANTILE_SALT,
    RANDOM_SALT,
    component_hashes,
    sample_keys,
)
from neuron_explainer.datasets.corpus import folder_corpus
from neuron_explainer.datasets.families import lower_triangle, pair_of_position
from neuron_explainer.models import HookedTransformer, HookPoint

LAYERS = (1, 3)
WINDOW = 32
N_WINDOWS = 96
BATCH = 16
K, RANDOM, PER_BIN = 8, 6, 3


@dataclass
class Collated:
    path: Path
    windows: TokenWindows
    acts: dict[tuple[str, int], np.ndarray]  # [W, C, P] brute-force activations
    calibration: int
    tokens: list[list[str]]  # display strings of each window's tokens


class _Stop(Exception):
    pass


def cache_until(
    model: HookedTransformer, tokens: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """The values at `names`, skipping the layers after the last of them (like run_with_cache
    with an early exit)."""
    cache: dict[str, torch.Tensor] = {}

    def save(x: torch.Tensor, hook: HookPoint) -> None:
        cache[hook.name] = x
        if len(cache) == len(names):
            raise _Stop

    with torch.no_grad(), model.hooks(fwd=[(n, save) for n in names]), contextlib.suppress(_Stop):
        model(tokens)
    return cache


def brute_force(
    model: HookedTransformer, windows: TokenWindows
) -> dict[tuple[str, int], np.ndarray]:
    names = [
        f"blocks.{layer}.{hook}"
        for layer in LAYERS
        for hook in ("mlp.hook_post", "attn.hook_v", "attn.hook_pattern")
    ]
    out: dict[tuple[str, int], list[np.ndarray]] = {}
    cfg = model.cfg
    for first, tokens in windows.batches(BATCH, 0, N_WINDOWS):
        cache = cache_until(model, tokens, names)
        for layer in LAYERS:
            post = cache[f"blocks.{layer}.mlp.hook_post"]  # [b, n, m]
            out.setdefault(("mlp_neuron", layer), []).append(post.transpose(1, 2).numpy())
            v = cache[f"blocks.{layer}.attn.hook_v"].repeat_interleave(
                cfg.n_heads // cfg.n_kv_heads, dim=2
            )  # [b, n, H, dh]
            w_o = model.blocks[layer].attn.W_O  # [H, dh, d]
            write = torch.einsum("bkhe,hed->bkhd", v, w_o).norm(dim=-1)  # [b, k, H]
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [b, H, q, k]
            heads = lower_triangle(pattern * write.transpose(1, 2)[:, :, None, :])
            out.setdefault(("attention_head", layer), []).append(heads.numpy())
        assert first + len(tokens) <= N_WINDOWS
    return {key: np.concatenate(parts).astype(np.float64) for key, parts in out.items()}


@pytest.fixture(scope="module")
def collated(
    default_model: HookedTransformer, prose_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Collated:
    assert default_model.tokenizer is not None
    windows = tokenize(folder_corpus(prose_dir), default_model.tokenizer, WINDOW)
    assert len(windows) >= N_WINDOWS
    path = tmp_path_factory.mktemp("collated") / "store.sqlite"
    meta = collate(
        default_model,
        windows,
        path,
        n_tokens=N_WINDOWS * WINDOW,
        layers=LAYERS,
        batch_size=BATCH,
        k=K,
        random_sample_size=RANDOM,
        quantile_sample_size=PER_BIN,
        window_length=WINDOW,
        progress=False,
    )
    assert meta.status == "complete" and meta.n_tokens == N_WINDOWS * WINDOW
    tokens = [default_model.tokenizer.display_tokens(row) for row in windows.tokens.tolist()]
    acts = brute_force(default_model, windows)
    return Collated(path, windows, acts, meta.calibration_windows, tokens)


def fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float64)


# Per family: a few components (MLP: include the layer's strongest neuron) and tolerances. MLP
# activations are bit-identical to the brute force; heads differ by float rounding only.
def components_to_check(c: Collated, family: str, layer: int) -> list[int]:
    acts = c.acts[(family, layer)]
    if family == "attention_head":
        return list(range(acts.shape[1]))
    strongest = int(acts.max(axis=(0, 2)).argmax())
    return sorted({0, 17, 300, 1000, acts.shape[1] - 1, strongest})


@pytest.mark.parametrize("family", ["mlp_neuron", "attention_head"])
@pytest.mark.parametrize("layer", LAYERS)
def test_top_k_max_and_moments_match_brute_force(collated: Collated, family: str, layer: int):
    acts = collated.acts[(family, layer)]  # [W, C, P]
    exact = family == "mlp_neuron"
    rtol = 0.0 if exact else 1e-4
    with DatasetStore(collated.path) as store:
        for index in components_to_check(collated, family, layer):
            record = store.record(family, layer, index)
            values = acts[:, index]  # [W, P]
            scores = values.max(axis=1)
            expected = sorted(range(len(scores)), key=lambda w: (-scores[w], w))[:K]
            got = [r.window_index for r in record.most_positive_activation_records]
            assert len(got) == K
            if exact:
                assert got == expected
            # Whatever the near-ties, the kept windows have the top-k scores, best first.
            np.testing.assert_allclose(
                scores[got], scores[expected], rtol=max(rtol, 1e-12), atol=1e-7
            )
            for r in record.most_positive_activation_records:
                assert r.window_index is not None
                assert r.tokens == collated.tokens[r.window_index]
                np.testing.assert_allclose(
                    r.activations, fp16(values[r.window_index]), rtol=1e-3, atol=1e-4
                )
            assert record.max_activation == pytest.approx(values.max(), rel=max(rtol, 1e-7))
            flat = values.ravel()
            centred = flat - flat.mean()
            var = (centred**2).mean()
            assert record.mean == pytest.approx(flat.mean(), rel=1e-5, abs=1e-7)
            assert record.variance == pytest.approx(var, rel=1e-5)
            assert record.skewness == pytest.approx((centred**3).mean() / var**1.5, rel=1e-4)
            assert record.kurtosis == pytest.approx((centred**4).mean() / var**2 - 3, rel=1e-4)
            assert record.fraction_active == pytest.approx((flat > 0).mean(), abs=1e-3)
            assert record.dead == (not (flat > 0).any())


def smallest_keys(keys: np.ndarray, allowed: np.ndarray, k: int) -> list[int]:
    candidates = np.flatnonzero(allowed)
    return sorted(candidates[np.argsort(keys[candidates], kind="stable")][:k].tolist())


@pytest.mark.parametrize("family", ["mlp_neuron", "attention_head"])
def test_random_samples_are_the_smallest_keys_over_the_corpus(collated: Collated, family: str):
    layer = LAYERS[1]
    acts = collated.acts[(family, layer)]
    n_windows, n_components = acts.shape[:2]
    windows = torch.arange(n_windows)
    keys = sample_keys(component_hashes(0, RANDOM_SALT, family, layer, n_components), windows)
    with DatasetStore(collated.path) as store:
        for index in components_to_check(collated, family, layer):
            record = store.record(family, layer, index)
            got = [r.window_index for r in record.random_sample]
            expected = smallest_keys(keys[index].numpy(), np.ones(n_windows, bool), RANDOM)
            assert sorted(got) == expected  # type: ignore[type-var]
            for r in record.random_sample:
                np.testing.assert_allclose(
                    r.activations, fp16(acts[r.window_index, index]), rtol=1e-3, atol=1e-4
                )


def test_quantile_samples_follow_calibrated_boundaries(collated: Collated):
    family, layer = "mlp_neuron", LAYERS[0]
    acts = collated.acts[(family, layer)]
    n_windows, n_components = acts.shape[:2]
    scores = acts.max(axis=2)  # [W, C]
    cal = collated.calibration
    assert 0 < cal < n_windows
    keys = sample_keys(
        component_hashes(0, QUANTILE_SALT, family, layer, n_components), torch.arange(n_windows)
    ).numpy()
    quantiles = torch.tensor([0.5, 0.9, 0.99, 0.999])
    with DatasetStore(collated.path) as store:
        for index in components_to_check(collated, family, layer):
            record = store.record(family, layer, index)
            expected_bounds = torch.quantile(
                torch.from_numpy(scores[:cal, index]).float(), quantiles
            )
            assert record.quantile_boundaries == pytest.approx(expected_bounds.tolist(), rel=1e-6)
            assert record.random_sample_by_quantile is not None
            assert len(record.random_sample_by_quantile) == 5
            bins = np.searchsorted(record.quantile_boundaries, scores[:, index], side="right")
            for j, group in enumerate(record.random_sample_by_quantile):
                eligible = (bins == j) & (np.arange(n_windows) >= cal)
                got = sorted(r.window_index for r in group)  # type: ignore[type-var]
                assert got == smallest_keys(keys[index], eligible, PER_BIN)


def test_statistics_of_every_component(collated: Collated):
    """The components table (read with plain SQL, as any SQLite tool would) for all components."""
    conn = sqlite3.connect(collated.path)
    try:
        for (family, layer), acts in collated.acts.items():
            rows = conn.execute(
                "SELECT idx, max_activation, mean, variance, n_values FROM components "
                "WHERE family = ? AND layer = ? ORDER BY idx",
                (family, layer),
            ).fetchall()
            got = np.array([r[1:4] for r in rows], dtype=np.float64)
            assert [r[0] for r in rows] == list(range(acts.shape[1]))
            assert {r[4] for r in rows} == {acts.shape[0] * acts.shape[2]}
            np.testing.assert_allclose(got[:, 0], acts.max(axis=(0, 2)), rtol=1e-4)
            np.testing.assert_allclose(got[:, 1], acts.mean(axis=(0, 2)), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(got[:, 2], acts.var(axis=(0, 2)), rtol=1e-4, atol=1e-9)
    finally:
        conn.close()


def test_head_pairs_are_the_lower_triangle_row_by_row():
    n = 5
    x = torch.arange(n * n).reshape(n, n)
    flat = lower_triangle(x).tolist()
    assert len(flat) == n * (n + 1) // 2
    for position, value in enumerate(flat):
        q, k = pair_of_position(position)
        assert k <= q and value == x[q, k]


def test_reading_a_component_takes_milliseconds(collated: Collated):
    import time

    with DatasetStore(collated.path) as store:
        store.record("attention_head", LAYERS[0], 0)  # vocabulary loaded once
        start = time.perf_counter()
        for index in range(9):
            store.record("attention_head", LAYERS[0], index)
        for index in range(9):
            store.record("mlp_neuron", LAYERS[0], index)
        per_record = (time.perf_counter() - start) / 18
    assert per_record < 0.05


def test_update_threads_follow_the_faster_count() -> None:
    """On CPU, accumulator updates run with whichever intra-op thread count (the configured one
    or 1) was faster on recent batches, and the other is retried now and then."""
    from neuron_explainer.datasets.runner import UpdateThreads

    chooser = UpdateThreads(configured=4, explore_every=5)
    cost = {4: 1.0, 1: 0.1}  # a busy machine: one thread is faster
    choices = []
    for _ in range(20):
        n = chooser.next_batch()
        choices.append(n)
        chooser.record(cost[n])
    assert choices[:3] == [4, 4, 1]  # the first batch (allocations) is not timed
    assert chooser.best() == 1
    assert choices[3:].count(4) == 3  # batches 5, 10, 15 re-explore
    cost = {4: 0.01, 1: 0.1}  # the machine became idle: the configured count wins again
    for _ in range(10):
        chooser.record(cost[chooser.next_batch()])
    assert chooser.best() == 4
    assert UpdateThreads(configured=1).next_batch() == 1
