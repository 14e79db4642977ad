"""Fair controls: latent features standardised per dimension with statistics of the dataset."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY_MEMORY
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

import agents.evaluate
from agents import train
from agents.encoders import load_encoder, prepare_encoder
from agents.features import (
    FEATURES_RECORD,
    FeatureStats,
    VecStandardize,
    compute_features,
    load_features,
    prepare_features,
    sample_episodes,
)
from agents.latent import VecLatentObservation
from agents.memory_obs import VecMemoryObservation, prepare_memory
from agents.policy import make_policy
from agents.wrapping import EVAL_SEED_OFFSET, make_agent_env
from envs import make_env, make_vec_env
from worldmodel.config import Config, load_run_config
from worldmodel.dataset import open_dataset
from worldmodel.errors import UserError
from worldmodel.io import read_json
from worldmodel.loaders import split_episodes
from worldmodel.memory import LoadedMemory, load_memory
from worldmodel.vae import LoadedVAE, load_vae

AGENT = [
    "env.n_envs=2", "env.max_episode_steps=12", "agent.timesteps=32", "agent.eval_every=32",
    "agent.eval_episodes=1", "agent.checkpoint_every=32", "agent.device=cpu",
    "agent.hyperparams={n_steps: 16, batch_size: 16, n_epochs: 1}",
]


@pytest.fixture(scope="module")
def vae_run(reach16: Path, reach16_vae: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny VAE, with the ``summary.json`` of train-vae recording its dataset."""
    vae = Path(shutil.copytree(reach16_vae, tmp_path_factory.mktemp("features") / "vae"))
    (vae / "summary.json").write_text(json.dumps({"dataset": {"path": str(reach16)}}))
    return vae


@pytest.fixture
def cfg(tiny_config: Callable[..., Config]) -> Callable[..., Config]:
    """``cfg(*overrides)``: the tiny config with tiny agent budgets and M settings."""
    return lambda *extra: tiny_config(*TINY_MEMORY, *AGENT, *extra)


def _train_frames(data: Path, run: Path) -> list[Any]:
    """The episodes of ``data``'s training split under ``run``'s config, in id order."""
    reader = open_dataset(data)
    run_cfg = load_run_config(run)
    train_ids = set(split_episodes(reader.episode_ids, run_cfg.data.val_fraction,
                                   run_cfg.seed)[0])
    return [reader.episode(p) for p, i in enumerate(reader.episode_ids) if i in train_ids]


def _stats(cfg: Config, encoder: LoadedVAE, memory: LoadedMemory | None, run: Path,
           vae: Path | None, mem: Path | None = None, data: Path | None = None) -> FeatureStats:
    run.mkdir(parents=True, exist_ok=True)
    stats = prepare_features(cfg, encoder, memory, run, vae, mem, data)
    assert stats is not None
    return stats


def _chain(venv: VecEnv) -> list[VecEnv]:
    out = [venv]
    while isinstance(out[-1], VecEnvWrapper):
        out.append(out[-1].venv)
    return out


def test_latent_stats_are_per_dimension_deterministic_and_recorded(
    vae_run: Path, reach16: Path, cfg: Callable[..., Config], tmp_path: Path
) -> None:
    encoder = load_vae(vae_run)
    stats = _stats(cfg("agent.obs_mode=latent"), encoder, None, tmp_path / "a", vae_run)
    episodes = _train_frames(reach16, vae_run)
    mu = encoder.encode(np.concatenate([ep.obs for ep in episodes]))
    assert stats.dim == encoder.latent_dim
    np.testing.assert_allclose(stats.mean, mu.mean(0), atol=1e-5)
    np.testing.assert_allclose(stats.std, mu.std(0), rtol=1e-4)
    assert np.ptp(stats.std) > 0.05 * stats.std.max()  # one std per dimension, not one scalar
    record = read_json(tmp_path / "a" / FEATURES_RECORD)
    assert record["n_samples"] == len(mu) and record["n_episodes"] == len(episodes)
    assert record["dataset"] == str(reach16) and record["split"]["from"] == str(vae_run)
    assert record["encoder_weights_hash"] == encoder.weights_hash
    assert record["memory_weights_hash"] is None and record["latent"] == "mean"
    loaded = load_features(tmp_path / "a")
    assert loaded is not None
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    # deterministic: the same statistics again, also for sampled latents (seeded eps)
    _stats(cfg("agent.obs_mode=latent"), encoder, None, tmp_path / "b", vae_run)
    assert (tmp_path / "b" / FEATURES_RECORD).read_text() == \
        (tmp_path / "a" / FEATURES_RECORD).read_text()
    sampled = [_stats(cfg("agent.obs_mode=latent", "agent.latent=sample"), encoder, None,
                      tmp_path / name, vae_run).std for name in ("s1", "s2")]
    np.testing.assert_array_equal(sampled[0], sampled[1])
    assert not np.allclose(sampled[0], stats.std)


