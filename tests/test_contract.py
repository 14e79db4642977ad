"""The stage and run-folder contract: settings declared once, run folders that always restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from agents import compare
from agents import train as agent_train
from worldmodel import train_vae
from worldmodel.config import Config, resolve_config
from worldmodel.errors import UserError
from worldmodel.pipeline import REGISTRY
from worldmodel.runfolder import RunFolder
from worldmodel.stages import config_effects, defining_keys, resume_mismatches, stage_key

#: Another valid value for keys whose type alone does not give one (or that come in pairs).
OTHER: dict[str, list[str]] = {
    "env.id": ["env.id=worldmodel/Other-v0"],
    "env.crop": ["env.crop={top: 1}"],
    "env.kwargs": ["env.kwargs={x: 1}"],
    "env.max_episode_steps": ["env.max_episode_steps=50"],
    "collect.frames": ["collect.frames=500", "collect.episodes=null"],
    "collect.episodes": ["collect.episodes=7"],
    "collect.policy": ["collect.policy=brownian"],
    "collect.max_episode_steps": ["collect.max_episode_steps=50"],
    "collect.ray_address": ["collect.ray_address=auto"],
    "vae.epochs": ["vae.epochs=2", "vae.steps=null"],
    "vae.widths": ["vae.widths=[8]"],
    "memory.epochs": ["memory.epochs=2", "memory.steps=null"],
    "agent.obs_mode": ["agent.obs_mode=pixel"],
    "agent.policy": ["agent.policy=MlpPolicy"],
    "agent.hyperparams": ["agent.hyperparams={gamma: 0.9}"],
    "pipeline.obs_modes": ["pipeline.obs_modes=[pixel]"],
    "pipeline.seeds": ["pipeline.seeds=[5]"],
}


def _changed(key: str, cfg: Config) -> Config:
    """``cfg`` with ``key`` set to another valid value."""
    if key in OTHER:
        return resolve_config(None, OTHER[key])
    value: Any = cfg.model_dump(mode="json")
    for part in key.split("."):
        value = value[part]
    section, _, name = key.rpartition(".")
    model: Any = Config
    for part in section.split(".") if section else []:
        model = model.model_fields[part].annotation
    choices = getattr(model.model_fields[name].annotation, "__args__", ())
    if isinstance(value, bool):
        new: Any = not value
    elif isinstance(value, int):
        new = value + 1
    elif isinstance(value, float):
        new = value / 2 if value else 0.5
    elif choices and all(isinstance(c, str) for c in choices):
        new = next(c for c in choices if c != value)
    else:
        raise AssertionError(f"add {key} to OTHER")
    return resolve_config(None, [f"{key}={yaml.safe_dump(new).splitlines()[0]}"])


@pytest.mark.parametrize("key", sorted(config_effects()))
def test_every_setting_means_the_same_to_keys_resume_and_compare(key: str) -> None:
    """Each field's declared effect decides, alone, what the three consumers do with it."""
    effect = config_effects()[key]
    base, other = resolve_config(None), _changed(key, resolve_config(None))
    assert base != other
    for spec in REGISTRY:
        reads = key in spec.keys()
        # the pipeline's cache key: changes iff the stage reads it and it is not runtime
        assert (stage_key(base, spec) != stage_key(other, spec)) == (reads and effect != "runtime")
        # --resume: refused iff the stage reads it and it changes the output
        assert bool(resume_mismatches(base, other, spec)) == (reads and effect == "output")
    # compare: two runs differing only in this key are two arms iff it defines an arm
    defines = key in agent_train.STAGE.keys() and effect != "runtime" and key != "seed"
    assert (key in defining_keys(agent_train.STAGE)) == defines
    runs = [compare.AgentRun(Path(f"run{i}"), c, np.zeros(2), np.zeros(1), np.zeros(1),
                             np.zeros(1), 1.0, None, True) for i, c in enumerate((base, other))]
    try:
        groups = compare.group_runs(runs)
    except UserError:  # runs of another env or scored otherwise: never pooled either
        groups = [compare.Group("a"), compare.Group("b")]
    assert (len(groups) == 2) == (defines or (key.startswith("env.") and effect != "runtime"))


def test_runtime_budget_and_output_examples() -> None:
    """The cases the issue found inconsistent, spelled out."""
    effects = config_effects()
    for key in ("collect.workers", "collect.commit_seconds", "env.vec_env", "agent.torch_threads",
                "agent.replay_buffer_max_mb", "data.loader_workers", "vae.device"):
        assert effects[key] == "runtime", key
    for key in ("collect.episodes", "vae.steps", "agent.timesteps"):
        assert effects[key] == "budget", key
    collect_spec = REGISTRY[0]
    assert "env.n_envs" not in collect_spec.keys()  # the agent's envs do not change the data
    assert "env.n_envs" not in train_vae.STAGE.keys()  # nor the VAE


