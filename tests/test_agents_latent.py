"""LatentObservation wrappers and the VAE features extractor: spaces, values, batching."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from agent_testing import SIZE, make_vae_run
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv, VecTransposeImage

import envs  # noqa: F401  (registers worldmodel/Reach-v0)
from agents.extractor import VAEFeaturesExtractor, vae_extractors
from agents.latent import LatentObservation, VecLatentObservation, get_vae
from envs import EnvConfig, make_vec_env
from envs.reach import ReachEnv
from worldmodel.errors import UserError
from worldmodel.vae import frames_to_tensor, load_vae

Z = 6


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_vae_run(tmp_path_factory.mktemp("vae") / "run")


def _raw_venv(n: int, seed: int = 0, steps: int | None = None) -> Any:
    return make_vec_env(EnvConfig(image_size=SIZE, max_episode_steps=steps), n_envs=n, seed=seed)


def test_gym_wrapper_space_values_and_history(vae_run: Path) -> None:
    vae = load_vae(vae_run)
    raw, wrapped = ReachEnv(size=SIZE), LatentObservation(ReachEnv(size=SIZE), vae_run, history=3)
    assert wrapped.observation_space == spaces.Box(-np.inf, np.inf, (3 * Z,), np.float32)
    frame0, _ = raw.reset(seed=4)
    obs0, _ = wrapped.reset(seed=4)
    z0 = vae.encode(frame0[None])[0]
    assert obs0.dtype == np.float32 and obs0.shape == (3 * Z,)
    np.testing.assert_array_equal(obs0[: 2 * Z], 0.0)  # zeros before the episode start
    np.testing.assert_allclose(obs0[2 * Z :], z0, atol=1e-6)
    frame1 = raw.step(1)[0]
    obs1 = wrapped.step(1)[0]
    np.testing.assert_array_equal(obs1[:Z], 0.0)
    np.testing.assert_allclose(obs1[Z : 2 * Z], z0, atol=1e-6)  # oldest first, newest last
    np.testing.assert_allclose(obs1[2 * Z :], vae.encode(frame1[None])[0], atol=1e-6)
    assert wrapped.observation_space.contains(obs1)
    obs_again, _ = wrapped.reset(seed=4)  # a reset clears the history
    np.testing.assert_allclose(obs_again, obs0)


def test_vec_wrapper_batch_equals_per_env_encoding(vae_run: Path) -> None:
    vae = load_vae(vae_run)
    raw, venv = _raw_venv(3), VecLatentObservation(_raw_venv(3), vae_run, history=2)
    assert venv.observation_space.shape == (2 * Z,)
    frames, obs = raw.reset(), venv.reset()
    for _ in range(3):
        actions = np.array([1, 3, 4])
        frames, *_ = raw.step(actions)
        obs, *_ = venv.step(actions)
    per_env = np.stack([vae.encode(frames[i : i + 1])[0] for i in range(3)])
    assert obs.shape == (3, 2 * Z)
    np.testing.assert_allclose(obs[:, Z:], per_env, atol=1e-5)
    np.testing.assert_allclose(venv.latents, per_env, atol=1e-5)
    assert not np.allclose(obs[0, Z:], obs[1, Z:])  # different envs, different latents


def test_vec_wrapper_encodes_terminal_observation(vae_run: Path) -> None:
    vae = load_vae(vae_run)
    raw = _raw_venv(2, steps=3)
    venv = VecLatentObservation(_raw_venv(2, steps=3), vae_run, history=2)
    raw.reset()
    venv.reset()
    for _ in range(2):
        raw.step(np.array([1, 2]))
        _, _, dones, _ = venv.step(np.array([1, 2]))
    assert not dones.any()
    prev = venv.latents.copy()
    _, _, raw_dones, raw_infos = raw.step(np.array([1, 2]))
    obs, _, dones, infos = venv.step(np.array([1, 2]))
    assert dones.all() and raw_dones.all()  # truncated by the 3-step cap
    for i in range(2):
        term = infos[i]["terminal_observation"]
        assert term.shape == (2 * Z,) and term.dtype == np.float32
        np.testing.assert_allclose(term[:Z], prev[i], atol=1e-6)
        want = vae.encode(raw_infos[i]["terminal_observation"][None])[0]
        np.testing.assert_allclose(term[Z:], want, atol=1e-5)
        np.testing.assert_array_equal(obs[i, :Z], 0.0)  # the new episode starts a new history


def test_sample_mode_draws_around_the_mean(vae_run: Path) -> None:
    env = LatentObservation(ReachEnv(size=SIZE), vae_run, latent="sample")
    mean_env = LatentObservation(ReachEnv(size=SIZE), vae_run)
    a, b = env.reset(seed=1)[0], env.reset(seed=1)[0]
    mu = mean_env.reset(seed=1)[0]
    assert not np.allclose(a, b) and not np.allclose(a, mu)


def _zoo_wrapper(entry: dict[str, dict[str, Any]]) -> Any:
    """rl-baselines3-zoo's ``get_wrapper_class`` for one ``env_wrapper`` entry (a dict)."""
    (name, kwargs), = entry.items()
    module, _, cls = name.rpartition(".")
    wrapper = getattr(importlib.import_module(module), cls)
    return lambda env: wrapper(env, **kwargs)


