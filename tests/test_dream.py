"""The dream (``worldmodel.dream``): M stepped as an SB3 VecEnv and as a Gymnasium env."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces

from worldmodel import train_memory
from worldmodel.config import resolve_config
from worldmodel.dream import (
    DreamEnv,
    DreamVecEnv,
    action_space_from,
    dream_returns,
    dream_starts,
    episode_cap,
    make_dream_env,
)
from worldmodel.errors import UserError
from worldmodel.io import read_json
from worldmodel.memory import LoadedMemory, build_memory, load_memory

TINY = [
    "env.image_size=16", "vae.widths=[8, 16]", "vae.latent_dim=4",
    "memory.hidden_size=16", "memory.mixtures=2", "memory.batch_size=2", "memory.seq_len=8",
    "memory.steps=8", "memory.val_every=4", "memory.log_every=2", "memory.lr=3e-3",
    "data.val_fraction=0.25", "memory.device=cpu",
]
OBS = 4 + 16  # z + h
BOX = {"type": "Box", "shape": [3], "dtype": "float32", "low": [-1.0, 0.0, 0.0],
       "high": [1.0, 1.0, 1.0]}


@pytest.fixture(scope="module")
def vae(reach16_vae: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's tiny VAE (train-memory writes its latent cache into it)."""
    return Path(shutil.copytree(reach16_vae, tmp_path_factory.mktemp("dream") / "vae"))


@pytest.fixture(scope="module")
def memory_run(reach16: Path, vae: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = resolve_config(None, TINY)
    return train_memory.run(cfg, reach16, vae, tmp_path_factory.mktemp("dream") / "memory")


def _box_memory(done_bias: float | None = None) -> LoadedMemory:
    """An untrained M of 4 latents, 16 units and 3-dim Box actions (seeded)."""
    torch.manual_seed(0)
    cfg = resolve_config(None, ["memory.hidden_size=16", "memory.mixtures=2"])
    mem = LoadedMemory(build_memory(cfg.memory, 4, 3), cfg, BOX)
    if done_bias is not None:
        with torch.no_grad():
            mem.model.done.weight.zero_()
            mem.model.done.bias.fill_(done_bias)
    return mem


def _starts(n: int = 3, logvar: float = -2.0) -> tuple[np.ndarray, np.ndarray]:
    mu = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)
    return mu, np.full((n, 4), logvar, np.float32)


def _rollout(env: DreamVecEnv, steps: int, seed: int = 0) -> np.ndarray:
    """Observations of ``steps`` steps from a reset under fixed random actions: (T+1, N, D)."""
    env.action_space.seed(seed)
    actions = [np.array([env.action_space.sample() for _ in range(env.num_envs)])
               for _ in range(steps)]
    obs = [env.reset()]
    for a in actions:
        obs.append(env.step(a)[0])
    return np.stack(obs)


def test_make_dream_env_shapes_dtypes_and_starts(memory_run: Path, reach16: Path) -> None:
    env = make_dream_env(memory_run, n_envs=3, seed=0)
    assert env.num_envs == 3 and env.tau == 1.0
    assert env.action_space == spaces.Discrete(5)  # Reach's, from the manifest
    assert env.observation_space == spaces.Box(-np.inf, np.inf, (OBS,), np.float32)
    assert env.max_episode_steps == 100  # Reach's registered cap (the collector's was 30)
    obs = env.reset()
    assert obs.shape == (3, OBS) and obs.dtype == np.float32
    assert (obs[:, 4:] == 0).all()  # h starts at zero
    obs, reward, done, infos = env.step(np.array([0, 1, 4]))
    assert obs.shape == (3, OBS) and obs.dtype == np.float32
    assert reward.shape == (3,) and reward.dtype == np.float32
    assert done.shape == (3,) and done.dtype == bool and len(infos) == 3
    after = np.stack([info.get("terminal_observation", o) for o, info in zip(obs, infos,
                                                                               strict=True)])
    assert (after[:, 4:] != 0).all(axis=1).all()  # h of the step (before any new episode)

    # the starts: first frames of the training episodes (3 of 4 at val_fraction 0.25)
    mu, logvar = dream_starts(memory_run)
    summary = read_json(memory_run / "summary.json")["inputs"]
    assert mu.shape == logvar.shape == (summary["train_episodes"], 4) == (3, 4)
    cache = np.load(summary["latent_cache"])
    firsts = [int(r) for r in np.cumsum([0, *[int(e["length"]) for e in
                                               _reader(reach16).episode_index()]])[:-1]]
    assert all(any(np.array_equal(m, cache["mu"][f]) for f in firsts) for m in mu)
    # a dataset passed explicitly gives the same starts
    assert np.array_equal(dream_starts(memory_run, data=reach16)[0], mu)
    with pytest.raises(UserError, match="is not there"):
        dream_starts(memory_run, data=reach16.parent / "gone")


