"""``latent-memory`` modes: the policy sees ``[z_t, h_t]``, M's LSTM state carried per env."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY as CONFTEST_TINY
from conftest import TINY_MEMORY
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

from agents import train
from agents.evaluate import run as evaluate
from agents.latent import VecLatentObservation
from agents.memory_obs import (
    MEMORY_RECORD,
    RANDOM_MEMORY_WEIGHTS,
    VecMemoryObservation,
    load_agent_memory,
)
from agents.models import agent_observation_space
from agents.policy import make_policy
from envs import make_env, make_vec_env
from worldmodel.config import Config, load_run_config, resolve_config
from worldmodel.errors import UserError
from worldmodel.io import atomic_write_json, read_json
from worldmodel.memory import LoadedMemory, load_memory
from worldmodel.pipeline import plan
from worldmodel.vae import load_vae

TINY = [*CONFTEST_TINY, *TINY_MEMORY]
AGENT = [
    "env.n_envs=2", "env.max_episode_steps=12", "agent.timesteps=64", "agent.eval_every=64",
    "agent.eval_episodes=2", "agent.checkpoint_every=64", "agent.device=cpu",
    "agent.hyperparams={n_steps: 32, batch_size: 32, n_epochs: 1}",
]


def _cfg(*extra: str) -> Config:
    return resolve_config(None, [*TINY, *AGENT, *extra])


@pytest.fixture(scope="module")
def vae(reach16_memory: tuple[Path, Path]) -> Path:
    """The session's tiny VAE copy that M was trained with (conftest)."""
    return reach16_memory[0]


@pytest.fixture(scope="module")
def memory(reach16_memory: tuple[Path, Path]) -> Path:
    """The session's tiny M (conftest's ``TINY_MEMORY``)."""
    return reach16_memory[1]


def _wrapped(cfg: Config, vae: Path, mem: LoadedMemory, n_envs: int = 3) -> VecMemoryObservation:
    venv: VecEnv = make_vec_env(cfg.env, n_envs=n_envs, seed=0)
    return VecMemoryObservation(VecLatentObservation(venv, load_vae(vae)), mem)


def test_h_is_carried_per_env_and_reset_at_episode_start(vae: Path, memory: Path) -> None:
    cfg = _cfg()
    mem = load_memory(memory)
    env = _wrapped(cfg, vae, mem)
    encoder = env.venv
    assert isinstance(encoder, VecLatentObservation)
    z_dim, h_dim = mem.latent_dim, mem.hidden_size
    assert env.observation_space.shape == (z_dim + h_dim,)
    assert env.observation_space.dtype == np.float32
    obs = env.reset()
    assert isinstance(obs, np.ndarray) and np.all(obs[:, z_dim:] == 0)  # h_0 = 0
    rng = np.random.default_rng(0)
    # The manual loop: one independent M per env, stepped with (z_t, a_t), zeroed after a done.
    states = [mem.initial_state(1) for _ in range(3)]
    z = obs[:, :z_dim].copy()
    ended = 0
    for _ in range(30):
        actions = rng.integers(0, env.action_space.n, 3)  # type: ignore[attr-defined]
        new, _, dones, infos = env.step(actions)
        assert isinstance(new, np.ndarray)
        for i in range(3):
            _, states[i] = mem.step(z[i : i + 1], mem.actions(actions[i : i + 1]), states[i])
            h_end = states[i][0][0, 0].numpy()
            if dones[i]:
                ended += 1
                terminal = infos[i]["terminal_observation"]
                assert terminal.shape == (z_dim + h_dim,)
                np.testing.assert_allclose(terminal[z_dim:], h_end, atol=1e-6)  # h_T
                states[i] = mem.initial_state(1)
                assert np.all(new[i, z_dim:] == 0)
            else:
                np.testing.assert_allclose(new[i, z_dim:], h_end, atol=1e-6)
            np.testing.assert_allclose(new[i, :z_dim], encoder.latents[i], atol=0)
        z = new[:, :z_dim].copy()
    assert ended >= 3  # episodes of 12 steps: every env ended at least once
    # the envs' hidden states differ (they are carried per env)
    assert isinstance(new, np.ndarray)
    assert not np.allclose(new[0, z_dim:], new[1, z_dim:])
    env.close()


class KeepTerminalFrames(VecEnvWrapper):
    """Keep the raw ``terminal_observation`` frames of the last step."""

    def reset(self) -> Any:
        return self.venv.reset()

    def step_wait(self) -> Any:
        obs, rewards, dones, infos = self.venv.step_wait()
        self.raw = {int(i): infos[i]["terminal_observation"].copy()
                    for i in np.flatnonzero(dones)}
        return obs, rewards, dones, infos


