from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worldmodel.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worldmodel", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_stage() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in (
        "collect", "train-vae", "train-agent", "evaluate", "visualize", "compare", "pipeline",
        "data",
    ):
        assert command in result.stdout


def test_console_script_matches_module() -> None:
    exe = Path(sys.executable).parent / "worldmodel"
    assert exe.exists(), "the worldmodel console script is missing: run `pip install -e .`"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "train-vae" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("collect", "--set", "collect.bogus_key=1"), "collect.bogus_key: unknown key"),
        (("train-vae", "--data", "x", "--set", "vae.lr=-1"), "vae.lr: input should be greater"),
        (("collect", "--config", "missing.yaml"), "config file 'missing.yaml' not found"),
        (("collect", "--set", "env.id=CarRacin-v3"), "did you mean CarRacing-v3"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(args: tuple[str, ...], expected: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [("train-vae", "--data", "DATA"), ("train-agent",)])
def test_resume_without_out_is_refused(
    args: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # a run started by mistake would land in ./runs
    assert main(["-q", *args, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"worldmodel {args[0]}: error: --resume needs --out RUN, the "
                   f"{'VAE' if args[0] == 'train-vae' else 'agent'} run folder to continue"]
    assert not (tmp_path / "runs").exists()
