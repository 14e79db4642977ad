"""The EnvPool backend (issue 9): ids, preprocessing, the SB3 adapter, agents and the collector.

Everything but the missing-extra test is skipped when EnvPool is not installed
(``pip install "worldmodel[fast]"``).
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from agent_testing import VAE_SETTINGS
from gymnasium import spaces
from gymnasium.error import DependencyNotInstalled

from envs import Crop, EnvConfig, UnknownEnvError, make_env, make_vec_env
from worldmodel.collect import episode_seeds, make_builtin_policy, rollout, run
from worldmodel.config import Config, resolve_config
from worldmodel.dataset import DatasetReader, open_dataset, print_verify

HAVE_ENVPOOL = importlib.util.find_spec("envpool") is not None
needs_envpool = pytest.mark.skipif(
    not HAVE_ENVPOOL, reason='EnvPool is not installed (pip install "worldmodel[fast]")'
)

CAR = EnvConfig(id="CarRacing-v3", backend="envpool", image_size=16, max_episode_steps=4)
GAS = np.array([0.0, 0.3, 0.0], np.float32)


def carracing_cfg(*overrides: str) -> Config:
    return resolve_config(None, [
        "env.id=CarRacing-v3", "env.backend=envpool", "env.image_size=16",
        "collect.commit_seconds=0", "collect.chunk_frames=64", *overrides,
    ])


def test_missing_extra_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    from worldmodel.cli import main

    monkeypatch.setitem(sys.modules, "envpool", None)  # `import envpool` raises ImportError
    with pytest.raises(DependencyNotInstalled, match=r'pip install "worldmodel\[fast\]"'):
        make_env(EnvConfig(id="CarRacing-v3", backend="envpool"))
    code = main(["-q", "collect", "--out", str(tmp_path / "d"), "--set", "env.id=CarRacing-v3",
                 "--set", "env.backend=envpool"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and 'pip install "worldmodel[fast]"' in err, err


@needs_envpool
def test_ids_map_to_envpool_and_unknown_ones_get_suggestions() -> None:
    from envs.envpool import EnvPoolSettingError, envpool_task

    assert envpool_task("ALE/Pong-v5") == ("Pong-v5", "atari")
    assert envpool_task("CarRacing-v3") == ("CarRacing-v3", "carracing")
    with pytest.raises(UnknownEnvError, match=r"did you mean ALE/Pong-v5"):
        make_env(EnvConfig(id="ALE/Pongg-v5", backend="envpool"))
    with pytest.raises(UnknownEnvError, match=r"did you mean CarRacing-v3"):
        make_vec_env(EnvConfig(id="CarRacing-v9", backend="envpool"), n_envs=1)
    with pytest.raises(UnknownEnvError, match=r"env\.backend=gymnasium"):
        make_env(EnvConfig(id="worldmodel/Reach-v0", backend="envpool"))
    with pytest.raises(EnvPoolSettingError, match="bogus"):
        make_env(CAR.model_copy(update={"kwargs": {"bogus": 1}}))


class RawFrames(gym.Env[np.ndarray, Any]):
    """Replays given 96x96 RGB frames (stand-in for CarRacing in the wrapper chain)."""

    def __init__(self, frames: np.ndarray) -> None:
        self.frames = frames
        self.observation_space = spaces.Box(0, 255, frames.shape[1:], np.uint8)
        self.action_space = spaces.Discrete(1)
        self.t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        self.t = 0
        return self.frames[0], {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.t += 1
        return self.frames[self.t], 0.0, False, False, {}


@pytest.mark.parametrize(("size", "gray", "crop"), [
    (64, False, None), (64, True, None), (16, True, None), (32, False, Crop(top=3, left=5)),
    (96, True, Crop()),
])
def test_batched_preprocessing_is_bit_identical_to_the_gymnasium_wrappers(
    size: int, gray: bool, crop: Crop | None
) -> None:
    from envs.envpool import preprocess_frames
    from envs.factory import DEFAULT_CROP, _make_generic

    raw = np.random.default_rng(size).integers(0, 256, (6, 96, 96, 3), dtype=np.uint8)
    raw[:, 20:60, 30:50] = (102, 204, 102)  # flat areas, as in real frames
    if "test/RawFrames-v0" not in gym.registry:
        gym.register("test/RawFrames-v0", entry_point="test_envpool:RawFrames")
    cfg = EnvConfig(id="test/RawFrames-v0", image_size=size, grayscale=gray, crop=crop)
    env = _make_generic(cfg, "carracing", {"frames": raw})  # the Gymnasium backend's chain
    want = [env.reset()[0]] + [env.step(0)[0] for _ in range(5)]
    got = preprocess_frames(raw, crop or DEFAULT_CROP["carracing"], size, gray)
    assert got.shape == (6, size, size, 1 if gray else 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.stack(want))


def frames_of(cfg: EnvConfig, steps: int, action: Any, seed: int = 0) -> np.ndarray:
    env = make_env(cfg)
    obs, _ = env.reset(seed=seed)
    frames = [obs]
    for t in range(steps):
        obs, _, terminated, truncated, _ = env.step(action(t) if callable(action) else action)
        frames.append(obs)
        if terminated or truncated:
            break
    env.close()
    return np.stack(frames)


@needs_envpool
@pytest.mark.parametrize(("env_id", "gray", "action"), [
    ("CarRacing-v3", True, GAS), ("CarRacing-v3", False, GAS), ("ALE/Pong-v5", True, 2),
])
def test_frames_look_like_the_gymnasium_backend(env_id: str, gray: bool, action: Any) -> None:
    if env_id.startswith("ALE/"):
        pytest.importorskip("ale_py", reason="the Gymnasium side needs worldmodel[atari]")
    base = {"id": env_id, "image_size": 32, "grayscale": gray, "frame_skip": 2}
    gym_env = make_env(EnvConfig(**base))
    pool_env = make_env(EnvConfig(**base, backend="envpool"))
    assert pool_env.observation_space == gym_env.observation_space
    assert pool_env.action_space == gym_env.action_space
    gym_env.close()
    pool_env.close()
    a = frames_of(EnvConfig(**base), 30, action)
    b = frames_of(EnvConfig(**base, backend="envpool"), 30, action)
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    for channel in range(a.shape[-1]):  # same kind of pictures: close value statistics
        assert abs(a[..., channel].mean() - b[..., channel].mean()) < 12
        assert abs(a[..., channel].std() - b[..., channel].std()) < 10
    if env_id.startswith("ALE/"):  # same emulator, same preprocessing: the same first screen
        np.testing.assert_array_equal(a[0], b[0])


@needs_envpool
def test_single_env_gymnasium_semantics() -> None:
    from gymnasium.utils.env_checker import check_env

    env = make_env(CAR.model_copy(update={"max_episode_steps": 5}))
    check_env(env, skip_render_check=True)  # incl. reset(seed=...) determinism
    a = frames_of(CAR, 3, GAS, seed=11)
    assert np.array_equal(a, frames_of(CAR, 3, GAS, seed=11))
    assert not np.array_equal(a, frames_of(CAR, 3, GAS, seed=12))
    env.reset(seed=3)
    flags = [env.step(GAS)[3] for _ in range(5)]
    assert flags == [False] * 4 + [True]  # truncated at env.max_episode_steps
    discrete = make_env(CAR.model_copy(update={"kwargs": {"continuous": False}}))
    assert discrete.action_space == spaces.Discrete(5)
    discrete.reset(seed=0)
    assert discrete.step(3)[0].shape == (16, 16, 3)
    env.close()
    discrete.close()


class FakePool:
    """EnvPool stand-in for 2 envs: env 0 terminates on its 2nd raw step, rewards 1 per step."""

    def __init__(self) -> None:
        self.t = [0, 0]
        self.calls: list[list[int]] = []
        self.sent: Any = None

    def send(self, acts: np.ndarray, ids: np.ndarray) -> None:
        self.sent = ids

    def recv(self) -> Any:
        self.calls.append(list(self.sent))
        ids = list(self.sent)[::-1]  # results in another order than sent (EnvPool may do that)
        for i in ids:
            self.t[i] += 1
        obs = np.stack([np.full((96, 96, 3), 10 * self.t[i] + i, np.uint8) for i in ids])
        terminated = np.array([i == 0 and self.t[i] == 2 for i in ids])
        return obs, np.ones(len(ids), np.float32), terminated, np.zeros(len(ids), bool), {
            "env_id": np.array(ids)}

    def step(self, acts: np.ndarray, ids: np.ndarray) -> Any:
        self.send(acts, ids)
        return self.recv()

    def close(self) -> None:
        pass


@needs_envpool
def test_frame_skip_stops_stepping_an_env_whose_episode_ended() -> None:
    from envs.envpool import EnvPoolBatch

    batch = EnvPoolBatch(CAR.model_copy(update={"frame_skip": 3}), [0, 1])
    batch.close()
    fake = FakePool()
    batch._pool, batch._state_index = fake, None  # the public send/recv path
    obs, reward, terminated, truncated, _ = batch.step(actions(2))
    assert fake.calls == [[0, 1], [0, 1], [1]]  # like FrameSkip: env 0 stops at its end
    assert reward.tolist() == [2.0, 3.0] and terminated.tolist() == [True, False]
    assert obs[0].min() == obs[0].max() == 20 and obs[1].min() == obs[1].max() == 31
    assert not truncated.any()


@needs_envpool
@pytest.mark.parametrize("env_id", ["CarRacing-v3", "ALE/Breakout-v5"])
def test_direct_envpool_calls_equal_the_public_api(env_id: str) -> None:
    from envs.envpool import EnvPoolBatch

    cfg = EnvConfig(id=env_id, backend="envpool", image_size=16, frame_skip=2,
                    max_episode_steps=5)
    fast, public = EnvPoolBatch(cfg, [3, 4]), EnvPoolBatch(cfg, [3, 4])
    assert fast._state_index is not None
    public._state_index = None
    for batch in (fast, public):
        batch.reset()
    for _ in range(7):
        acts = np.stack([fast.action_space.sample() for _ in range(2)])
        a, b = fast.step(acts), public.step(acts)
        for x, y in zip(a[:4], b[:4], strict=True):
            np.testing.assert_array_equal(x, y)
        assert a[4].keys() == b[4].keys()
        ended = np.flatnonzero(a[2] | a[3])
        if len(ended):
            np.testing.assert_array_equal(fast.reset(ended)[0], public.reset(ended)[0])
    fast.close()
    public.close()


def actions(n: int) -> np.ndarray:
    return np.tile(GAS, (n, 1))


@needs_envpool
def test_vec_env_gives_sb3_what_it_expects() -> None:
    venv: Any = make_vec_env(CAR.model_copy(update={"frame_skip": 2}), n_envs=3, seed=1)
    obs = venv.reset()
    assert obs.shape == (3, 16, 16, 3) and obs.dtype == np.uint8
    for t in range(1, 10):
        obs, rewards, dones, infos = venv.step(actions(3))
        assert obs.shape == (3, 16, 16, 3) and rewards.dtype == np.float32
        assert dones.tolist() == [t % 4 == 0] * 3  # episodes of 4 agent steps, same-step reset
        for i in range(3):
            if dones[i]:
                terminal = infos[i]["terminal_observation"]
                assert terminal.shape == (16, 16, 3) and terminal.dtype == np.uint8
                assert infos[i]["TimeLimit.truncated"] is True
                assert infos[i]["episode"]["l"] == 4  # VecMonitor's statistics
                assert not np.array_equal(terminal, obs[i])  # obs: the next episode's start
            else:
                assert "terminal_observation" not in infos[i]
    assert venv.get_attr("render_mode") == [None] * 3
    venv.set_attr("answer", 42, indices=[1])
    assert venv.get_attr("answer", indices=1) == [42]
    assert venv.env_is_wrapped(gym.Wrapper) == [False] * 3
    assert venv.env_method("get_wrapper_attr", "action_space")[0] == venv.action_space
    with pytest.raises(AttributeError):
        venv.env_method("no_such_method")
    venv.close()
    from envs.envpool_vec import make_envpool_vec_env

    shown = make_envpool_vec_env(CAR, n_envs=2, seed=0, render_mode="rgb_array")
    shown.reset()
    assert shown.env_method("render", indices=[0])[0].shape == (400, 600, 3)
    image = shown.render()
    assert image is not None and image.shape == (800, 600, 3)  # two envs tiled
    shown.close()


@needs_envpool
def test_terminated_and_truncated_episodes_are_told_apart() -> None:
    venv = make_vec_env(CAR, n_envs=3, seed=0)
    inner: Any = venv.unwrapped
    venv.reset()
    real_step, real_reset = inner.batch.step, inner.batch.reset
    reset_ids: list[list[int]] = []

    def step(acts: Any, env_ids: Any = None) -> Any:
        obs, reward, _, _, info = real_step(acts, env_ids)
        return obs, reward, np.array([True, False, False]), np.array([False, True, False]), info

    def reset(env_ids: Any = None) -> Any:
        reset_ids.append(list(env_ids))
        return real_reset(env_ids)

    inner.batch.step, inner.batch.reset = step, reset
    _, _, dones, infos = venv.step(actions(3))
    assert dones.tolist() == [True, True, False] and reset_ids == [[0, 1]]
    assert infos[0]["TimeLimit.truncated"] is False and infos[1]["TimeLimit.truncated"] is True
    assert "terminal_observation" in infos[0] and "TimeLimit.truncated" not in infos[2]
    venv.close()


@needs_envpool
def test_vec_env_seeds_are_reproducible() -> None:
    def observations(venv: Any) -> np.ndarray:
        frames = [venv.reset()]
        frames += [venv.step(actions(2))[0] for _ in range(6)]
        return np.stack(frames)

    a = make_vec_env(CAR, n_envs=2, seed=7)
    b = make_vec_env(CAR, n_envs=2, seed=8)
    first = observations(a)
    assert np.array_equal(first, observations(make_vec_env(CAR, n_envs=2, seed=7)))
    assert not np.array_equal(first, observations(b))
    b.seed(7)  # SB3 seeds at the next reset: the pool is rebuilt with seeds 7, 8
    assert np.array_equal(first, observations(b))
    assert not np.array_equal(first, observations(a))  # an unseeded reset: new tracks
    c = make_vec_env(CAR, n_envs=2, seed=7)
    c.seed(7)  # what SB3 does with a model seed: the pool already has these seeds
    assert np.array_equal(first, observations(c))
    for venv in (a, b, c):
        venv.close()


@needs_envpool
@pytest.mark.parametrize(("env_id", "policy"), [
    ("CarRacing-v3", "brownian"),
    pytest.param("ALE/Pong-v5", "random", marks=pytest.mark.slow),
])
def test_collector_pool_is_reproducible(tmp_path: Path, env_id: str, policy: str) -> None:
    cfg = carracing_cfg(f"env.id={env_id}", f"collect.policy={policy}", "collect.episodes=5",
                        "collect.workers=3", "env.max_episode_steps=12", "env.grayscale=true",
                        "collect.max_episode_steps=10")
    reader = open_dataset(run(cfg, tmp_path / "a"))
    again = open_dataset(run(cfg, tmp_path / "b"))
    index = reader.episode_index()
    assert reader.episode_ids == list(range(5)) and reader.frame_shape == (16, 16, 1)
    assert [e["crc32"] for e in index] == [e["crc32"] for e in again.episode_index()]
    assert [e["env_slot"] for e in index] == [0, 1, 2, 0, 1]
    assert [e["slot_episode"] for e in index] == [0, 0, 0, 1, 1]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["runs"][0]["backend"] == "envpool" and manifest["runs"][0]["envs"] == 3
    for i in range(3):  # each slot's first episode: the episode's own seeds, as make_env plays it
        ep = reader.episode(i)
        assert ep.truncated[-1] and len(ep.reward) == 10  # collect.max_episode_steps
        env = make_env(cfg.env)
        want = rollout(env, make_builtin_policy(policy, env.action_space), *episode_seeds(0, i),
                       max_steps=10)
        for name in ("obs", "action", "reward", "terminated", "truncated"):
            np.testing.assert_array_equal(getattr(ep, name), getattr(want, name), err_msg=name)


@needs_envpool
def test_collector_frames_mode_keeps_the_shortest_prefix(tmp_path: Path) -> None:
    cfg = carracing_cfg("collect.frames=100", "collect.workers=3", "env.max_episode_steps=15")
    reader = open_dataset(run(cfg, tmp_path / "d"))
    assert reader.episode_ids == list(range(7)) and reader.num_frames == 105
    record = json.loads((tmp_path / "d" / "manifest.json").read_text())["runs"][-1]
    assert record["frames_stepped"] <= 105 + 2 * 15  # at most the 2 other slots past the end
    assert print_verify(tmp_path / "d") == 0


@needs_envpool
@pytest.mark.slow
def test_collect_resumes_after_sigkill(tmp_path: Path) -> None:
    out = tmp_path / "data"
    overrides = ["env.id=CarRacing-v3", "env.backend=envpool", "env.image_size=16",
                 "env.max_episode_steps=20", "collect.episodes=120", "collect.workers=3",
                 "collect.commit_seconds=0", "collect.chunk_frames=64"]
    cmd = [sys.executable, "-m", "worldmodel", "-q", "collect", "--out", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    index = out / "shards" / "w0.episodes.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if index.is_file() and index.read_text().count("\n") >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode() if proc.stderr else ""
    killed = DatasetReader(out, allow_empty=True).num_episodes
    assert 0 < killed < 120, "the collector should have been killed mid-way"

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reader = open_dataset(out)
    assert reader.episode_ids == list(range(120))  # all of them, once each
    assert reader.num_frames == 120 * 20
    assert print_verify(out) == 0


@needs_envpool
def test_agents_train_and_evaluate_on_envpool(tmp_path: Path) -> None:
    from agent_testing import ALGO_HYPERPARAMS

    from agents import evaluate, train
    from agents.latent import LatentObservation
    from worldmodel import train_vae
    from worldmodel.io import read_json
    from worldmodel.vae import load_vae

    common = ["env.id=CarRacing-v3", "env.backend=envpool", "env.n_envs=2",
              "env.max_episode_steps=12", *VAE_SETTINGS, "agent.timesteps=64",
              "agent.eval_every=64", "agent.eval_episodes=2", "agent.checkpoint_every=64",
              "agent.history=2", "agent.device=cpu", "seed=3"]
    # A VAE trained on an EnvPool dataset...
    cfg = resolve_config(None, [*common, "env.image_size=32", "collect.episodes=4",
                                "collect.workers=2", "vae.steps=4", "vae.batch_size=16",
                                "vae.val_every=4", "vae.val_frames=16", "vae.probe_frames=0",
                                "vae.device=cpu"])
    vae = train_vae.run(cfg, run(cfg, tmp_path / "data"), tmp_path / "vae", resume=False)
    runs = {}
    for mode, size in (("latent", 32), ("pixel", 36), ("latent-finetune", 32)):
        agent_cfg = resolve_config(None, [*common, f"env.image_size={size}",
                                          f"agent.obs_mode={mode}"])
        agent_cfg.agent.hyperparams = dict(ALGO_HYPERPARAMS["PPO"])
        runs[mode] = train.run(agent_cfg, tmp_path / mode, vae=None if mode == "pixel" else vae)
        summary = read_json(runs[mode] / "summary.json")
        assert summary["timesteps"] == 64 and summary["final_eval"]["episodes"] == 2
    wrapped = LatentObservation(make_env(cfg.env), load_vae(vae), history=2)  # one-env wrapper
    assert wrapped.reset(seed=0)[0].shape == (2 * 6,)
    assert wrapped.step(GAS)[0].shape == (2 * 6,)
    # ...and the agents evaluate (with a video) on either backend's frames.
    result = read_json(evaluate.run(runs["latent"], episodes=2, video=True))
    assert result["lengths"] == [12, 12] and (runs["latent"] / "video.mp4").stat().st_size > 0
    assert result["video"]["frames"] == 12 and result["video"]["reconstruction"]
    result = read_json(evaluate.run(runs["pixel"], episodes=1, video=True))
    assert result["video"]["frames"] == 12


@needs_envpool
@pytest.mark.slow
def test_pipeline_runs_on_envpool(tmp_path: Path) -> None:
    from worldmodel import pipeline

    cfg = resolve_config(Path(__file__).parents[1] / "configs" / "carracing.yaml", [
        "env.image_size=32", "env.max_episode_steps=12", "env.n_envs=2", "collect.episodes=4",
        *VAE_SETTINGS, "vae.epochs=null", "vae.steps=4", "vae.batch_size=16", "vae.val_every=4",
        "vae.val_frames=16", "vae.probe_frames=0", "agent.timesteps=64", "agent.eval_every=64",
        "agent.eval_episodes=2", "agent.eval_envs=2", "agent.checkpoint_every=64",
        "agent.hyperparams.n_steps=32", "agent.hyperparams.batch_size=32",
        "agent.hyperparams.n_epochs=1", "agent.normalize_reward=false",
        "pipeline.obs_modes=[latent, random-encoder]", "pipeline.seeds=[0]",
        "pipeline.eval_episodes=2", "pipeline.visualize=false", "compare.random_episodes=2",
        "compare.bootstrap_reps=100",
    ])
    assert cfg.env.backend == "envpool"
    report = pipeline.run(cfg, tmp_path / "pipe")
    assert report.is_file()
    runs = json.loads((tmp_path / "pipe" / "data" / "manifest.json").read_text())["runs"]
    assert runs[0]["backend"] == "envpool"


@needs_envpool
def test_an_atari_crop_is_the_same_error_on_both_backends() -> None:
    from envs import EnvConfigError

    pytest.importorskip("ale_py", reason="the Gymnasium side needs worldmodel[atari]")
    cfg = EnvConfig(id="ALE/Pong-v5", crop=Crop(top=2))
    errors = []
    for backend in ("gymnasium", "envpool"):
        with pytest.raises(EnvConfigError, match=r"env\.crop is not supported .*210x160") as e:
            make_env(cfg.model_copy(update={"backend": backend}))
        errors.append(e.value)
    assert [type(e) for e in errors] == [EnvConfigError, EnvConfigError]
    assert str(errors[0]) == str(errors[1]) and "\n" not in str(errors[0])


def test_crop_too_big_is_a_one_line_error() -> None:
    pytest.importorskip("envpool", reason="needs the fast extra: pip install 'worldmodel[fast]'")
    from envs import EnvConfigError, make_vec_env

    cfg = EnvConfig(id="CarRacing-v3", backend="envpool", crop=Crop(top=50, bottom=50))
    with pytest.raises(EnvConfigError, match=r"env\.crop .* leaves nothing of the 96x96 frame"):
        make_vec_env(cfg, n_envs=1)
