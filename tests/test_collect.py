"""The rollout collector: parallel workers, reproducible episodes, resume after SIGKILL, Ray."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gymnasium import spaces

from envs import make_env
from worldmodel.collect import BrownianPolicy, episode_seeds, make_builtin_policy, run
from worldmodel.config import Config, resolve_config
from worldmodel.dataset import DatasetReader, Episode, open_dataset, print_verify
from worldmodel.errors import UserError

SMALL = ["env.image_size=16", "collect.commit_seconds=0", "collect.chunk_frames=64"]


def small_cfg(*overrides: str) -> Config:
    return resolve_config(None, [*SMALL, *overrides])


def direct_rollout(cfg: Config, episode: int) -> Episode:
    """Episode ``episode`` played by hand: make_env, the episode's seeds and the same policy."""
    env = make_env(cfg.env)
    env_seed, policy_seed = episode_seeds(cfg.seed, episode)
    policy: Any = make_builtin_policy(cfg.collect.policy, env.action_space, cfg.collect.brownian_dt)
    policy.seed(policy_seed)
    obs, info = env.reset(seed=env_seed)
    policy.reset(obs, info)
    steps: dict[str, list[Any]] = {k: [] for k in ("obs", "action", "reward", "te", "tr", "state")}
    t = 0
    while True:
        steps["obs"].append(obs)
        steps["state"].append(info["state"])
        action = policy.act(obs, info)
        obs, reward, terminated, truncated, info = env.step(action)
        t += 1
        cap = cfg.collect.max_episode_steps
        truncated = truncated or (cap is not None and t >= cap)
        steps["action"].append(action)
        steps["reward"].append(reward)
        steps["te"].append(terminated)
        steps["tr"].append(truncated)
        if terminated or truncated:
            break
    return Episode(np.stack(steps["obs"]), np.asarray(steps["action"]),
                   np.asarray(steps["reward"], np.float32), np.asarray(steps["te"]),
                   np.asarray(steps["tr"]), np.asarray(steps["state"], np.float32))


def assert_same_episode(got: Episode, want: Episode) -> None:
    for name, a, b in zip(Episode._fields, got, want, strict=True):
        assert a is not None and b is not None, name
        assert a.shape == b.shape, name
        np.testing.assert_array_equal(a, b.astype(a.dtype), err_msg=name)


@pytest.fixture(scope="module")
def two_worker_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path]:
    cfg = small_cfg("collect.episodes=8", "collect.workers=2")
    out = run(cfg, tmp_path_factory.mktemp("collect") / "data")
    return cfg, out


def test_two_workers_equal_direct_rollouts(two_worker_data: tuple[Config, Path]) -> None:
    cfg, out = two_worker_data
    reader = open_dataset(out)
    assert reader.episode_ids == list(range(8))
    assert reader.has_state and reader.frame_shape == (16, 16, 3)
    index = reader.episode_index()
    assert {e["worker"] for e in index} <= {0, 1}
    for i in range(8):
        assert index[i]["seed"] == episode_seeds(cfg.seed, i)[0]
        assert_same_episode(reader.episode(i), direct_rollout(cfg, i))
    assert reader.num_frames == sum(e["length"] for e in index)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["env_id"] == "worldmodel/Reach-v0"
    assert manifest["preprocessing"] == cfg.env.preprocessing()
    assert manifest["versions"]["zarr"].startswith("3.")
    assert resolve_config(out / "config.yaml") == cfg


def test_brownian_continuous_with_step_cap(tmp_path: Path) -> None:
    cfg = small_cfg("collect.episodes=3", "collect.workers=1", "collect.policy=brownian",
                    "collect.max_episode_steps=15", "env.kwargs={continuous: true}", "seed=3")
    reader = open_dataset(run(cfg, tmp_path / "d"))
    for i in range(3):
        ep = reader.episode(i)
        assert ep.action.shape == (len(ep.reward), 2) and ep.action.dtype == np.float32
        assert len(ep.reward) <= 15
        assert ep.truncated[-1] or ep.terminated[-1]
        if len(ep.reward) == 15 and not ep.terminated[-1]:
            assert ep.truncated[-1]
        assert_same_episode(ep, direct_rollout(cfg, i))
        # Brownian: successive actions differ by sqrt(dt) * N(0, 1) before clipping.
        assert np.abs(np.diff(ep.action, axis=0)).max() < 1.0


def test_frames_mode_keeps_shortest_prefix_and_rerun_is_noop(tmp_path: Path) -> None:
    cfg = small_cfg("collect.frames=400", "collect.workers=2")
    out = run(cfg, tmp_path / "d")
    lengths = [e["length"] for e in open_dataset(out).episode_index()]
    assert sum(lengths) >= 400 > sum(lengths[:-1])
    assert open_dataset(out).episode_ids == list(range(len(lengths)))
    runs = json.loads((out / "manifest.json").read_text())["runs"]
    run(cfg, out)  # complete: nothing to do
    assert json.loads((out / "manifest.json").read_text())["runs"] == runs
    # Asking for more extends the same dataset.
    bigger = small_cfg("collect.frames=700", "collect.workers=2")
    lengths = [e["length"] for e in open_dataset(run(bigger, out)).episode_index()]
    assert sum(lengths) >= 700 > sum(lengths[:-1])
    assert print_verify(out) == 0


