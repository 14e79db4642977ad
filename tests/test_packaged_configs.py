"""Named configs inside the package: `--config quickstart` works without a clone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from worldmodel.cli import main
from worldmodel.config import packaged_configs, resolve_config
from worldmodel.errors import ConfigNotFoundError

ROOT = Path(__file__).resolve().parents[1]


def test_packaged_configs_are_the_repository_configs() -> None:
    repo = {p.name: p.read_bytes() for p in (ROOT / "configs").glob("*.yaml")}
    packaged = {p.name: p.read_bytes() for p in packaged_configs().values()}
    assert packaged == repo, (
        "worldmodel/configs/ drifted from configs/: copy them again with "
        "`cp configs/*.yaml worldmodel/configs/`"
    )


def test_a_bare_name_is_the_packaged_config_and_a_path_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert resolve_config("quickstart") == resolve_config(ROOT / "configs" / "quickstart.yaml")
    assert resolve_config("breakout").env.id == "ALE/Breakout-v5"  # extends pong.yaml
    (tmp_path / "quickstart").write_text("seed: 7\n")  # a file of that name wins
    assert resolve_config("quickstart").seed == 7
    with pytest.raises(ConfigNotFoundError, match="neither a file nor a packaged config"):
        resolve_config("nope")


def test_configs_lists_and_shows(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(packaged_configs())
    assert any(line.startswith("carracing") and "World Models" in line for line in lines)
    assert main(["configs", "show", "quickstart"]) == 0
    assert capsys.readouterr().out == (ROOT / "configs" / "quickstart.yaml").read_text()
    assert main(["configs", "show"]) == 2
    assert "needs a NAME" in capsys.readouterr().err


TINY = [
    "collect.episodes=4", "collect.workers=1", "env.max_episode_steps=30", "env.n_envs=2",
    "vae.steps=10", "vae.val_every=10", "vae.probe_frames=64", "vae.val_frames=64",
    "agent.timesteps=256", "agent.eval_every=128", "agent.eval_episodes=2",
    "agent.hyperparams={n_steps: 64, batch_size: 64, n_epochs: 1}",
    "pipeline.obs_modes=[pixel,latent]", "pipeline.seeds=[0]", "pipeline.eval_episodes=2",
    "pipeline.parallel=1", "pipeline.visualize=false", "compare.random_episodes=2",
    "compare.bootstrap_reps=100",
]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="builds the wheel from a git checkout")
def test_the_wheel_runs_the_quickstart_outside_the_repository(tmp_path: Path) -> None:
    """Build the wheel, install it into a fresh venv, run the quickstart from an empty folder.

    The fresh venv sees the test venv's packages (a ``.pth`` file) so nothing is downloaded;
    the project itself comes only from the wheel, and the repository is not on the path.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["SDL_VIDEODRIVER"] = "dummy"
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist), str(ROOT)], check=True, env=env, timeout=300)
    (wheel,) = dist.glob("worldmodel-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True).stdout
    ours = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True).stdout
    # the test venv's dependencies, minus its editable link to the repository
    Path(site.strip(), "deps.pth").write_text(ours.strip() + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    site.strip(), str(wheel)], check=True, env=env, timeout=300)
    work = tmp_path / "empty"
    work.mkdir()
    probe = subprocess.run(
        [str(python), "-c", "import worldmodel, sys; print(worldmodel.__file__)"],
        capture_output=True, text=True, cwd=work, env=env, check=True)
    assert str(ROOT) not in probe.stdout, "the project was imported from the repository"
    args = [str(python), "-m", "worldmodel", "-q", "pipeline", "--config", "quickstart",
            "--out", "run"]
    for item in TINY:
        args += ["--set", item]
    result = subprocess.run(args, capture_output=True, text=True, cwd=work, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (work / "run" / "report" / "report.md").is_file()
