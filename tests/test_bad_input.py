"""Bad input gives one line, a non-zero exit, and loses nothing already written (issue 14).

CLI cases call :func:`worldmodel.cli.main`, which returns the exit code and prints a
``UserError`` as ``worldmodel CMD: error: ...`` on stderr.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worldmodel.cli import main
from worldmodel.config import resolve_config
from worldmodel.errors import ConfigError, RunNotFoundError, UserError


def one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The single stderr line of a refused command, without its ``worldmodel CMD`` prefix."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    prefix = f"worldmodel {command}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0].removeprefix(prefix)


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# --------------------------------------------------------------------------------------------
# 1. config: not UTF-8, seeds out of range, env kwargs the env does not take


def test_config_file_not_utf8_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "latin1.yaml"
    config.write_bytes("vae:\n  latent_dim: 8  # größer\n".encode("latin-1"))
    assert main(["-q", "collect", "--config", str(config)]) == 2
    line = one_error_line(capsys, "collect")
    assert str(config) in line and "not a UTF-8 text file" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", [["collect"], ["train-vae", "--data", "DATA"],
                                     ["train-agent"], ["pipeline"]])
@pytest.mark.parametrize("setting", ["seed=99999999999999999999", "seed=4294967296",
                                     "pipeline.seeds=[0, 99999999999999999999]"])
def test_seed_out_of_range_is_refused_by_every_stage(
    command: list[str], setting: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["-q", *command, "--set", setting]) == 2
    line = one_error_line(capsys, command[0])
    assert line.startswith(setting.partition("=")[0] + ":"), line
    assert "2147483647" in line
    assert not (tmp_path / "runs").exists()


def test_largest_seed_is_accepted() -> None:
    from worldmodel.config import MAX_SEED, resolve_config

    assert resolve_config(None, [f"seed={MAX_SEED}"]).seed == MAX_SEED
    with pytest.raises(ConfigError, match="seed: input should be less than or equal"):
        resolve_config(None, [f"seed={MAX_SEED + 1}"])


def test_evaluate_seed_out_of_range_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-q", "evaluate", str(tmp_path), "--seed", "99999999999999999999"]) == 2
    line = one_error_line(capsys, "evaluate")
    assert line == "--seed must be between 0 and 2147483647, got 99999999999999999999"
    assert main(["-q", "evaluate", str(tmp_path), "--seed", "-1"]) == 2
    assert "--seed must be between" in one_error_line(capsys, "evaluate")


def test_unknown_env_kwarg_is_one_line_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "data"
    assert main(["-q", "collect", "--set", "env.kwargs.bogus=1", "--set", "env.image_size=16",
                 "--set", "collect.episodes=1", "--out", str(out)]) == 2
    line = one_error_line(capsys, "collect")
    assert line.startswith("env.kwargs.bogus: worldmodel/Reach-v0 takes no such keyword")
    assert "valid keys: size, " in line
    assert not out.exists()  # a refused collect leaves no folder, no lock file


def test_a_refused_collect_leaves_no_lock_in_a_folder_it_did_not_own(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    with pytest.raises(UserError, match="not a dataset"):
        from worldmodel import collect

        (out / "notes.txt").write_text("mine")
        collect.run(resolve_config(None, ["env.image_size=16", "collect.episodes=1"]), out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_collect_refuses_a_lower_episode_target_and_keeps_the_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from worldmodel import collect
    from worldmodel.dataset import open_dataset

    small = ["env.image_size=16", "env.max_episode_steps=10", "collect.workers=1"]
    out = collect.run(resolve_config(None, [*small, "collect.episodes=4"]), tmp_path / "d")
    assert main(["-q", "collect", "--out", str(out), "--set", "collect.episodes=2",
                 *(a for s in small for a in ("--set", s))]) == 2
    line = one_error_line(capsys, "collect")
    assert "already holds 4 committed episodes, more than collect.episodes=2" in line
    assert len(open_dataset(out).episode_ids) == 4
    assert json.loads((out / "manifest.json").read_text())["target"]["episodes"] == 4


def test_collect_into_a_run_of_another_kind_is_refused(tmp_path: Path) -> None:
    from worldmodel import collect

    run = tmp_path / "vae"
    run.mkdir()
    (run / "run.json").write_text('{"kind": "vae", "layout_version": 1, "status": "done"}')
    with pytest.raises(UserError, match="holds a vae run, not a dataset run"):
        collect.run(resolve_config(None, ["env.image_size=16", "collect.episodes=1"]), run)
    assert sorted(p.name for p in run.iterdir()) == ["run.json"]


def test_unknown_env_kwarg_from_the_api_is_an_env_config_error() -> None:
    from envs import EnvConfigError, make_env
    from envs.config import EnvConfig

    with pytest.raises(EnvConfigError, match=r"^env\.kwargs\.bogus: CartPole-v1 takes no such"):
        make_env(EnvConfig(id="CartPole-v1", image_size=16, kwargs={"bogus": 1}))
    env = make_env(EnvConfig(id="CartPole-v1", image_size=16, kwargs={"sutton_barto_reward": True}))
    env.close()


# --------------------------------------------------------------------------------------------
# 5. errors from the Python API are standard exceptions


def test_user_errors_are_value_errors_and_missing_runs_file_not_found(tmp_path: Path) -> None:
    from agents.compare import load_agent_run
    from worldmodel.config import resolve_config
    from worldmodel.vae import load_vae

    assert issubclass(UserError, ValueError)
    with pytest.raises(ValueError, match="seed"):
        resolve_config(None, ["seed=-1"])
    for call in (lambda: load_agent_run(tmp_path / "nope"),
                 lambda: load_vae(tmp_path / "nope"),
                 lambda: resolve_config(tmp_path / "nope.yaml")):
        with pytest.raises(FileNotFoundError, match="not found") as info:
            call()
        assert isinstance(info.value, RunNotFoundError)
        assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigError):  # a missing --config is still a ConfigError
        resolve_config(tmp_path / "nope.yaml")


def test_missing_run_is_still_one_cli_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-q", "compare", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "not found" in one_error_line(capsys, "compare")


# --------------------------------------------------------------------------------------------
# 2. compare: corrupt run files, --out naming a file, one run given twice


def agent_run(root: Path, name: str, seed: int) -> Path:
    """A finished agent run folder as ``train-agent`` + ``evaluate`` leave it (no training)."""
    import json

    from worldmodel.config import resolve_config

    path = root / name
    path.mkdir(parents=True)
    resolve_config(None, [f"seed={seed}", "env.max_episode_steps=20"]).save(path / "config.yaml")
    (path / "evaluations.jsonl").write_text("".join(
        json.dumps({"timesteps": 1000 * k, "wall_seconds": 2.0 * k, "returns": [k, k + seed]})
        + "\n" for k in (1, 2)))
    (path / "eval.json").write_text(json.dumps(
        {"returns": [1.0, 2.0 + seed], "seed": 1000 + seed, "timesteps": 2000,
         "deterministic": True}))
    (path / "summary.json").write_text(json.dumps({"steps_per_second": 100.0}))
    return path


@pytest.mark.parametrize(
    ("file", "content", "expected"),
    [
        ("eval.json", '{"returns": [1.0, 2', "is corrupt (not valid JSON"),
        ("eval.json", "[1.0, 2.0]", "is corrupt (expected a JSON object, got list)"),
        ("eval.json", '{"seed": 1, "timesteps": 2000}', "is corrupt (no 'returns')"),
        ("eval.json", '{"returns": "high", "timesteps": 2000}', "'returns' must be a non-empty"),
        ("eval.json", '{"returns": [], "timesteps": 2000}', "'returns' must be a non-empty"),
        ("eval.json", '{"returns": [1], "timesteps": "2000"}', "'timesteps' must be a number"),
        ("eval.json", '{"returns": [1], "deterministic": "yes"}', "'deterministic' must be"),
        ("summary.json", "\x00\x00", "is corrupt (not valid JSON"),
        ("summary.json", '{"steps_per_second": "fast"}', "'steps_per_second' must be a number"),
        ("evaluations.jsonl", '{"timesteps": 1000, "wall\n{"timesteps": 2000}\n',
         "line 1 is not valid JSON"),
        ("evaluations.jsonl", '{"timesteps": 1000, "returns": [1]}\n', "line 1 has no 'wall_"),
        ("evaluations.jsonl", '{"timesteps": 1000, "wall_seconds": 1, "returns": {"a": 1}}\n',
         "line 1: 'returns' must be a non-empty list"),
        ("evaluations.jsonl", '[1, 2]\n', "line 1 is not a JSON object"),
        ("vae.json", "{", "is corrupt (not valid JSON"),
    ],
)
def test_compare_names_the_corrupt_file_in_one_line(
    file: str, content: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [agent_run(tmp_path, "a", 0), agent_run(tmp_path, "b", 1)]
    (runs[1] / file).write_text(content)
    before = files_under(tmp_path)
    out = tmp_path / "report"
    assert main(["-q", "compare", *map(str, runs), "--out", str(out)]) == 2
    line = one_error_line(capsys, "compare")
    assert line.startswith(f"{runs[1] / file} is corrupt"), line
    assert expected in line
    assert files_under(tmp_path) == before and not out.exists()


def test_compare_ignores_a_torn_last_evaluation_line(tmp_path: Path) -> None:
    from agents.compare import load_agent_run

    run = agent_run(tmp_path, "a", 0)
    with open(run / "evaluations.jsonl", "a") as f:
        f.write('{"timesteps": 3000, "wall_sec')  # a write interrupted by a crash
    assert list(load_agent_run(run).steps) == [1000, 2000]


def test_compare_out_naming_a_file_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [agent_run(tmp_path, "a", 0), agent_run(tmp_path, "b", 1)]
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    before = files_under(tmp_path)
    assert main(["-q", "compare", *map(str, runs), "--out", str(notes)]) == 2
    line = one_error_line(capsys, "compare")
    assert line == f"--out {notes} is a file; pass a folder for the run"
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("how", ["same path", "other spelling", "copy"])
def test_compare_refuses_one_run_given_twice(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil

    monkeypatch.chdir(tmp_path)
    a = agent_run(tmp_path, "a", 0)
    b = agent_run(tmp_path, "b", 1)
    twin = {"same path": a, "other spelling": Path("a/../a/"),
            "copy": Path(shutil.copytree(a, tmp_path / "a-copy"))}[how]
    before = files_under(tmp_path)
    out = tmp_path / "report"
    assert main(["-q", "compare", str(a), str(b), str(twin), "--out", str(out)]) == 2
    line = one_error_line(capsys, "compare")
    what = ("copies (same config.yaml and identical evaluations)" if how == "copy"
            else "the same folder")
    assert line == (f"{a} and {twin} are {what} of one run, which would count as two seeds: "
                    "pass each run once")
    assert files_under(tmp_path) == before and not out.exists()


# --------------------------------------------------------------------------------------------
# 3. data verify: committed episodes against the target, arrays against the index


@pytest.mark.parametrize("keep", [0, 2])
def test_verify_fails_when_episode_index_lines_are_lost(
    keep: int, reach16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    data = Path(shutil.copytree(reach16, tmp_path / "data"))
    index = data / "shards" / "w0.episodes.jsonl"
    lines = index.read_text().splitlines(keepends=True)
    assert len(lines) == 4
    if keep:
        index.write_text("".join(lines[:keep]))
    else:
        index.unlink()
    before = files_under(data)
    assert main(["data", "verify", str(data)]) == 1
    out = capsys.readouterr().out.splitlines()
    missing = "0-3" if keep == 0 else "2-3"
    assert out[0].startswith(f"BAD episodes {missing} of the 4 requested are not committed "
                             f"({keep} are); shard w0 holds "), out
    assert "steps past its last committed episode: its episode index has lost episodes" in out[0]
    assert out[-1] == f"verify: 1 problem(s) in {data}"
    assert files_under(data) == before  # verify only reads


def test_verify_names_an_interrupted_collection_and_passes_a_complete_one(
    reach16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import shutil

    assert main(["data", "verify", str(reach16)]) == 0
    assert capsys.readouterr().out.startswith("verify: OK, 4 episodes")
    data = Path(shutil.copytree(reach16, tmp_path / "data"))
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["target"] = {"episodes": 6, "frames": None}  # as a killed `collect` of 6 leaves it
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert main(["data", "verify", str(data)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"BAD episodes 4-5 of the 6 requested are not committed (4 are); the "
                      "collection was interrupted or an episode index lost them; re-run "
                      f"`worldmodel collect --config {data}/config.yaml --out {data}` to "
                      "collect them again")


def test_verify_checks_frames_targets_and_array_lengths(
    reach16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import shutil

    import zarr

    from worldmodel.dataset import open_dataset

    data = Path(shutil.copytree(reach16, tmp_path / "data"))
    lengths = [e["length"] for e in open_dataset(data).episode_index()]
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["target"] = {"episodes": None, "frames": sum(lengths)}
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert main(["data", "verify", str(data)]) == 0
    manifest["target"]["frames"] = sum(lengths) + 1
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert main(["data", "verify", str(data)]) == 1
    assert f"BAD episodes 0-3 hold {sum(lengths)} of the {sum(lengths) + 1} frames" in (
        capsys.readouterr().out)
    manifest["target"]["frames"] = sum(lengths)
    (data / "manifest.json").write_text(json.dumps(manifest))
    zarr.open_array(str(data / "shards" / "w0.zarr" / "reward"), mode="a").resize((3,))
    assert main(["data", "verify", str(data)]) == 1
    out = capsys.readouterr().out
    assert f"BAD shard w0: reward holds 3 steps but its index commits {sum(lengths)}" in out


# --------------------------------------------------------------------------------------------
# 4. train-vae on a dataset of another env


def test_train_vae_refuses_a_dataset_of_another_env(
    reach16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import TINY

    out = tmp_path / "vae"
    sets = [a for s in [*TINY, "env.id=CarRacing-v3", "vae.steps=1"] for a in ("--set", s)]
    assert main(["-q", "train-vae", "--data", str(reach16), *sets, "--out", str(out)]) == 2
    line = one_error_line(capsys, "train-vae")
    assert line == (
        f"dataset {reach16} was collected with other env settings than this config (env.id: "
        "worldmodel/Reach-v0 in the dataset, CarRacing-v3 here): train on it with the dataset's "
        f"settings, --set env.id=worldmodel/Reach-v0 (or start from --config {reach16}/config.yaml)"
    )
    assert not out.exists()  # nothing written, so no config.yaml naming the wrong env
    assert main(["-q", "train-vae", "--data", str(reach16), *sets[:-4], "--set",
                 "env.kwargs={size: 16, step_size: 0.5}", "--set", "vae.steps=1", "--out",
                 str(out)]) == 2
    line = one_error_line(capsys, "train-vae")
    assert ('env.kwargs: {} in the dataset, {"size": 16, "step_size": 0.5} here): train on it '
            "with the dataset's settings, --set env.kwargs={}") in line
    assert not out.exists()


def test_a_failed_train_agent_leaves_no_empty_run_folder(tmp_path: Path) -> None:
    from agents import train

    cfg = resolve_config(None, ["agent.obs_mode=pixel", "env.image_size=36", "env.n_envs=1",
                                "agent.hyperparams={n_steps: 8, batch_size: 1}"])
    with pytest.raises(UserError, match="SB3 PPO rejected the settings"):
        train.run(cfg, tmp_path / "agent")
    assert not (tmp_path / "agent").exists()
