"""The ``dream`` mode: the agent trains only in M's dream and is evaluated in the real env."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import TINY as CONFTEST_TINY
from conftest import TINY_MEMORY
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

from agents import compare, train
from agents.evaluate import run as evaluate
from agents.memory_obs import VecMemoryObservation
from agents.modes import get_mode
from worldmodel.config import CompareConfig, Config, resolve_config
from worldmodel.dataset import open_dataset
from worldmodel.dream import DreamVecEnv
from worldmodel.errors import UserError
from worldmodel.io import read_json, read_jsonl
from worldmodel.pipeline import plan

TINY = [*CONFTEST_TINY, *TINY_MEMORY]
AGENT = [
    "env.n_envs=2", "env.max_episode_steps=12", "agent.timesteps=128", "agent.eval_every=64",
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


def _chain(venv: VecEnv) -> list[VecEnv]:
    out = [venv]
    while isinstance(out[-1], VecEnvWrapper):
        out.append(out[-1].venv)
    return out


def test_the_row_trains_in_the_dream_and_observes_z_h() -> None:
    dream, memory = get_mode("dream"), get_mode("latent-memory")
    assert dream.trains_in == "dream" and memory.trains_in == "real"
    assert dream.wrapper == memory.wrapper and dream.memory_kind == "memory"
    assert dream.uses_vae_weights


def test_train_in_the_dream_evaluate_in_the_real_env(
    vae: Path, memory: Path, reach16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eval_envs: list[VecEnv] = []
    train_envs: list[VecEnv] = []

    class Spy(train.PeriodicEval):
        def __init__(self, eval_env: VecEnv, *args: Any, **kwargs: Any) -> None:
            eval_envs.append(eval_env)
            super().__init__(eval_env, *args, **kwargs)

    real_build = train._build_model

    def build(cfg: Config, out: Path, env: VecEnv, *args: Any) -> Any:
        train_envs.append(env)
        return real_build(cfg, out, env, *args)

    monkeypatch.setattr(train, "PeriodicEval", Spy)
    monkeypatch.setattr(train, "_build_model", build)
    out = train.run(_cfg("agent.obs_mode=dream", "agent.timesteps=64"), tmp_path / "a",
                    vae=vae, memory=memory)
    # resume: the dream is rebuilt (reseeded from the seed and the step count)
    train.run(_cfg("agent.obs_mode=dream"), out, resume=True)
    assert len(train_envs) == len(eval_envs) == 2
    for env in train_envs:
        assert any(isinstance(e, DreamVecEnv) for e in _chain(env))
    for env in eval_envs:
        chain = _chain(env)
        assert any(isinstance(e, VecMemoryObservation) for e in chain)
        assert not any(isinstance(e, DreamVecEnv) for e in chain)
    assert train.dream_seed(0, 0) != train.dream_seed(0, 64)
    evaluations = read_jsonl(out / "evaluations.jsonl")
    assert [r["timesteps"] for r in evaluations] == [64, 128]
    # the real Reach: episodes capped at env.max_episode_steps=12, rewards of Reach's scale
    assert all(0 < n <= 12 for r in evaluations for n in r["lengths"])
    assert all(-12.0 <= x <= 12.0 for r in evaluations for x in r["returns"])
    summary = read_json(out / "summary.json")
    assert summary["timesteps"] == summary["dream_env_steps"] == 128
    assert summary["real_env_steps"] == 0
    assert summary["real_env_steps_collected"] == open_dataset(reach16).num_frames
    assert summary["memory"]["kind"] == "memory"
    with pytest.raises(UserError, match=r"memory\.temperature: 1\.0 -> 1\.5"):
        train.run(_cfg("agent.obs_mode=dream", "agent.timesteps=192",
                       "memory.temperature=1.5"), out, resume=True)
    # evaluate in the real env, then compare with an agent trained in the real env
    result = read_json(evaluate(out, episodes=2))
    assert result["obs_mode"] == "dream" and len(result["returns"]) == 2
    real = train.run(_cfg("agent.obs_mode=latent-memory", "agent.timesteps=64"),
                     tmp_path / "real", vae=vae, memory=memory)
    assert read_json(real / "summary.json")["real_env_steps"] == 64
    assert read_json(real / "summary.json")["dream_env_steps"] == 0
    report_dir = compare.run([out, real], tmp_path / "report",
                             CompareConfig(random_episodes=4, bootstrap_reps=100))
    groups = read_json(report_dir / "report.json")["groups"]
    steps = {name.split()[0]: group["real_env_steps"] for name, group in groups.items()}
    assert steps == {"dream": open_dataset(reach16).num_frames, "latent-memory": 64}
    md = (report_dir / "report.md").read_text()
    assert "| real env steps |" in md


def test_a_dream_that_does_not_match_the_real_observations_is_refused(
    vae: Path, memory: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match=r"agent\.history=1") as e:
        train.run(_cfg("agent.obs_mode=dream", "agent.history=2"), tmp_path / "h", vae=vae,
                  memory=memory)
    assert "\n" not in str(e.value)


def test_the_pipeline_plans_m_for_a_dream_arm_and_keys_it_on_m() -> None:
    def runs(*overrides: str) -> list[Any]:
        cfg = resolve_config(None, ["pipeline.obs_modes=[dream]", "pipeline.seeds=[0]",
                                    *overrides])
        return plan(cfg)

    base = runs()
    stages = [r.stage for r in base]
    assert "train-memory" in stages and stages.index("train-memory") < stages.index(
        "train-agent")
    agent = next(r for r in base if r.stage == "train-agent")
    assert agent.inputs == {"train-vae": ["vae"], "train-memory": ["memory"]}

    def key(*overrides: str) -> str:
        return next(r.key for r in runs(*overrides) if r.stage == "train-agent")

    assert key("memory.lr=0.01") != agent.key  # keyed on M's run
    assert key("memory.temperature=1.5") != agent.key  # and on the dream's temperature


def test_compare_never_pools_dreams_of_other_temperatures(tmp_path: Path) -> None:
    import numpy as np

    runs = []
    for i, tau in enumerate((1.0, 1.15, 1.15)):
        path = tmp_path / f"run{i}"
        path.mkdir()
        cfg = _cfg("agent.obs_mode=dream", f"memory.temperature={tau}", f"seed={i}")
        runs.append(compare.AgentRun(path, cfg, np.zeros(2), np.zeros(1), np.zeros(1),
                                     np.zeros(1), 1.0, None, True))
    groups = compare.group_runs(runs)
    assert sorted(len(g.runs) for g in groups) == [1, 2]
    assert all("memory.temperature" in g.name for g in groups)
