"""End to end, as a user would: ``worldmodel train-agent`` then ``worldmodel evaluate``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from agent_testing import agent_config, make_vae_run

from worldmodel.io import read_json


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SDL_VIDEODRIVER": "dummy"}
    return subprocess.run([sys.executable, "-m", "worldmodel", "-q", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_train_agent_then_evaluate(tmp_path: Path) -> None:
    vae = make_vae_run(tmp_path / "vae")
    agent_config("latent", timesteps=64).save(tmp_path / "agent.yaml")
    done = _cli("train-agent", "--config", "agent.yaml", "--vae", "vae", "--out", "run",
                "--set", "agent.latent=sample", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("run")
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["timesteps"] == 64 and summary["vae"]["path"] == str(vae.resolve())

    done = _cli("evaluate", "run", "--episodes", "3", "--video", "--deterministic", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = read_json(tmp_path / "run" / "eval.json")
    assert len(result["returns"]) == 3 and result["deterministic"] is True
    assert (tmp_path / "run" / "video.mp4").stat().st_size > 0

    again = _cli("train-agent", "--config", "agent.yaml", "--vae", "vae", "--out", "run",
                 cwd=tmp_path)
    assert again.returncode == 2 and "--resume" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_latent_without_vae_is_one_line(tmp_path: Path) -> None:
    agent_config("latent").save(tmp_path / "agent.yaml")
    done = _cli("train-agent", "--config", "agent.yaml", "--out", "run", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "worldmodel train-agent: error: agent.obs_mode=latent needs a trained VAE: pass --vae "
        "VAE_RUN (a train-vae run folder), or use obs_mode pixel or random-encoder"
    ]
