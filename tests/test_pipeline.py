"""The pipeline end to end, as a user runs it: a subprocess on a tiny config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agents.train import agent_config
from worldmodel.config import resolve_config
from worldmodel.pipeline import plan

TINY = [
    "collect.episodes=4", "env.max_episode_steps=30", "env.n_envs=2",
    "vae.widths=[8,16,32,64]", "vae.latent_dim=8", "vae.steps=10", "vae.val_every=10",
    "agent.timesteps=256", "agent.eval_every=128", "agent.eval_episodes=2",
    "agent.hyperparams={n_steps: 64, batch_size: 64, n_epochs: 1}",
    "pipeline.obs_modes=[pixel,latent]", "pipeline.seeds=[0,1]", "pipeline.eval_episodes=2",
    "pipeline.parallel=1", "compare.random_episodes=4", "compare.bootstrap_reps=100",
]

# Enough VAE steps to be killed in the middle of, with cheap validations.
SLOW_VAE = ("vae.steps=60", "vae.val_every=10", "vae.val_frames=64", "vae.probe_frames=64")


def pipeline(out: Path, *extra: str, wait: bool = True) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "worldmodel", "pipeline", "--out", str(out)]
    for item in (*TINY, *extra):
        args += ["--set", item]
    env = {**os.environ, "SDL_VIDEODRIVER": "dummy"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


STAGE_OF = {"data": "collect", "vae": "train-vae", "report": "compare"}


def stamp(path: Path, stage: str | None = None) -> dict[str, object]:
    name = stage or STAGE_OF[path.name]
    return json.loads(path.with_name(f".{path.name}.{name}.done.json").read_text())


def test_end_to_end_then_cached_then_partial_rerun(tmp_path: Path) -> None:
    out = tmp_path / "pipe"
    first = pipeline(out)
    report = out / "report" / "report.md"
    assert first.stdout.strip().splitlines()[-1] == str(report)
    data = json.loads((out / "report" / "report.json").read_text())
    assert set(data["groups"]) == {"pixel", "latent"}
    for group in data["groups"].values():
        assert group["seeds"] == [0, 1] and len(group["scores"]) == 2
        point, low, high = group["IQM"]
        assert low <= point <= high
    assert len(data["random_baseline"]["returns"]) == 4
    assert data["vae"]["path"] == "../vae"  # relative to the report folder
    text = report.read_text()
    assert "| pixel | 2 (seeds 0, 1)" in text and "random policy" in text
    for agent in ("pixel__seed0", "pixel__seed1", "latent__seed0", "latent__seed1"):
        assert json.loads((out / "agents" / agent / "eval.json").read_text())["episodes"] == 2
    assert (out / "visualize" / "visualize.html").is_file()
    finished = {name: stamp(out / name)["finished"] for name in ("data", "vae", "report")}

    # Same config: every stage is skipped.
    second = pipeline(out)
    for name in ("collect", "train-vae", "compare", "visualize"):
        assert f"[pipeline] {name}: up to date, skipped" in second.stderr
    assert "train-agent: 0 to run, 4 up to date" in second.stderr
    assert {name: stamp(out / name)["finished"] for name in finished} == finished

    # Runtime settings rerun nothing (they were part of the collect key before).
    runtime = pipeline(out, "collect.workers=1", "collect.commit_seconds=0", "env.vec_env=subproc",
                       "agent.torch_threads=2", "data.loader_workers=0", "pipeline.parallel=2")
    assert "train-agent: 0 to run, 4 up to date" in runtime.stderr
    assert "[pipeline] collect: up to date, skipped" in runtime.stderr

    # A VAE setting changed: the VAE and the latent agents rerun; data and pixel agents do not.
    third = pipeline(out, "vae.lr=0.002")
    assert "[pipeline] collect: up to date, skipped" in third.stderr
    assert "[pipeline] train-vae: running" in third.stderr
    assert "train-agent: 2 to run, 2 up to date" in third.stderr
    assert (out / "vae.previous" / "summary.json").is_file()  # the old output is kept once
    assert stamp(out / "data")["finished"] == finished["data"]

    # A grown budget extends the VAE run instead of starting it over.
    fourth = pipeline(out, "vae.lr=0.002", "vae.steps=12")
    assert "[pipeline] train-vae: running" in fourth.stderr
    assert "resuming" in fourth.stderr
    assert json.loads((out / "vae" / "summary.json").read_text())["steps"] == 12


def _keys(cfg_items: list[str]) -> dict[str, str]:
    return {f"{r.stage} {r.folder}": r.key for r in plan(resolve_config(None, cfg_items))}


def test_agent_keys_follow_what_each_mode_reads() -> None:
    modes = "pipeline.obs_modes=[pixel,latent,random-encoder]"
    base = _keys([*TINY, modes])
    lr = _keys([*TINY, modes, "vae.lr=0.01"])  # the VAE's weights change
    width = _keys([*TINY, modes, "vae.latent_dim=4"])  # ... and its architecture
    for seed in (0, 1):
        pixel, latent, rand = (f"train-agent agents/{m}__seed{seed}"
                               for m in ("pixel", "latent", "random-encoder"))
        assert base[pixel] == lr[pixel] == width[pixel]  # pixel agents read no VAE
        assert base[latent] != lr[latent] and base[latent] != width[latent]
        assert base[rand] == lr[rand] != width[rand]  # only the architecture is borrowed
    cfg = resolve_config(None, TINY)
    assert agent_config(cfg, "pixel", 3).seed == 3 and cfg.seed == 0
    # logging cadence, devices and parallelism change no result: every key stays
    cosmetic = _keys([*TINY, modes, "vae.log_every=7", "data.loader_workers=3",
                      "agent.torch_threads=2", "collect.workers=1", "env.vec_env=subproc",
                      "agent.replay_buffer_max_mb=1", "pipeline.parallel=2"])
    assert cosmetic == base


def test_resume_after_a_killed_stage(tmp_path: Path) -> None:
    out = tmp_path / "pipe"
    args = [sys.executable, "-m", "worldmodel", "pipeline", "--out", str(out)]
    for item in (*TINY, *SLOW_VAE):
        args += ["--set", item]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "SDL_VIDEODRIVER": "dummy"})
    deadline = time.time() + 300
    while not (out / "vae" / "last.pt").exists():  # the VAE stage is under way
        assert proc.poll() is None and time.time() < deadline, "pipeline ended too early"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / ".vae.train-vae.done.json").exists()
    data_finished = stamp(out / "data")["finished"]

    result = pipeline(out, *SLOW_VAE)
    assert "[pipeline] collect: up to date, skipped" in result.stderr
    assert "[pipeline] train-vae: running" in result.stderr
    assert stamp(out / "data")["finished"] == data_finished
    summary = json.loads((out / "vae" / "summary.json").read_text())
    assert summary["steps"] == 60
    assert (out / "report" / "report.md").is_file()


@pytest.mark.parametrize("bad", ["pipeline.obs_modes=[]", "pipeline.parallel=0"])
def test_bad_pipeline_settings_are_one_line_errors(tmp_path: Path, bad: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worldmodel", "pipeline", "--out", str(tmp_path), "--set", bad],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and bad.split("=")[0] in result.stderr


def test_a_single_agent_run_reaches_compare_as_a_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from worldmodel import pipeline as pipeline_module

    cfg = resolve_config(None, [*TINY, "pipeline.obs_modes=[pixel]", "pipeline.seeds=[0]"])
    compare_run = next(r for r in plan(cfg) if r.stage == "compare")
    seen: dict[str, object] = {}
    real = pipeline_module.get_stage

    def record(cfg: object, out: Path, inputs: dict[str, object], resume: object) -> Path:
        seen.update(inputs)
        return out

    def fake(name: str) -> object:
        spec = real(name)
        return dataclasses.replace(spec, run=record) if name == "compare" else spec

    monkeypatch.setattr(pipeline_module, "get_stage", fake)
    pipeline_module.execute(str(tmp_path), compare_run)
    assert seen == {"evaluate": [tmp_path / "agents" / "pixel__seed0"]}
