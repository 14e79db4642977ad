"""``worldmodel archive``: a finished run's small files, enough for ``compare`` to redo a report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agents import compare
from worldmodel.archive import MAX_BYTES, archive
from worldmodel.cli import main
from worldmodel.config import CompareConfig, resolve_config
from worldmodel.io import read_json

FAST = CompareConfig(random_episodes=4, bootstrap_reps=200)


def agent_run(path: Path, seed: int, final: list[float], status: str = "done") -> Path:
    """An agent run folder as train-agent and evaluate leave it, weights and events included."""
    path.mkdir(parents=True)
    cfg = resolve_config(None, ["agent.obs_mode=latent", f"seed={seed}",
                                "env.max_episode_steps=20"])
    cfg.save(path / "config.yaml")
    (path / "run.json").write_text(json.dumps({"kind": "agent", "status": status}))
    (path / "evaluations.jsonl").write_text("".join(
        json.dumps({"timesteps": 100 * k, "wall_seconds": float(k), "returns": [k - 2.0] * 2,
                    "lengths": [20, 20]}) + "\n" for k in (1, 2)))
    (path / "eval.json").write_text(json.dumps({"returns": final, "seed": 9, "timesteps": 200,
                                                "deterministic": True}))
    (path / "summary.json").write_text(json.dumps({"steps_per_second": 50.0}))
    (path / "vae.json").write_text(json.dumps({"kind": "vae", "weights_hash": "ab" * 32}))
    (path / "progress.csv").write_text("rollout/ep_rew_mean\n1.0\n")
    (path / "last.zip").write_bytes(b"weights")
    (path / "events.out.tfevents.1.vm.1.0").write_bytes(b"events")
    return path


def test_archive_keeps_finished_runs_small_files_and_compare_redoes_the_report(
        tmp_path: Path) -> None:
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "run.json").write_text(json.dumps({"kind": "pipeline", "status": "running"}))
    for seed, final in enumerate(([1.0, 2.0], [3.0, 4.0], [5.0, 7.0])):
        agent_run(pipe / "agents" / f"latent__seed{seed}", seed, final)
    agent_run(pipe / "agents" / "latent__seed3", 3, [0.0], status="running")
    vae = pipe / "vae"
    vae.mkdir()
    (vae / "run.json").write_text(json.dumps({"kind": "vae", "status": "done"}))
    (vae / "summary.json").write_text("{}")
    (vae / "best.pt").write_bytes(b"weights")
    (vae / "metrics.jsonl").write_bytes(b"x" * (MAX_BYTES + 1))  # too large to keep

    done = archive(pipe, tmp_path / "kept")

    kept = tmp_path / "kept"
    assert sorted(p.relative_to(pipe).as_posix() for p in done.runs) == [
        "agents/latent__seed0", "agents/latent__seed1", "agents/latent__seed2", "vae"]
    assert [p.relative_to(pipe).as_posix() for p in done.unfinished] == [
        ".", "agents/latent__seed3"]
    assert sorted(p.name for p in (kept / "agents" / "latent__seed0").iterdir()) == [
        "config.yaml", "eval.json", "evaluations.jsonl", "progress.csv", "run.json",
        "summary.json", "vae.json"]
    assert sorted(p.name for p in (kept / "vae").iterdir()) == ["run.json", "summary.json"]
    assert not (kept / "agents" / "latent__seed3").exists()
    assert not (kept / "run.json").exists()

    # the report from the copies is the report from the runs
    originals = sorted((pipe / "agents").glob("latent__seed[012]"))
    copies = sorted((kept / "agents").glob("latent__seed*"))
    a = read_json(compare.run(originals, tmp_path / "report-a", FAST) / "report.json")
    b = read_json(compare.run(copies, tmp_path / "report-b", FAST) / "report.json")
    (name,) = a["groups"]
    for key in ("scores", "IQM", "mean", "median", "timesteps"):
        assert a["groups"][name][key] == b["groups"][name][key], key
    assert np.isclose(a["groups"][name]["mean"][0], np.mean([1.5, 3.5, 6.0]))

    # re-running after another run finished adds it, replacing the older copies
    (pipe / "agents" / "latent__seed3" / "run.json").write_text(
        json.dumps({"kind": "agent", "status": "done"}))
    assert len(archive(pipe, kept).runs) == 5


@pytest.mark.parametrize("case", ["missing", "inside", "no-runs"])
def test_archive_bad_input_is_one_line(tmp_path: Path, case: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    if case != "missing":
        src.mkdir()
    out = src / "kept" if case == "inside" else tmp_path / "kept"
    assert main(["archive", str(src), "-o", str(out)]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("worldmodel archive: error: "), err
    assert not out.exists()