def _reader(data: Path):  # type: ignore[no-untyped-def]
    from worldmodel.dataset import open_dataset

    return open_dataset(data)


def test_the_vae_encodes_again_when_the_latent_cache_is_gone(memory_run: Path, vae: Path,
                                                             tmp_path: Path) -> None:
    want = dream_starts(memory_run)
    cache = Path(read_json(memory_run / "summary.json")["inputs"]["latent_cache"])
    kept = tmp_path / "cache.npz"
    shutil.move(cache, kept)
    try:
        got = dream_starts(memory_run)
        np.testing.assert_allclose(got[0], want[0], atol=1e-6)
        np.testing.assert_allclose(got[1], want[1], atol=1e-6)
    finally:
        shutil.move(kept, cache)


def test_seeded_dreams_are_reproducible(memory_run: Path) -> None:
    a = _rollout(make_dream_env(memory_run, n_envs=4, seed=7), 12)
    b = _rollout(make_dream_env(memory_run, n_envs=4, seed=7), 12)
    c = _rollout(make_dream_env(memory_run, n_envs=4, seed=8), 12)
    assert np.array_equal(a, b)
    assert not np.array_equal(a[0], c[0])  # other starts
    env = make_dream_env(memory_run, n_envs=4, seed=7)
    first = env.reset()
    assert not np.array_equal(env.reset(), first)  # the generator moves on...
    assert env.seed(7) == [7, 8, 9, 10]
    assert np.array_equal(env.reset(), first)  # ...until seeded again


def test_temperature(memory_run: Path) -> None:
    """Tiny tau: the same dream whatever the seed; tau 1: two seeds dream differently."""
    mem = load_memory(memory_run)
    with torch.no_grad():  # an M trained 8 steps may end every step: keep the episodes going
        mem.model.done.weight.zero_()
        mem.model.done.bias.fill_(-50.0)
    mu, _ = dream_starts(memory_run)
    one = (mu[:1], np.full_like(mu[:1], -60.0))  # a single start, sigma ~ 0

    def dream(tau: float, seed: int) -> np.ndarray:
        return _rollout(DreamVecEnv(mem, *one, n_envs=2, tau=tau, seed=seed), 10)

    cold0, cold1 = dream(1e-6, 0), dream(1e-6, 1)
    np.testing.assert_allclose(cold0, cold1, atol=1e-2)
    hot0, hot1 = dream(1.0, 0), dream(1.0, 1)
    assert np.abs(hot0[1:] - hot1[1:]).max() > 0.1
    assert make_dream_env(memory_run, tau=1.15).tau == 1.15
    with pytest.raises(UserError, match="temperature must be > 0"):
        DreamVecEnv(mem, *one, tau=0.0)


def test_truncation_at_the_cap_with_monitor_infos() -> None:
    mem = _box_memory(done_bias=-50.0)  # the done head never fires
    env = DreamVecEnv(mem, *_starts(), n_envs=3, max_episode_steps=5, seed=0)
    env.reset()
    total = np.zeros(3)
    for t in range(5):
        obs, reward, done, infos = env.step(np.zeros((3, 3), np.float32))
        total += reward
        assert done.all() == (t == 4) and done.any() == (t == 4)
    for i, info in enumerate(infos):
        assert info["TimeLimit.truncated"] is True
        assert info["episode"]["l"] == 5
        assert info["episode"]["r"] == pytest.approx(total[i], rel=1e-5)
        term = info["terminal_observation"]
        assert term.shape == (OBS,) and term.dtype == np.float32 and (term[4:] != 0).any()
    assert (obs[:, 4:] == 0).all()  # new episodes: h back to zero
    assert env.step(np.zeros((3, 3), np.float32))[3] == [{}, {}, {}]


def test_the_done_head_terminates() -> None:
    env = DreamVecEnv(_box_memory(done_bias=50.0), *_starts(), n_envs=2, max_episode_steps=5,
                      seed=0)
    env.reset()
    obs, _, done, infos = env.step(np.zeros((2, 3), np.float32))
    assert done.all()
    assert [i["TimeLimit.truncated"] for i in infos] == [False, False]
    assert [i["episode"]["l"] for i in infos] == [1, 1]
    assert (obs[:, 4:] == 0).all()


def test_box_actions_are_clipped_to_the_space() -> None:
    env = DreamVecEnv(_box_memory(), *_starts(), n_envs=2, seed=0)
    assert env.action_space == action_space_from(BOX)
    wild = np.array([[5.0, -3.0, 9.0], [-7.0, 2.0, -1.0]], np.float32)
    clipped = np.clip(wild, [-1, 0, 0], [1, 1, 1]).astype(np.float32)
    a = _rollout_with(env, wild)
    b = _rollout_with(env, clipped)
    assert np.array_equal(a, b)