def test_terminal_observation_is_z_of_the_last_frame_and_h_of_the_episode(
    vae: Path, memory: Path
) -> None:
    cfg = _cfg()
    mem = load_memory(memory)
    keep = KeepTerminalFrames(make_vec_env(cfg.env, n_envs=2, seed=3))
    encoder = load_vae(vae)
    env = VecMemoryObservation(VecLatentObservation(keep, encoder), mem)
    env.reset()
    ended = 0
    for _ in range(13):
        hidden_before = env.state[0][0].numpy().copy()
        _, _, dones, infos = env.step(np.array([1, 2]))
        for i in np.flatnonzero(dones):
            terminal = infos[i]["terminal_observation"]
            assert terminal.dtype == np.float32 and terminal.shape == env.observation_space.shape
            z_t = encoder.encode(keep.raw[int(i)][None])[0]
            np.testing.assert_allclose(terminal[: mem.latent_dim], z_t, atol=1e-5)
            h_t = terminal[mem.latent_dim :]
            assert np.any(h_t != 0) and not np.allclose(h_t, hidden_before[i])
            assert np.all(env.hidden[i] == 0) and np.all(env.state[1][0, i].numpy() == 0)
            ended += 1
    assert ended == 2
    env.close()


def test_history_stacks_z_and_h(vae: Path, memory: Path) -> None:
    cfg = _cfg()
    mem = load_memory(memory)
    venv = make_vec_env(cfg.env, n_envs=2, seed=0)
    env = VecMemoryObservation(VecLatentObservation(venv, load_vae(vae)), mem, history=2)
    width = mem.latent_dim + mem.hidden_size
    obs = env.reset()
    assert isinstance(obs, np.ndarray) and obs.shape == (2, 2 * width)
    assert np.all(obs[:, :width] == 0)
    new, *_ = env.step(np.array([0, 1]))
    assert isinstance(new, np.ndarray)
    np.testing.assert_array_equal(new[:, :width], obs[:, width:])
    env.close()


def _train_agent(tmp: Path, name: str, mode: str, vae: Path, memory: Path | None,
                 *extra: str) -> Path:
    return train.run(_cfg(f"agent.obs_mode={mode}", *extra), tmp / name, vae=vae, memory=memory)


def test_train_evaluate_and_collect_round_trip(vae: Path, memory: Path, tmp_path: Path) -> None:
    out = _train_agent(tmp_path, "agent", "latent-memory", vae, memory)
    record = read_json(out / MEMORY_RECORD)
    mem = load_memory(memory)
    assert record["kind"] == "memory" and record["path"] == str(memory.resolve())
    assert record["vae_weights_hash"] == load_vae(vae).weights_hash
    assert record["hidden_size"] == mem.hidden_size and record["checkpoint"] == "best"
    summary = read_json(out / "summary.json")
    assert summary["memory"]["weights_hash"] == record["weights_hash"]
    cfg = load_run_config(out)
    space = agent_observation_space(out, cfg)
    assert space.shape == (mem.latent_dim + mem.hidden_size,)
    result = read_json(evaluate(out, episodes=2))
    assert result["obs_mode"] == "latent-memory" and len(result["returns"]) == 2
    # the collector's agent:PATH policy carries h through an episode
    env = make_env(cfg.env)
    policy = make_policy(f"agent:{out}", env, seed=0, epsilon=0.0)
    frame, info = env.reset(seed=0)
    policy.reset(frame, info)
    for _ in range(3):
        action = policy.act(frame, info)
        frame, *_ = env.step(action)
    assert policy._state is not None and bool(policy._state[0].abs().sum() > 0)
    env.close()
    # memory weights changed since: refused, one line
    state = torch.load(memory / "best.pt", weights_only=True)
    moved = tmp_path / "memory_copy"
    shutil.copytree(memory, moved)
    with torch.no_grad():
        state["model"]["reward.bias"] += 1.0
    torch.save(state, moved / "best.pt")
    record["relpath"], record["path"] = None, str(moved)
    atomic_write_json(out / MEMORY_RECORD, record)
    with pytest.raises(UserError, match=r"memory weights .* changed since"):
        load_agent_memory(out, cfg)


def test_the_untrained_control_differs_only_in_weights(
    vae: Path, memory: Path, tmp_path: Path
) -> None:
    trained = _train_agent(tmp_path, "trained", "latent-memory", vae, memory)
    control = _train_agent(tmp_path, "control", "latent-memory-untrained", vae, memory)
    a, b = read_json(trained / MEMORY_RECORD), read_json(control / MEMORY_RECORD)
    assert b["kind"] == "random" and (control / RANDOM_MEMORY_WEIGHTS).is_file()
    assert b["architecture_from"] == str(memory.resolve())
    assert a["weights_hash"] != b["weights_hash"]
    for key in ("latent_dim", "action_dim", "hidden_size", "mixtures", "action_space"):
        assert a[key] == b[key], key
    spaces = [agent_observation_space(r, load_run_config(r)) for r in (trained, control)]
    assert spaces[0] == spaces[1]
    rebuilt = load_agent_memory(control, load_run_config(control))
    assert rebuilt is not None and rebuilt.hidden_size == a["hidden_size"]
    # seeded by cfg.seed: the same seed gives the same untrained weights
    again = _train_agent(tmp_path, "again", "latent-memory-untrained", vae, memory,
                         "agent.timesteps=32")
    assert read_json(again / MEMORY_RECORD)["weights_hash"] == b["weights_hash"]


