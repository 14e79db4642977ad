"""What the stages write to a log file: bounded progress lines, nothing with ``-q``, hparams.

Output redirected to a file (CI, ``nohup``, a cluster job) gets no progress bars: a plain
progress line at most every ``WORLDMODEL_PROGRESS_SECONDS`` instead, and one line per periodic
evaluation of an agent. Agent runs write TensorBoard hparams, so its HParams view compares arms
and seeds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from worldmodel import utils
from worldmodel.utils import LogProgress, progress

TINY_COLLECT = ["env.image_size=16", "collect.episodes=4", "collect.workers=1",
                "collect.max_episode_steps=30"]
TINY_VAE = ["env.image_size=16", "vae.widths=[8, 16]", "vae.latent_dim=4", "vae.steps=60",
            "vae.batch_size=16"]
#: tests/test_contract.py's tiny pixel agent.
PIXEL_AGENT = [
    "env.image_size=36", "env.n_envs=2", "agent.obs_mode=pixel", "agent.timesteps=768",
    "agent.eval_every=128", "agent.eval_episodes=1", "env.max_episode_steps=20",
    "agent.hyperparams={n_steps: 64, batch_size: 64, n_epochs: 1}",
]
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|DEBUG|ERROR) ")


def _worldmodel(*args: str, sets: list[str]) -> subprocess.CompletedProcess[str]:
    """``python -m worldmodel ARGS --set ...`` with stdout and stderr to pipes (no terminal)."""
    cmd = [sys.executable, "-m", "worldmodel", *args]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "SDL_VIDEODRIVER": "dummy"}
    env.pop("WORLDMODEL_PROGRESS_SECONDS", None)  # the default: a line every 30 s at most
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return done


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_log_progress_writes_a_line_at_most_every_n_seconds(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="worldmodel")
    with LogProgress(480, 0, "train-vae", "step", every=30, clock=clock) as bar:
        for _ in range(480):
            clock.now += 0.25  # 4 steps/s: 120 s in all
            bar.update()
            bar.set_postfix(loss="15.1", kl="0.1")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines  # at 30, 60, 90 and 120 s; close repeats no line
    assert lines[0] == "train-vae: 120/480 steps (25%), 4.0 step/s, loss=15.1, kl=0.1"
    assert lines[-1] == "train-vae: 480/480 steps (100%), 4.0 step/s, loss=15.1, kl=0.1"


def test_log_progress_close_writes_the_final_count_and_resumes_count_from_initial(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="worldmodel")
    bar = LogProgress(100, 40, "collect", "ep", every=30, clock=clock)
    clock.now += 4
    bar.update(20)
    assert not caplog.records  # 4 s < 30 s
    bar.close()
    bar.close()
    assert [r.getMessage() for r in caplog.records] == ["collect: 60/100 eps (60%), 5.0 ep/s"]


def test_log_progress_disabled_and_untouched_write_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="worldmodel")
    off = LogProgress(10, 0, "x", enabled=False, every=0, clock=clock)
    clock.now += 60
    off.update(10)
    off.close()
    LogProgress(10, 10, "resumed, nothing to do", clock=clock).close()
    assert not caplog.records


def test_progress_seconds_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLDMODEL_PROGRESS_SECONDS", "5")
    assert utils.progress_seconds() == 5.0
    monkeypatch.setenv("WORLDMODEL_PROGRESS_SECONDS", "often")
    assert utils.progress_seconds() == utils.PROGRESS_SECONDS
    monkeypatch.delenv("WORLDMODEL_PROGRESS_SECONDS")
    assert utils.progress_seconds() == utils.PROGRESS_SECONDS


def test_bars_only_on_a_terminal_at_info_level(monkeypatch: pytest.MonkeyPatch) -> None:
    from tqdm import tqdm

    logger = logging.getLogger("worldmodel")
    monkeypatch.setattr(logger, "level", logging.INFO)
    monkeypatch.setattr(utils, "_stderr_is_tty", lambda: False)
    assert not utils.progress_enabled()
    shown = progress(10, 0, "x")
    assert isinstance(shown, LogProgress) and shown.enabled
    monkeypatch.setattr(utils, "_stderr_is_tty", lambda: True)
    assert utils.progress_enabled()
    bar = progress(10, 0, "x")
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setattr(logger, "level", logging.WARNING)  # -q
    assert not utils.progress_enabled()
    quiet = progress(10, 0, "x")
    assert isinstance(quiet, LogProgress) and not quiet.enabled


def _progress_lines(stderr: str, desc: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.search(rf"INFO {desc}: \d+/\d+ ", line)]


@pytest.mark.slow
def test_collect_and_train_vae_to_a_file_write_few_progress_lines(tmp_path: Path) -> None:
    data, vae = tmp_path / "data", tmp_path / "vae"
    collect = _worldmodel("collect", "--out", str(data), sets=TINY_COLLECT)
    train = _worldmodel("train-vae", "--data", str(data), "--out", str(vae), sets=TINY_VAE)
    for done, desc, path in ((collect, "collect", data), (train, "train-vae", vae)):
        assert "\r" not in done.stderr  # no bar redrawn in place
        assert all(LOG_LINE.match(line) for line in done.stderr.splitlines()), done.stderr
        assert 1 <= len(_progress_lines(done.stderr, desc)) <= 3, done.stderr
        assert done.stdout == f"{path}\n"
    assert "train-vae: 60/60 steps (100%)" in train.stderr

    # -q: nothing but the run folder on stdout, and warnings (a tiny VAE has some) on stderr
    quiet_data, quiet_vae = tmp_path / "quiet_data", tmp_path / "quiet_vae"
    collect = _worldmodel("-q", "collect", "--out", str(quiet_data), sets=TINY_COLLECT)
    assert (collect.stdout, collect.stderr) == (f"{quiet_data}\n", "")
    train = _worldmodel("-q", "train-vae", "--data", str(quiet_data), "--out", str(quiet_vae),
                        sets=TINY_VAE)
    assert train.stdout == f"{quiet_vae}\n"
    assert all(" WARNING " in line for line in train.stderr.splitlines()), train.stderr


@pytest.mark.slow
def test_train_agent_to_a_file_logs_evaluations_and_writes_hparams(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    out = tmp_path / "agent"
    done = _worldmodel("train-agent", "-o", str(out), sets=PIXEL_AGENT)
    assert done.stdout == f"{out}\n"  # no SB3 tables
    assert "\r" not in done.stderr
    evals = [line for line in done.stderr.splitlines() if "INFO eval at " in line]
    assert len(evals) == 768 // 128, done.stderr
    assert re.search(r"eval at 768 env steps: mean return -?\d+\.\d\d \(std", evals[-1])
    assert len(done.stderr.splitlines()) <= len(evals) + 5, done.stderr

    events = EventAccumulator(str(out))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content[metadata.SESSION_START_INFO_TAG]).session_start_info
    hparams = dict(start.hparams)
    assert hparams["obs_mode"].string_value == "pixel"
    assert hparams["seed"].number_value == 0
    assert hparams["algo"].string_value == "PPO"
    assert hparams["env.image_size"].number_value == 36
    assert "n_steps" in hparams["agent.hyperparams"].string_value
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content[metadata.EXPERIMENT_TAG]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["hparam/final_mean_return"]
    final = [e.value for e in events.Scalars("hparam/final_mean_return")]
    summary = json.loads((out / "summary.json").read_text())
    assert final == [pytest.approx(summary["final_eval"]["mean_return"])]
    assert len(list(out.glob("events.*"))) == 2  # SB3's and the hparams', both in the run folder