def test_frames_mode_drops_episodes_a_killed_run_committed_past_the_target(
    tmp_path: Path,
) -> None:
    from worldmodel.dataset import Location, read_shard_index, rewrite_shard_index

    out = run(small_cfg("collect.episodes=6", "collect.workers=2"), tmp_path / "d")
    lengths = [e["length"] for e in open_dataset(out).episode_index()]
    # As a killed frames-mode run leaves it: ids 3-5 committed by parallel workers, id 2 not.
    loc = Location(out)
    shard = open_dataset(out).episode_index()[2]["shard"]
    rewrite_shard_index(loc, shard, [e for e in read_shard_index(loc, shard) if e["id"] != 2])
    assert open_dataset(out).episode_ids == [0, 1, 3, 4, 5]
    # ids 0-2 reach the target: the resumed run collects id 2 and keeps only 0-2.
    run(small_cfg(f"collect.frames={sum(lengths[:3])}", "collect.workers=2"), out)
    assert open_dataset(out).episode_ids == [0, 1, 2]
    # Already complete (ids 0-1 reach it): the early return trims too.
    run(small_cfg(f"collect.frames={sum(lengths[:2])}", "collect.workers=2"), out)
    assert open_dataset(out).episode_ids == [0, 1]
    assert print_verify(out) == 0


def test_out_that_is_a_file_is_a_one_line_error(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from worldmodel.cli import main as cli_main

    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert cli_main(["-q", "collect", "--out", str(target), *(a for s in SMALL
                                                               for a in ("--set", s))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"worldmodel collect: error: --out {target} is a file; pass a folder for "
                   "the run"]
    assert target.read_text() == "mine"


def test_refuses_a_dataset_of_other_settings(two_worker_data: tuple[Config, Path]) -> None:
    _, out = two_worker_data
    before = (out / "manifest.json").read_text()
    with pytest.raises(UserError, match=r"env\.image_size: 16 in the dataset, 32 now"):
        run(small_cfg("collect.episodes=8", "env.image_size=32"), out)
    with pytest.raises(UserError, match=r"env\.id"):
        run(small_cfg("collect.episodes=8", "env.id=CartPole-v1"), out)
    with pytest.raises(UserError, match="seed"):
        run(small_cfg("collect.episodes=8", "seed=1"), out)
    assert (out / "manifest.json").read_text() == before


def test_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="policy factory"):
        run(small_cfg("collect.policy=agent:runs/x"), tmp_path / "a")
    with pytest.raises(UserError, match=r"set env\.backend=envpool"):
        run(small_cfg("collect.backend=envpool"), tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a dataset"):
        run(small_cfg("collect.episodes=1"), tmp_path / "c")


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path: Path) -> None:
    out = tmp_path / "data"
    overrides = [*SMALL, "collect.episodes=150", "collect.workers=2"]
    cmd = [sys.executable, "-m", "worldmodel", "-q", "collect", "--out", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    committed = 0
    while committed == 0 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
        for index in out.glob("shards/*.episodes.jsonl"):
            committed += index.read_text().count("\n")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode() if proc.stderr else ""
    killed = DatasetReader(out, allow_empty=True).num_episodes
    assert 0 < killed < 150, "the collector should have been killed mid-way"

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reader = open_dataset(out)
    assert reader.episode_ids == list(range(150))  # all of them, once each
    assert print_verify(out) == 0
    cfg = resolve_config(None, overrides)
    for i in (0, 1, 75, 149):
        assert_same_episode(reader.episode(i), direct_rollout(cfg, i))
    want_crc = {e["id"]: e["crc32"] for e in reader.episode_index()}
    assert len(want_crc) == 150


@pytest.mark.slow
def test_ray_backend_equals_process_backend(two_worker_data: tuple[Config, Path],
                                            tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install worldmodel[ray])")
    cfg, process_out = two_worker_data
    ray_cfg = cfg.model_copy(deep=True)
    ray_cfg.collect.backend = "ray"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray_out = run(ray_cfg, tmp_path / "ray")
    finally:
        ray.shutdown()
    a, b = open_dataset(ray_out), open_dataset(process_out)
    assert a.episode_ids == b.episode_ids == list(range(8))
    for i in range(8):
        assert_same_episode(a.episode(i), b.episode(i))
        assert a.episode_index()[i]["crc32"] == b.episode_index()[i]["crc32"]


def test_brownian_policy_discrete_is_sticky() -> None:
    policy = BrownianPolicy(spaces.Discrete(5), dt=1 / 50)
    policy.seed(0)
    actions = np.array([policy.act(None, {}) for _ in range(5000)])  # type: ignore[arg-type]
    switch_rate = np.mean(actions[1:] != actions[:-1])
    # resampled with probability sqrt(1/50) ~ 0.141, and a resample repeats 1 time in 5
    assert abs(switch_rate - np.sqrt(1 / 50) * 0.8) < 0.02
    assert set(np.unique(actions)) == set(range(5))
    box = BrownianPolicy(spaces.Box(0.0, 1.0, (3,)), dt=1 / 50)
    box.seed(1)
    walk = np.array([box.act(None, {}) for _ in range(2000)])  # type: ignore[arg-type]
    assert walk.min() >= 0.0 and walk.max() <= 1.0
    steps = np.diff(walk, axis=0)
    inside = (walk[1:] > 0) & (walk[1:] < 1) & (walk[:-1] > 0) & (walk[:-1] < 1)
    assert abs(steps[inside].std() - np.sqrt(1 / 50)) < 0.02


def test_frame_buffer_grows_and_keeps_frames() -> None:
    from worldmodel.collect import _FrameBuffer

    buf = _FrameBuffer((2, 2, 1), capacity=2)
    frames = [np.full((2, 2, 1), i, np.uint8) for i in range(5)]
    for f in frames:
        buf.append(f)
    assert buf.n == 5 and len(buf.data) >= 5
    np.testing.assert_array_equal(buf.data[:5], np.stack(frames))