def _one_line(e: pytest.ExceptionInfo[Any]) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_one_line_errors(vae: Path, memory: Path, reach16: Path, tmp_path: Path,
                         make_tiny_vae: Any) -> None:
    with pytest.raises(UserError) as e:
        _train_agent(tmp_path, "a", "latent-memory", vae, None)
    assert "needs a memory run: pass --memory" in _one_line(e)
    with pytest.raises(UserError) as e:
        _train_agent(tmp_path, "b", "latent-memory", memory, memory)
    assert "--vae" in _one_line(e) and "is a memory run" in str(e.value)
    with pytest.raises(UserError) as e:
        _train_agent(tmp_path, "c", "latent-memory", vae, vae)
    assert "--memory" in _one_line(e) and "is a vae run" in str(e.value)
    other = make_tiny_vae(tmp_path / "other_vae", reach16, "seed=1", steps=3)
    with pytest.raises(UserError) as e:
        _train_agent(tmp_path, "d", "latent-memory", other, memory)
    assert "trained on other VAE weights" in _one_line(e)
    for name in "abcd":
        assert not (tmp_path / name / "last.zip").exists()


def test_the_pipeline_trains_m_only_when_an_arm_needs_it() -> None:
    def stages(*modes: str, **extra: str) -> list[tuple[str, str, dict[str, list[str]]]]:
        cfg = resolve_config(None, [f"pipeline.obs_modes=[{','.join(modes)}]",
                                    "pipeline.seeds=[0]"])
        return [(r.stage, r.folder, r.inputs) for r in plan(cfg)]

    without = stages("pixel", "latent", "random-encoder")
    assert "train-memory" not in [s for s, _, _ in without]
    runs = stages("latent", "latent-memory", "latent-memory-untrained")
    names = [s for s, _, _ in runs]
    assert names.count("train-memory") == 1
    assert names.index("train-memory") == names.index("train-vae") + 1
    agents = {folder: inputs for s, folder, inputs in runs if s == "train-agent"}
    assert agents["agents/latent-memory__seed0"] == {"train-vae": ["vae"],
                                                     "train-memory": ["memory"]}
    assert set(agents["agents/latent-memory-untrained__seed0"]) == {"train-vae", "train-memory"}
    assert agents["agents/latent__seed0"] == {"train-vae": ["vae"]}


def test_pipeline_keys_follow_the_memory_weights_or_its_architecture() -> None:
    def keys(*overrides: str) -> dict[str, str]:
        cfg = resolve_config(None, ["pipeline.obs_modes=[latent-memory,latent-memory-untrained]",
                                    "pipeline.seeds=[0]", *overrides])
        return {r.folder: r.key for r in plan(cfg) if r.stage == "train-agent"}

    base = keys()
    lr = keys("memory.lr=0.01")  # trains M differently: only the trained-M arm changes
    assert lr["agents/latent-memory__seed0"] != base["agents/latent-memory__seed0"]
    assert lr["agents/latent-memory-untrained__seed0"] == base[
        "agents/latent-memory-untrained__seed0"]
    wider = keys("memory.hidden_size=32")  # the architecture: both change
    assert all(wider[k] != base[k] for k in base)


def test_cli_train_agent_takes_memory(
    vae: Path, memory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from worldmodel.cli import main as cli_main

    sets = [a for s in [*TINY, *AGENT, "agent.obs_mode=latent-memory", "agent.timesteps=32"]
            for a in ("--set", s)]
    out = tmp_path / "cli"
    assert cli_main(["-q", "train-agent", *sets, "--vae", str(vae), "--memory", str(memory),
                     "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert read_json(out / MEMORY_RECORD)["kind"] == "memory"
    assert cli_main(["-q", "train-agent", *sets, "--vae", str(vae), "-o",
                     str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--memory MEMORY_RUN" in err[0]


def test_resume_rebuilds_m_from_memory_json(vae: Path, memory: Path, tmp_path: Path) -> None:
    out = _train_agent(tmp_path, "r", "latent-memory-untrained", vae, memory, "agent.timesteps=32")
    before = read_json(out / MEMORY_RECORD)
    train.run(_cfg("agent.obs_mode=latent-memory-untrained", "agent.timesteps=64"), out,
              resume=True)
    assert read_json(out / "summary.json")["timesteps"] == 64
    assert read_json(out / MEMORY_RECORD) == before


def test_compare_never_pools_agents_on_different_trained_ms(tmp_path: Path) -> None:
    from agents import compare

    cfg = _cfg("agent.obs_mode=latent-memory")
    runs = []
    for i, weights in enumerate(("aaaa", "bbbb", "bbbb")):
        path = tmp_path / f"run{i}"
        path.mkdir()
        atomic_write_json(path / MEMORY_RECORD, {"kind": "memory", "weights_hash": weights})
        seeded = cfg.model_copy(update={"seed": i})
        runs.append(compare.AgentRun(path, seeded, np.zeros(2), np.zeros(1), np.zeros(1),
                                     np.zeros(1), 1.0, None, True))
    groups = compare.group_runs(runs)
    assert sorted(len(g.runs) for g in groups) == [1, 2]