def test_the_sample_is_spread_over_the_training_split_and_capped(
    vae_run: Path, reach16: Path, cfg: Callable[..., Config]
) -> None:
    reader = open_dataset(reach16)
    train_ids = split_episodes(reader.episode_ids, 0.25, 0)[0]
    frames = sum(int(e["length"]) for e in reader.episode_index() if int(e["id"]) in train_ids)
    picked = sample_episodes(reader, 0.25, 0, max_frames=frames // 2)
    assert [int(e["id"]) for e in picked] == train_ids[::2]
    features = compute_features(cfg("agent.obs_mode=latent"), load_vae(vae_run), None, reader,
                                picked, max_frames=10)
    assert features.shape == (10, 4)


def test_random_encoder_features_have_unit_std_on_dataset_frames(
    vae_run: Path, reach16: Path, cfg: Callable[..., Config], tmp_path: Path
) -> None:
    run = tmp_path / "random"
    run.mkdir()
    control = cfg("agent.obs_mode=random-encoder")
    encoder, _ = prepare_encoder(control, vae_run, run)
    assert encoder is not None
    stats = _stats(control, encoder, None, run, vae_run)
    trained = _stats(cfg("agent.obs_mode=latent"), load_vae(vae_run), None, tmp_path / "l",
                     vae_run)
    # the untrained encoder's latents hardly spread (tiny VAE: ~0.007 against ~0.07 per
    # dimension): the handicap standardisation removes
    assert stats.std.mean() < 0.2 * trained.std.mean()
    frames = np.concatenate([ep.obs for ep in _train_frames(reach16, vae_run)])
    seen = stats.apply(encoder.encode(frames))
    np.testing.assert_allclose(seen.std(0), 1.0, rtol=1e-3)
    np.testing.assert_allclose(seen.mean(0), 0.0, atol=1e-3)
    # in the real env, through the wrapper: unit scale instead of ~1e-3
    observed = {}
    for name, features in (("raw", None), ("standardised", stats)):
        env = make_agent_env(control, encoder, n_envs=2, seed=0, training=False,
                             features=features)
        rng = np.random.default_rng(0)
        obs = [env.reset()]
        for _ in range(60):
            obs.append(env.step(rng.integers(0, env.action_space.n, 2))[0])  # type: ignore[attr-defined]
        env.close()
        observed[name] = np.concatenate(obs)[:, -encoder.latent_dim:]  # the newest latent
    assert observed["raw"].std(0).max() < 0.1
    assert np.all((observed["standardised"].std(0) > 0.3) & (observed["standardised"].std(0) < 3))


def _record_built_envs(monkeypatch: pytest.MonkeyPatch) -> list[VecEnv]:
    """The envs train-agent builds its models on, in order (train._build_model wrapped)."""
    envs: list[VecEnv] = []
    real_build = train._build_model

    def build(run_cfg: Config, out: Path, env: VecEnv, *args: Any) -> Any:
        envs.append(env)
        return real_build(run_cfg, out, env, *args)

    monkeypatch.setattr(train, "_build_model", build)
    return envs


def test_a_saved_run_is_evaluated_and_collected_with_its_recorded_stats(
    vae_run: Path, cfg: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    envs = _record_built_envs(monkeypatch)
    run_cfg = cfg("agent.obs_mode=latent", "agent.history=2")
    run = train.run(run_cfg, tmp_path / "agent", vae=vae_run)
    stats = load_features(run)
    assert stats is not None and read_json(run / "summary.json")["standardized"] is True
    wrapper = next(e for e in _chain(envs[0]) if isinstance(e, VecLatentObservation))
    assert wrapper.stats is not None
    np.testing.assert_array_equal(wrapper.stats.std, stats.std)
    expected = _stats(run_cfg, load_vae(vae_run), None, tmp_path / "again", vae_run)
    np.testing.assert_array_equal(expected.mean, stats.mean)

    # what `evaluate` shows the policy: [0, (z - mean) / std] after a reset (history 2)
    seen: list[np.ndarray] = []

    def first_observations(model: Any, env: VecEnv, n_eval_episodes: int, **_: Any) -> Any:
        seen.append(np.asarray(env.reset()))
        return [0.0] * n_eval_episodes, [1] * n_eval_episodes

    monkeypatch.setattr(agents.evaluate, "evaluate_policy", first_observations)
    encoder = load_encoder(run, run_cfg)
    assert encoder is not None
    frames = make_vec_env(run_cfg.env, n_envs=1, seed=run_cfg.seed + EVAL_SEED_OFFSET).reset()
    z = encoder.encode(np.asarray(frames))
    agents.evaluate.run(run, episodes=1)
    np.testing.assert_allclose(seen[-1][:, :4], 0.0)
    np.testing.assert_allclose(seen[-1][:, 4:], (z - stats.mean) / stats.std, atol=1e-5)
    assert not np.allclose(seen[-1][:, 4:], z, atol=1e-2)
    # the collector's agent:PATH policy observes the same
    env = make_env(run_cfg.env)
    frame, info = env.reset(seed=3)
    policy = make_policy(f"agent:{run}", env, seed=0, epsilon=0.0)
    policy.reset(frame, info)
    assert policy._obs is not None
    np.testing.assert_allclose(policy._obs[0, 4:], stats.apply(encoder.encode(frame[None]))[0],
                               atol=1e-5)
    env.close()
    # a run without features.json (older versions) evaluates on raw latents, as before
    (run / FEATURES_RECORD).unlink()
    agents.evaluate.run(run, episodes=1)
    np.testing.assert_allclose(seen[-1][:, 4:], z, atol=1e-5)


def test_memory_stats_are_z_and_h_as_the_wrapper_builds_them(
    reach16: Path, reach16_memory: tuple[Path, Path], cfg: Callable[..., Config],
    tmp_path: Path
) -> None:
    vae, memory_run = reach16_memory
    encoder, memory = load_vae(vae), load_memory(memory_run)
    arm = cfg("agent.obs_mode=latent-memory")
    stats = _stats(arm, encoder, memory, tmp_path / "arm", vae, memory_run)
    z_dim, h_dim = memory.latent_dim, memory.hidden_size
    assert stats.dim == z_dim + h_dim
    rows = []  # M stepped one step at a time from h_0 = 0 with the recorded actions
    for ep in _train_frames(reach16, memory_run):
        z = encoder.encode(ep.obs)
        state = memory.initial_state(1)
        for t in range(len(z)):
            rows.append(np.concatenate([z[t], state[0][0, 0].numpy()]))
            _, state = memory.step(z[t : t + 1], memory.actions(ep.action[t : t + 1]), state)
    expected = np.stack(rows)
    np.testing.assert_allclose(stats.mean, expected.mean(0), atol=1e-5)
    np.testing.assert_allclose(stats.std, np.maximum(expected.std(0), 1e-6), rtol=1e-3)
    record = read_json(tmp_path / "arm" / FEATURES_RECORD)
    assert record["dataset"] == str(reach16) and record["split"]["from"] == str(memory_run)
    assert record["n_samples"] == len(expected)
    # the untrained control: the same z statistics, its own h statistics
    control_cfg = cfg("agent.obs_mode=latent-memory-untrained")
    (tmp_path / "control").mkdir()
    control, _ = prepare_memory(control_cfg, memory_run, encoder, tmp_path / "control")
    assert control is not None
    other = _stats(control_cfg, encoder, control, tmp_path / "control", vae, memory_run)
    np.testing.assert_allclose(other.mean[:z_dim], stats.mean[:z_dim], atol=1e-6)
    np.testing.assert_allclose(other.std[:z_dim], stats.std[:z_dim], rtol=1e-5)
    assert not np.allclose(other.std[z_dim:], stats.std[z_dim:])
    # history 2: each [z, h] standardised before stacking, the zeros before the start stay 0
    env = make_agent_env(cfg("agent.obs_mode=latent-memory", "agent.history=2"), encoder,
                         n_envs=2, seed=0, training=False, memory=memory, features=stats)
    obs = env.reset()
    env.close()
    width = z_dim + h_dim
    np.testing.assert_allclose(obs[:, :width], 0.0)
    np.testing.assert_allclose(obs[:, width + z_dim:],
                               np.broadcast_to(-stats.mean[z_dim:] / stats.std[z_dim:],
                                               (2, h_dim)), rtol=1e-5)


def test_the_dream_observes_the_same_standardised_z_h(
    reach16_memory: tuple[Path, Path], cfg: Callable[..., Config], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    vae, memory_run = reach16_memory
    encoder, memory = load_vae(vae), load_memory(memory_run)
    dream_cfg = cfg("agent.obs_mode=dream")
    stats = _stats(dream_cfg, encoder, memory, tmp_path / "stats", vae, memory_run)
    z_dim = memory.latent_dim
    dream = train.make_dream_agent_env(dream_cfg, memory, 0, 0.99, None, stats)
    raw = train.make_dream_agent_env(dream_cfg, memory, 0, 0.99, None, None)
    obs, raw_obs = dream.reset(), raw.reset()
    np.testing.assert_allclose(obs, (raw_obs - stats.mean) / stats.std, rtol=1e-5, atol=1e-5)
    ended = 0
    rng = np.random.default_rng(0)
    for _ in range(40):
        actions = rng.integers(0, dream.action_space.n, dream.num_envs)  # type: ignore[attr-defined]
        obs, _, dones, infos = dream.step(actions)
        raw_obs, _, _, raw_infos = raw.step(actions)
        np.testing.assert_allclose(obs, stats.apply(raw_obs), rtol=1e-5, atol=1e-5)
        for i in np.flatnonzero(dones):
            ended += 1
            np.testing.assert_allclose(infos[i]["terminal_observation"],
                                       stats.apply(raw_infos[i]["terminal_observation"]),
                                       rtol=1e-5, atol=1e-5)
    assert ended > 0
    # the real env shows the same h = 0 at an episode start, standardised alike
    real = make_agent_env(dream_cfg, encoder, n_envs=2, seed=0, training=False, memory=memory,
                          features=stats).reset()
    start = -stats.mean[z_dim:] / stats.std[z_dim:]
    np.testing.assert_allclose(dream.reset()[:, z_dim:], np.broadcast_to(start, (2, len(start))),
                               rtol=1e-5)
    np.testing.assert_allclose(real[:, z_dim:], np.broadcast_to(start, (2, len(start))),
                               rtol=1e-5)
    # train-agent: the dream it trains in and the real env it is evaluated in share features.json
    envs = _record_built_envs(monkeypatch)
    run = train.run(dream_cfg, tmp_path / "dream", vae=vae, memory=memory_run)
    recorded = load_features(run)
    assert recorded is not None
    np.testing.assert_array_equal(recorded.mean, stats.mean)
    standardize = next(e for e in _chain(envs[0]) if isinstance(e, VecStandardize))
    np.testing.assert_array_equal(standardize.stats.std, stats.std)
    evaluation = make_agent_env(dream_cfg, encoder, n_envs=1, seed=0, training=False,
                                memory=memory, features=load_features(run, encoder, memory))
    wrapper = next(e for e in _chain(evaluation) if isinstance(e, VecMemoryObservation))
    assert wrapper.stats is not None
    np.testing.assert_array_equal(wrapper.stats.std, stats.std)
    evaluation.close()


def test_without_a_dataset_one_line_names_what_to_pass(
    reach16: Path, reach16_vae: Path, vae_run: Path, cfg: Callable[..., Config], tmp_path: Path
) -> None:
    latent = cfg("agent.obs_mode=latent")
    encoder = load_vae(reach16_vae)  # no summary.json: no recorded dataset
    (tmp_path / "a").mkdir()
    with pytest.raises(UserError) as e:
        prepare_features(latent, encoder, None, tmp_path / "a", reach16_vae, None)
    assert "\n" not in str(e.value) and "--data" in str(e.value)
    assert "agent.standardize=false" in str(e.value)
    stats = _stats(latent, encoder, None, tmp_path / "b", reach16_vae, data=reach16)
    assert read_json(tmp_path / "b" / FEATURES_RECORD)["dataset"] == str(reach16)
    assert stats.dim == encoder.latent_dim
    # the recorded dataset moved away: the same advice
    moved = tmp_path / "moved_vae"
    shutil.copytree(vae_run, moved)
    (moved / "summary.json").write_text(json.dumps({"dataset": {"path": "gone/data"}}))
    with pytest.raises(UserError, match=r"'gone/data' .* not there.*--data"):
        prepare_features(latent, encoder, None, tmp_path / "b", moved, None)
    # switched off, or a frame mode: no statistics, no file
    (tmp_path / "off").mkdir()
    assert prepare_features(cfg("agent.obs_mode=latent", "agent.standardize=false"), encoder,
                            None, tmp_path / "off", reach16_vae, None) is None
    assert prepare_features(cfg("agent.obs_mode=pixel"), None, None, tmp_path / "off", None,
                            None) is None
    assert not (tmp_path / "off" / FEATURES_RECORD).exists()
    # a corrupt record is one line too
    (tmp_path / "off" / FEATURES_RECORD).write_text('{"format": "features/1", "mean": [1]}')
    with pytest.raises(UserError, match="unreadable feature statistics"):
        load_features(tmp_path / "off")
