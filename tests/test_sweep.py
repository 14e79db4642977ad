"""``worldmodel sweep-temperature``: dream agents per temperature, dream vs real return."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import TINY, TINY_MEMORY

from agents import sweep, train
from worldmodel.cli import main
from worldmodel.config import Config, resolve_config
from worldmodel.errors import UserError
from worldmodel.io import read_json, read_jsonl

AGENT = [
    "env.n_envs=2", "env.max_episode_steps=12", "agent.timesteps=128", "agent.eval_every=64",
    "agent.eval_episodes=2", "agent.checkpoint_every=64", "agent.device=cpu",
    "agent.hyperparams={n_steps: 32, batch_size: 32, n_epochs: 1}",
    "pipeline.eval_episodes=3", "compare.random_episodes=4", "compare.bootstrap_reps=100",
]


def _cfg(*extra: str) -> Config:
    return resolve_config(None, [*TINY, *TINY_MEMORY, *AGENT, *extra])


def test_sweep_trains_per_tau_reports_dream_and_real_returns_and_resumes(
    reach16_memory: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vae, memory = reach16_memory
    out = tmp_path / "sweep"
    report = sweep.run(_cfg(), vae, memory, [0.5, 1.5], out, seeds=[0])
    assert report == out / "report"
    runs = {tau: out / f"tau-{tau}" / "seed-0" for tau in (0.5, 1.5)}
    for tau, path in runs.items():
        summary = read_json(path / "summary.json")
        assert summary["dream_tau"] == tau and summary["dream_env_steps"] == 128
        assert read_json(path / "eval.json")["episodes"] == 3  # pipeline.eval_episodes
    groups = read_json(report / "report.json")["groups"]
    assert sorted(g["tau"] for g in groups.values()) == [0.5, 1.5]
    for group in groups.values():
        path = runs[group["tau"]]
        assert group["runs"] == [f"../tau-{group['tau']}/seed-0"]
        # the real return is the final evaluation in the real env ...
        real = read_json(path / "eval.json")["mean_return"]
        assert group["scores"] == [pytest.approx(real)] and group["IQM"][0] == pytest.approx(real)
        # ... the dream return the agent's last training episodes in the dream
        logged = [r["rollout/ep_rew_mean"] for r in _csv(path / "progress.csv")
                  if r["rollout/ep_rew_mean"]]
        assert logged and group["dream_returns"] == [pytest.approx(float(logged[-1]))]
        assert group["dream_return"]["IQM"][0] == pytest.approx(float(logged[-1]))
    md = (report / "report.md").read_text()
    assert "| tau |" in md and "dream return IQM" in md
    for tau in (0.5, 1.5):
        assert f"| dream (memory.temperature={tau}) | 1 (seeds 0) | {tau} |" in md
    assert [line.split(":")[0] for line in sweep.table(read_json(report / "report.json"))] == [
        "tau 0.5", "tau 1.5"]

    # the same command again: nothing is trained or evaluated twice, the report is rewritten
    stamps = {p: (p / "last.zip").stat().st_mtime_ns for p in runs.values()}
    evals = {p: (p / "eval.json").stat().st_mtime_ns for p in runs.values()}

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train, "run", no_training)
    (runs[1.5] / "eval.json").unlink()  # ... but a missing evaluation is made again
    (report / "report.md").unlink()
    assert sweep.run(_cfg(), vae, memory, [0.5, 1.5], out, seeds=[0]) == report
    assert {p: (p / "last.zip").stat().st_mtime_ns for p in runs.values()} == stamps
    assert (runs[0.5] / "eval.json").stat().st_mtime_ns == evals[runs[0.5]]
    assert (runs[1.5] / "eval.json").is_file() and (report / "report.md").is_file()
    assert len(read_jsonl(runs[0.5] / "evaluations.jsonl")) == 2

    # other settings for a finished run: refused, not skipped
    with pytest.raises(UserError, match=r"agent\.algo: 'PPO' -> 'A2C'"):
        sweep.run(_cfg("agent.algo=A2C"), vae, memory, [0.5], out, seeds=[0])


def _csv(file: Path) -> list[dict[str, str]]:
    import csv

    with open(file, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(("taus", "message"), [
    ([1.0, 0.0], "temperatures must be > 0, got 0"),
    ([-0.5], "temperatures must be > 0, got -0.5"),
    ([float("nan")], "temperatures must be > 0, got nan"),
    ([1.0, 1.0], "--taus lists 1 twice"),
])
def test_bad_temperatures_are_one_line_and_write_nothing(
    taus: list[float], message: str, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match=message) as e:
        sweep.run(_cfg(), tmp_path / "vae", tmp_path / "memory", taus, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_non_positive_tau_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["-q", "sweep-temperature", "--vae", str(tmp_path / "vae"), "--memory",
                 str(tmp_path / "memory"), "--taus", "1.0", "-0.5", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == ("worldmodel sweep-temperature: error: --taus: temperatures must be > 0, "
                      "got -0.5")
    assert not (tmp_path / "o").exists()


def test_sweep_refuses_an_out_that_is_a_run(
    reach16_memory: tuple[Path, Path], tmp_path: Path
) -> None:
    vae, memory = reach16_memory
    with pytest.raises(UserError, match="holds a memory run"):
        sweep.run(_cfg(), vae, memory, [1.0], memory, seeds=[0])