def test_zoo_env_wrapper_entry_builds_it_and_preprocesses_raw_frames(vae_run: Path) -> None:
    wrap = _zoo_wrapper({"agents.latent.LatentObservation": {"vae_run": str(vae_run),
                                                             "history": 2}})
    env = wrap(gym.make("worldmodel/Reach-v0", size=64))  # raw frames twice the VAE's size
    assert isinstance(env, LatentObservation)
    assert env.observation_space.shape == (2 * Z,)
    obs, _ = env.reset(seed=0)
    frame = env.env.observation(ReachEnv(size=64).reset(seed=0)[0])  # the resize wrapper
    assert frame.shape == (SIZE, SIZE, 3)
    np.testing.assert_allclose(obs[Z:], load_vae(vae_run).encode(frame[None])[0], atol=1e-6)
    assert get_vae(str(vae_run)) is get_vae(vae_run)  # one VAE per process for many envs


def test_shape_mismatch_is_a_user_error(vae_run: Path) -> None:
    with pytest.raises(UserError, match="do not fit the VAE"):
        VecLatentObservation(make_vec_env(EnvConfig(image_size=64), n_envs=1), vae_run)
    with pytest.raises(UserError, match="do not fit the VAE"):
        LatentObservation(ReachEnv(size=64), vae_run, preprocess=False)
    gray = make_vae_run(vae_run.parent / "gray", "env.grayscale=true")
    with pytest.raises(UserError, match="32x32x1"):
        VecLatentObservation(_raw_venv(1), gray)
    with pytest.raises(UserError, match="history"):
        LatentObservation(ReachEnv(size=SIZE), vae_run, history=0)


def test_extractor_features_are_the_vae_latents_of_each_stacked_frame(vae_run: Path) -> None:
    vae = load_vae(vae_run)
    space = spaces.Box(0, 255, (6, SIZE, SIZE), np.uint8)
    ex = VAEFeaturesExtractor(space, vae_run=str(vae_run))
    assert ex.features_dim == 2 * Z and ex.history == 2
    frames = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    stacked = np.concatenate([frames[:2], frames[2:]], axis=-1)  # (2, H, W, 6): oldest first
    x = frames_to_tensor(stacked)
    with torch.no_grad():
        feats = ex(x).numpy()
    want = vae.encode(frames)
    np.testing.assert_allclose(feats[:, :Z], want[:2], atol=1e-5)
    np.testing.assert_allclose(feats[:, Z:], want[2:], atol=1e-5)
    before = [p.clone() for p in ex.parameters()]
    ex.apply(torch.nn.init.zeros_)  # SB3's ortho_init goes through apply(): ignored
    assert all(torch.equal(a, b) for a, b in zip(before, ex.parameters(), strict=True))
    assert not any("decoder" in name for name, _ in ex.named_parameters())


def test_ppo_with_ortho_init_starts_from_the_vae_weights(vae_run: Path) -> None:
    venv = VecTransposeImage(DummyVecEnv([lambda: ReachEnv(size=SIZE)]))
    model = PPO("CnnPolicy", venv, n_steps=16, batch_size=16, device="cpu", policy_kwargs={
        "features_extractor_class": VAEFeaturesExtractor,
        "features_extractor_kwargs": {"vae_run": str(vae_run)},
    })
    (ex,) = vae_extractors(model.policy)
    vae_state = load_vae(vae_run).model.state_dict()
    for name, tensor in ex.state_dict().items():
        torch.testing.assert_close(tensor, vae_state[name])