def _fake_run(path: Path, kind: str) -> dict[str, bytes]:
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"kind": kind, "layout_version": 1,
                                               "status": "done"}))
    (path / "config.yaml").write_text(resolve_config(None).to_yaml())
    (path / "summary.json").write_text("{}")
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_a_foreign_kind_out_is_refused_and_left_alone(tmp_path: Path) -> None:
    agent_run = tmp_path / "agent"
    before = _fake_run(agent_run, "agent")
    with pytest.raises(UserError, match="holds an agent run, not a vae run"):
        train_vae.run(resolve_config(None), tmp_path / "no-data", agent_run)
    vae_run = tmp_path / "vae"
    before_vae = _fake_run(vae_run, "vae")
    with pytest.raises(UserError, match="holds a vae run, not an agent run"):
        agent_train.run(resolve_config(None, ["agent.obs_mode=pixel"]), vae_run)
    assert {p.name: p.read_bytes() for p in agent_run.iterdir()} == before
    assert {p.name: p.read_bytes() for p in vae_run.iterdir()} == before_vae


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with RunFolder.open(out, "agent", checkpoint="last.zip"):
        with pytest.raises(UserError, match=rf"another process \(pid {os.getpid()}"):
            agent_train.run(resolve_config(None, ["agent.obs_mode=pixel"]), out)
    assert not out.exists()  # the holder wrote nothing: its folder goes with it


def test_a_refused_run_leaves_no_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nothing to resume"):
        RunFolder.open(tmp_path / "new", "vae", resume=True, checkpoint="last.pt")
    assert not (tmp_path / "new").exists()


PIXEL_AGENT = [
    "env.image_size=36", "env.n_envs=2", "agent.obs_mode=pixel", "agent.timesteps=768",
    "agent.eval_every=128", "agent.eval_episodes=1", "env.max_episode_steps=20",
    "agent.hyperparams={n_steps: 64, batch_size: 64, n_epochs: 1}",
]


def _train_agent_cmd(out: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "worldmodel", "train-agent", "-o", str(out)]
    for item in (*PIXEL_AGENT, *extra):
        cmd += ["--set", item]
    return cmd


def _kill_when(cmd: list[str], ready: Any, timeout: float = 240) -> None:
    env = {**os.environ, "SDL_VIDEODRIVER": "dummy"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before the moment to kill it"
            assert time.time() < deadline
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["before-first-checkpoint", "after-a-checkpoint"])
def test_train_agent_killed_at_any_moment_restarts_with_the_same_command(
    tmp_path: Path, moment: str
) -> None:
    out = tmp_path / "run"
    every = "agent.checkpoint_every=100000" if moment.startswith("before") else \
        "agent.checkpoint_every=256"
    cmd = _train_agent_cmd(out, every)
    if moment.startswith("before"):  # the first evaluation wrote best_model.zip, no last.zip
        _kill_when(cmd, lambda: (out / "best_model.zip").exists())
        assert not (out / "last.zip").exists()
    else:
        _kill_when(cmd, lambda: (out / "last.zip").exists())
    env = {**os.environ, "SDL_VIDEODRIVER": "dummy"}
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    steps = [json.loads(line)["timesteps"]
             for line in (out / "evaluations.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 768  # each evaluation once
    assert json.loads((out / "summary.json").read_text())["timesteps"] == 768
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out))
    events.Reload()
    tb_steps = [e.step for e in events.Scalars("eval/mean_reward")]
    assert tb_steps == steps  # no TensorBoard step twice, none of the killed session's left


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_killing_the_pipeline_leaves_no_orphan_and_it_restarts(tmp_path: Path) -> None:
    from test_pipeline import TINY

    out = tmp_path / "pipe"
    args = [sys.executable, "-m", "worldmodel", "pipeline", "--out", str(out)]
    for item in (*TINY, "pipeline.parallel=2", "agent.timesteps=2048"):
        args += ["--set", item]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "SDL_VIDEODRIVER": "dummy"})
    workers: list[int] = []
    deadline = time.time() + 300
    while not list((out / "agents").glob("*/evaluations.jsonl")):  # agents are training
        assert proc.poll() is None and time.time() < deadline
        workers = _children(proc.pid) or workers
        time.sleep(0.1)
    workers = _children(proc.pid) or workers
    assert workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if Path(f"/proc/{w}").exists()], "orphaned workers"
    quiet = [sys.executable, "-m", "worldmodel", "-q", *args[3:]]  # -q reaches the workers
    result = subprocess.run(quiet, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "SDL_VIDEODRIVER": "dummy"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "report" / "report.md").is_file()
    assert " INFO " not in result.stderr, result.stderr[-2000:]
