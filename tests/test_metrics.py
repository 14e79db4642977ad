"""Representation metrics: linear probe R^2, KNN-MSE, the random-projection baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel.metrics import (
    ProbeData,
    knn_mse,
    linear_probe_r2,
    load_probe_data,
    random_projection,
    representation_metrics,
)


def test_linear_probe_recovers_a_linear_state_and_scores_noise_near_zero() -> None:
    rng = np.random.default_rng(0)
    state = rng.uniform(size=(400, 3))
    mix = rng.normal(size=(3, 6))
    features = state @ mix + 0.001 * rng.normal(size=(400, 6))
    r2 = linear_probe_r2(features[:300], state[:300], features[300:], state[300:])
    assert r2["per_dim"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-3)
    noise = rng.normal(size=(400, 6))
    r2 = linear_probe_r2(noise[:300], state[:300], noise[300:], state[300:])
    assert -0.2 < r2["mean"] < 0.1


def test_a_constant_state_component_is_left_out_of_the_mean() -> None:
    rng = np.random.default_rng(0)
    state = np.c_[rng.uniform(size=(400, 2)), np.full(400, 0.5)]  # component 2: constant
    features = state[:, :2] @ rng.normal(size=(2, 5))
    state[:300, 2] = rng.uniform(size=300)  # varies in training, constant on held-out frames
    r2 = linear_probe_r2(features[:300], state[:300], features[300:], state[300:])
    assert r2["constant"] == [2]
    assert r2["per_dim"][2] == 0.0  # sklearn: constant target not predicted exactly
    assert r2["per_dim"][:2] == pytest.approx([1.0, 1.0], abs=1e-3)
    assert r2["mean"] == pytest.approx(1.0, abs=1e-3)  # not (1 + 1 + 0) / 3
    flat = linear_probe_r2(features[:300], state[:300, 2:], features[300:], state[300:, 2:])
    assert flat["constant"] == [0] and np.isnan(flat["mean"])


def test_knn_mse_is_zero_for_the_state_itself_and_large_for_shuffled_features() -> None:
    rng = np.random.default_rng(0)
    state = rng.uniform(size=(300, 2))
    assert knn_mse(state * 7.0, state, k=5) < 0.01  # 5 nearest of 300 points in [0,1]^2
    shuffled = knn_mse(rng.permutation(state), state, k=5)
    # Two independent uniform points in [0,1]^2: expected squared distance 2 * 1/6.
    assert shuffled == pytest.approx(1 / 3, rel=0.15)
    # k is counted without the frame itself: with two points, the neighbour is the other one.
    assert knn_mse(np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]]), k=5) == pytest.approx(4.0)


def test_random_projection_is_fixed_by_its_seed() -> None:
    frames = np.random.default_rng(0).integers(0, 255, (10, 8, 8, 3), dtype=np.uint8)
    a, b = random_projection(frames, 4, seed=1), random_projection(frames, 4, seed=1)
    assert a(frames).shape == (10, 4) and a(frames).dtype == np.float32
    np.testing.assert_array_equal(a(frames), b(frames))
    assert not np.allclose(a(frames), random_projection(frames, 4, seed=2)(frames))


@pytest.fixture(scope="module")
def reach32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 Reach episodes of 20 random steps at 32x32x3, with the true state."""
    from worldmodel import collect
    from worldmodel.config import resolve_config

    cfg = resolve_config(None, [
        "env.image_size=32", "collect.episodes=60", "collect.workers=1",
        "collect.max_episode_steps=20",
    ])
    return collect.run(cfg, tmp_path_factory.mktemp("data") / "reach32")


def test_load_probe_data_spreads_frames_over_episodes(reach32: Path) -> None:
    from worldmodel.dataset import open_dataset

    reader = open_dataset(reach32)
    ids = reader.episode_ids[:30]
    data = load_probe_data(reader, ids, max_frames=90, seed=0)
    assert isinstance(data, ProbeData)
    assert data.frames.shape == (90, 32, 32, 3) and data.frames.dtype == np.uint8
    assert data.states.shape == (90, 4) and data.states.dtype == np.float32
    assert sorted(set(data.episodes.tolist())) == sorted(ids)  # 3 frames from each episode
    # Frames and states belong together: Reach's agent square is drawn where the state says.
    ep = reader.episode(reader.episode_ids.index(int(data.episodes[0])))
    row = np.flatnonzero((ep.obs == data.frames[0]).all(axis=(1, 2, 3)))
    np.testing.assert_array_equal(ep.state[row[0]], data.states[0])
    again = load_probe_data(reader, ids, max_frames=90, seed=0)
    np.testing.assert_array_equal(again.frames, data.frames)


@pytest.mark.slow
def test_a_trained_vae_beats_the_random_projection_on_reach(reach32: Path) -> None:
    """A small VAE trained for a few hundred steps keeps the positions better than raw pixels
    pushed through a random matrix of the same size."""
    from worldmodel.config import resolve_config
    from worldmodel.dataset import open_dataset
    from worldmodel.vae import ConvVAE, LoadedVAE, frames_to_tensor, vae_loss

    reader = open_dataset(reach32)
    train_ids, test_ids = reader.episode_ids[:48], reader.episode_ids[48:]
    train = load_probe_data(reader, train_ids, max_frames=960)
    test = load_probe_data(reader, test_ids, max_frames=240)

    torch.manual_seed(0)
    model = ConvVAE(image_size=32, latent_dim=8, widths=(16, 32, 64))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x_all = frames_to_tensor(train.frames)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        x = x_all[torch.randint(len(x_all), (64,), generator=gen)]
        loss = vae_loss(model(x), x, beta=1.0, kl_tolerance=0.5).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    cfg = resolve_config(None, ["env.image_size=32", "vae.latent_dim=8", "vae.widths=[16,32,64]"])
    result = representation_metrics(LoadedVAE(model, cfg).encode, train, test, k=5)
    vae_r2, rand_r2 = result["probe_r2"]["mean"], result["random_projection"]["probe_r2"]["mean"]
    assert vae_r2 > rand_r2 + 0.1, (vae_r2, rand_r2)
    assert result["knn_mse"] < result["random_projection"]["knn_mse"]
    assert result["frames"] == {"train": 960, "test": 240}