def _rollout_with(env: DreamVecEnv, action: np.ndarray) -> np.ndarray:
    env.seed(0)
    env.reset()
    return np.stack([env.step(action)[0] for _ in range(3)])


def test_vecenv_interface() -> None:
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import VecNormalize

    env = DreamVecEnv(_box_memory(), *_starts(), n_envs=3, tau=0.5, seed=0)
    assert env.get_attr("tau") == [0.5] * 3 and env.get_attr("tau", [1]) == [0.5]
    env.set_attr("tau", 0.8)
    assert env.tau == 0.8
    with pytest.raises(UserError, match="share"):
        env.set_attr("tau", 0.3, indices=[0])
    assert env.env_is_wrapped(Monitor) == [True] * 3
    assert env.env_is_wrapped(VecNormalize) == [False] * 3  # type: ignore[arg-type]
    assert env.env_method("seed", 3, indices=[0, 1]) == [[3, 4, 5]] * 2
    assert env.has_attr("max_episode_steps") and not env.has_attr("nope")
    with pytest.raises(UserError, match="start latents"):
        DreamVecEnv(_box_memory(), np.zeros((0, 4)), np.zeros((0, 4)))
    with pytest.raises(UserError, match="do not fit"):
        DreamVecEnv(_box_memory(), np.zeros((2, 5)), np.zeros((2, 5)))


def test_ppo_learns_and_evaluates_in_the_dream(memory_run: Path) -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.evaluation import evaluate_policy

    env = make_dream_env(memory_run, n_envs=4, seed=0, max_episode_steps=16)
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=1, seed=0, device="cpu")
    model.learn(256)
    assert model.num_timesteps == 256
    assert len(model.ep_info_buffer) > 0  # the episode infos reach SB3's logger
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not wrapped with a Monitor" warning
        returns, lengths = evaluate_policy(model, env, n_eval_episodes=4,
                                           return_episode_rewards=True)
    assert len(returns) == 4 and all(0 < n <= 16 for n in lengths)


def test_dream_env_passes_gymnasiums_checker(memory_run: Path) -> None:
    from gymnasium.utils.env_checker import check_env

    env = DreamEnv(make_dream_env(memory_run, n_envs=1, seed=0, max_episode_steps=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unbounded observations are a warning, by design
        check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=3)
    assert obs.shape == (OBS,) and obs.dtype == np.float32 and info == {}
    assert np.array_equal(env.reset(seed=3)[0], obs)
    steps = 0
    while steps < 4:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        steps += 1
        assert isinstance(reward, float) and obs.shape == (OBS,)
        if terminated or truncated:
            break
    assert terminated or truncated
    assert info["episode"]["l"] == steps and "terminal_observation" not in info
    with pytest.raises(UserError, match="one dream"):
        DreamEnv(DreamVecEnv(_box_memory(), *_starts(), n_envs=2))


def test_episode_cap_from_the_manifest() -> None:
    assert episode_cap({"config": {"env": {"max_episode_steps": 50}}}) == 50
    assert episode_cap({"env_id": "CarRacing-v3", "config": {"env": {"frame_skip": 1}}}) == 1000
    assert episode_cap({"env_id": "CarRacing-v3", "config": {"env": {"frame_skip": 3}}}) == 334
    assert episode_cap({"env_id": "NoSuchEnv-v0"}) is None
    with pytest.raises(UserError, match="no action space"):
        action_space_from({"type": "Dict", "repr": "Dict()"})


def test_dream_returns_sweeps_the_temperature() -> None:
    mem = _box_memory(done_bias=-50.0)
    with torch.no_grad():  # a reward of 1 per step: every return is the cap
        mem.model.reward.weight.zero_()
        mem.model.reward.bias.fill_(1.0)
    env = DreamVecEnv(mem, *_starts(), n_envs=3, tau=0.7, max_episode_steps=6, seed=0)
    calls: list[float] = []

    def policy(obs: np.ndarray) -> np.ndarray:
        calls.append(env.tau)
        return np.zeros((len(obs), 3), np.float32)

    out = dream_returns(policy, env, taus=[0.5, 1.15], episodes=5)
    assert list(out) == [0.5, 1.15]
    for returns in out.values():
        assert returns.shape == (5,)
        np.testing.assert_allclose(returns, 6.0, rtol=1e-5)
    assert set(calls) == {0.5, 1.15} and env.tau == 0.7  # restored
    with pytest.raises(UserError, match="max_episode_steps"):
        dream_returns(policy, DreamVecEnv(mem, *_starts()), taus=[1.0])
