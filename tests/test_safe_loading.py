"""Loading a run folder never executes code from it (issue 14).

Each test plants a payload (a pickle whose ``__reduce__`` creates a marker file) in one file the
project reads from a run folder, runs the command that reads it, and checks that the marker is
never created and that a refusal is one line.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from agent_testing import agent_config, make_vae_run

from agents import evaluate, train
from agents.encoders import load_encoder
from agents.hyperparams import parse_hyperparams
from agents.models import load_model
from agents.policy import make_policy
from envs import make_env
from worldmodel.cli import main
from worldmodel.config import load_run_config
from worldmodel.errors import ConfigError, UserError
from worldmodel.vae import load_checkpoint


class Payload:
    """Unpickling it creates ``marker`` (what any code could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def payload(marker: Path) -> bytes:
    data = pickle.dumps(Payload(marker))
    assert b"open" in data
    return data


def test_the_payload_is_live(marker: Path) -> None:
    """The probes mean something: unpickling the payload does create the marker."""
    pickle.loads(payload(marker))
    assert marker.exists()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PWNED"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny finished runs: PPO with reward normalisation, DQN (replay buffer), random-encoder."""
    root = tmp_path_factory.mktemp("runs")
    vae = make_vae_run(root / "vae")
    ppo = train.run(agent_config("latent", "PPO", "agent.normalize_reward=true", timesteps=64),
                    root / "ppo", vae=vae)
    dqn = train.run(agent_config("latent", "DQN", timesteps=64), root / "dqn", vae=vae)
    rnd = train.run(agent_config("random-encoder", "PPO", timesteps=64), root / "rnd", vae=vae)
    return {"vae": vae, "ppo": ppo, "dqn": dqn, "rnd": rnd}


def copy_run(runs: dict[str, Path], name: str, tmp_path: Path) -> Path:
    """A copy of a run (and of the VAE run it records, which moves with it)."""
    if not (tmp_path / "vae").exists():
        shutil.copytree(runs["vae"], tmp_path / "vae")
    out = tmp_path / name
    shutil.copytree(runs[name], out)
    record_path = out / "vae.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("path"):
            record["path"] = str((tmp_path / "vae").resolve())
            record["relpath"] = "../vae"
            record_path.write_text(json.dumps(record))
    return out


def one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(e.value)
    assert text and "\n" not in text, text
    return text


def rewrite_zip(path: Path, change: Callable[[str, bytes], bytes | None]) -> None:
    """Rewrite every member of the zip at ``path`` through ``change`` (None drops it)."""
    with zipfile.ZipFile(path) as archive:
        members = [(name, archive.read(name)) for name in archive.namelist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in members:
            new = change(name, data)
            if new is not None:
                archive.writestr(name, new)
    path.write_bytes(buf.getvalue())


def plant_serialized(path: Path, key: str, marker: Path) -> None:
    """Set ``data[key]`` of an SB3 zip to a ``:serialized:`` cloudpickle payload."""

    def change(name: str, data: bytes) -> bytes:
        if name != "data":
            return data
        entries = json.loads(data)
        entries[key] = {":type:": "<class 'builtins.object'>",
                        ":serialized:": base64.b64encode(payload(marker)).decode()}
        return json.dumps(entries).encode()

    rewrite_zip(path, change)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


# --- SB3 zips: last.zip, best_model.zip -------------------------------------------------------


@pytest.mark.parametrize("key", ["lr_schedule", "policy_class", "observation_space",
                                 "_last_obs", "ep_info_buffer", "clip_range", "policy_kwargs"])
def test_a_payload_in_an_entry_we_rebuild_is_never_unpickled(
    runs: dict[str, Path], tmp_path: Path, marker: Path, key: str
) -> None:
    run = copy_run(runs, "ppo", tmp_path)
    plant_serialized(run / "last.zip", key, marker)
    cfg = load_run_config(run)
    model = load_model(run, cfg, run / "last.zip")  # supplied from config.yaml instead
    assert model.num_timesteps == 64 and not marker.exists()
    assert model.lr_schedule(1.0) == pytest.approx(3e-4)


def test_evaluate_refuses_an_unknown_pickled_entry_in_last_zip(
    runs: dict[str, Path], tmp_path: Path, marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(runs, "ppo", tmp_path)
    plant_serialized(run / "last.zip", "evil", marker)
    with pytest.raises(UserError, match=r"pickled 'evil'.*refusing to unpickle") as e:
        evaluate.run(run, episodes=1)
    one_line(e)
    code, err = cli(capsys, "evaluate", str(run), "--episodes", "1")
    assert code != 0 and "refusing to unpickle" in err and err.count("\n") == 1
    assert not marker.exists() and not (run / "eval.json").exists()


def test_evaluate_best_refuses_a_payload_in_best_model_zip(
    runs: dict[str, Path], tmp_path: Path, marker: Path
) -> None:
    run = copy_run(runs, "ppo", tmp_path)
    plant_serialized(run / "best_model.zip", "evil", marker)
    with pytest.raises(UserError, match=r"best_model.zip") as e:
        evaluate.run(run, episodes=1, checkpoint="best")
    one_line(e)
    assert not marker.exists()


@pytest.mark.parametrize("key", ["env", "policy", "device"])
def test_entries_sb3_never_saves_are_refused(
    runs: dict[str, Path], tmp_path: Path, marker: Path, key: str
) -> None:
    run = copy_run(runs, "ppo", tmp_path)
    plant_serialized(run / "last.zip", key, marker)
    with pytest.raises(UserError, match=f"unexpected entry '{key}'") as e:
        load_model(run, load_run_config(run), run / "last.zip")
    one_line(e)
    assert not marker.exists()


def test_collect_agent_policy_refuses_a_payload(
    runs: dict[str, Path], tmp_path: Path, marker: Path
) -> None:
    run = copy_run(runs, "dqn", tmp_path)
    plant_serialized(run / "last.zip", "evil", marker)
    env = make_env(load_run_config(run).env)
    try:
        with pytest.raises(UserError, match=r"refusing to unpickle") as e:
            make_policy(f"agent:{run}", env, seed=0, epsilon=0.0)
    finally:
        env.close()
    one_line(e)
    assert not marker.exists()


def test_a_pickle_in_policy_pth_is_refused_by_weights_only(
    runs: dict[str, Path], tmp_path: Path, marker: Path
) -> None:
    run = copy_run(runs, "ppo", tmp_path)
    evil = io.BytesIO()
    torch.save({"x": Payload(marker)}, evil)
    rewrite_zip(run / "last.zip",
                lambda name, data: evil.getvalue() if name == "policy.pth" else data)
    with pytest.raises(UserError, match=r"cannot load the agent") as e:
        load_model(run, load_run_config(run), run / "last.zip")
    one_line(e)
    assert not marker.exists()


@pytest.mark.parametrize("member", ["policy.pth", "policy.optimizer.pth", "data"])
def test_a_truncated_member_of_last_zip_is_a_one_line_error(
    runs: dict[str, Path], tmp_path: Path, member: str
) -> None:
    run = copy_run(runs, "ppo", tmp_path)
    rewrite_zip(run / "last.zip",
                lambda name, data: data[: len(data) // 2] if name == member else data)
    with pytest.raises(UserError, match=r"last.zip") as e:
        evaluate.run(run, episodes=1)
    one_line(e)


def test_a_truncated_zip_is_a_one_line_error(runs: dict[str, Path], tmp_path: Path) -> None:
    run = copy_run(runs, "ppo", tmp_path)
    data = (run / "last.zip").read_bytes()
    (run / "last.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"last.zip") as e:
        load_model(run, load_run_config(run), run / "last.zip")
    one_line(e)


def test_sb3_reads_the_weights_with_weights_only() -> None:
    import inspect

    from stable_baselines3.common import save_util

    source = inspect.getsource(save_util.load_from_zip_file)
    assert source.count("th.load(") == source.count("weights_only=True") == 1


# --- reward statistics, replay buffer -----------------------------------------------------------


def resume(run: Path, timesteps: int = 128) -> Path:
    cfg = load_run_config(run)
    cfg.agent.timesteps = timesteps
    return train.run(cfg, run, resume=True)


@pytest.mark.parametrize("content", [b'{"format": "vecnormalize/1", "ret_rms": {"mean"',
                                     b"\x80\x04garbage", b'{"format": "vecnormalize/1"}',
                                     b'{"format": "vecnormalize/1", "ret_rms": {"mean": 0, '
                                     b'"var": -1, "count": 1}, "clip_obs": 10, '
                                     b'"clip_reward": 10, "gamma": 0.99, "epsilon": 1e-8}'])
def test_corrupt_reward_statistics_are_a_one_line_error_on_resume(
    runs: dict[str, Path], tmp_path: Path, content: bytes
) -> None:
    run = copy_run(runs, "ppo", tmp_path)
    (run / "vecnormalize.json").write_bytes(content)
    with pytest.raises(UserError, match=r"vecnormalize.json: unreadable reward statistics") as e:
        resume(run)
    one_line(e)


def test_a_pickled_vecnormalize_is_never_loaded(
    runs: dict[str, Path], tmp_path: Path, marker: Path
) -> None:
    run = copy_run(runs, "ppo", tmp_path)
    (run / "vecnormalize.json").unlink()
    (run / "vecnormalize.pkl").write_bytes(payload(marker))
    with pytest.raises(UserError, match=r"vecnormalize.pkl.*not loaded.*delete it") as e:
        resume(run)
    one_line(e)
    assert not marker.exists()


def test_a_pickle_in_the_replay_buffer_npz_is_refused(
    runs: dict[str, Path], tmp_path: Path, marker: Path
) -> None:
    run = copy_run(runs, "dqn", tmp_path)
    with np.load(run / "replay_buffer.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["observations"] = np.array([Payload(marker)], dtype=object)
    with open(run / "replay_buffer.npz", "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(UserError, match=r"replay_buffer.npz: unreadable replay buffer") as e:
        resume(run)
    one_line(e)
    assert not marker.exists()


def test_a_truncated_replay_buffer_is_a_one_line_error(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    run = copy_run(runs, "dqn", tmp_path)
    data = (run / "replay_buffer.npz").read_bytes()
    (run / "replay_buffer.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"replay_buffer.npz: unreadable replay buffer") as e:
        resume(run)
    one_line(e)


def test_a_pickled_replay_buffer_is_never_loaded(
    runs: dict[str, Path], tmp_path: Path, marker: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = copy_run(runs, "dqn", tmp_path)
    (run / "replay_buffer.npz").unlink()
    (run / "replay_buffer.pkl").write_bytes(payload(marker))
    with caplog.at_level(logging.WARNING, logger="worldmodel"):
        resume(run)
    assert "replay_buffer.pkl" in caplog.text and "empty replay buffer" in caplog.text
    assert not marker.exists() and (run / "replay_buffer.npz").is_file()


# --- torch checkpoints, YAML, JSON ------------------------------------------------------------


def plant_torch(path: Path, marker: Path) -> None:
    torch.save({"model": Payload(marker)}, path)


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_a_payload_in_a_vae_checkpoint_is_refused(
    runs: dict[str, Path], tmp_path: Path, marker: Path, name: str
) -> None:
    run = copy_run(runs, "ppo", tmp_path)
    plant_torch(tmp_path / "vae" / name, marker)
    with pytest.raises(UserError, match=r"not a readable checkpoint"):
        load_checkpoint(tmp_path / "vae" / name)
    if name == json.loads((run / "vae.json").read_text())["checkpoint"] + ".pt":
        with pytest.raises(UserError, match=r"not a readable checkpoint"):
            evaluate.run(run, episodes=1)
    assert not marker.exists()


def test_a_refused_vae_checkpoint_is_one_line(tmp_path: Path, marker: Path) -> None:
    plant_torch(tmp_path / "best.pt", marker)
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path / "best.pt")
    assert not marker.exists()
    one_line(e)


def test_a_payload_in_random_encoder_pt_is_refused(
    runs: dict[str, Path], tmp_path: Path, marker: Path
) -> None:
    run = copy_run(runs, "rnd", tmp_path)
    plant_torch(run / "random_encoder.pt", marker)
    with pytest.raises(UserError, match=r"random_encoder.pt: not a readable checkpoint"):
        load_encoder(run, load_run_config(run))
    assert not marker.exists()


def test_project_checkpoints_are_read_with_weights_only() -> None:
    import inspect

    import worldmodel.vae

    source = inspect.getsource(worldmodel.vae.load_checkpoint)
    assert "weights_only=True" in source


def test_a_python_tag_in_config_yaml_is_refused(
    runs: dict[str, Path], tmp_path: Path, marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(runs, "ppo", tmp_path)
    text = (run / "config.yaml").read_text()
    tag = f"!!python/object/apply:builtins.open [{str(marker)!r}, w]"
    (run / "config.yaml").write_text(text.replace("seed: 0", f"seed: {tag}", 1))
    assert tag in (run / "config.yaml").read_text()
    with pytest.raises(ConfigError) as e:
        load_run_config(run)
    one_line(e)
    code, err = cli(capsys, "evaluate", str(run), "--episodes", "1")
    assert code != 0 and err.count("\n") == 1
    assert not marker.exists()


@pytest.mark.parametrize("name", ["this:X", "os:system", "os.system", "builtins.open",
                                  "torch.nn.Module", "subprocess.Popen"])
def test_class_names_in_hyperparams_come_from_an_allow_list(name: str) -> None:
    from stable_baselines3 import PPO

    with pytest.raises(ConfigError, match=r"unknown class .*; allowed: ReLU,.*GELU") as e:
        parse_hyperparams({"policy_kwargs": {"activation_fn": name}}, PPO)
    one_line(e)


def test_a_config_yaml_hyperparam_naming_a_module_is_refused_before_import(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    sys.modules.pop("this", None)
    run = copy_run(runs, "ppo", tmp_path)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(
        text.replace("hyperparams:", "hyperparams:\n    policy_kwargs: {activation_fn: 'this:X'}",
                     1))
    with pytest.raises(UserError, match=r"unknown class 'this:X'") as e:
        load_model(run, load_run_config(run), run / "last.zip")
    one_line(e)
    assert "this" not in sys.modules


def test_json_files_are_data_only(runs: dict[str, Path], tmp_path: Path, marker: Path) -> None:
    """A ``:serialized:`` or ``py/object`` entry in the run's JSON files stays plain data."""
    run = copy_run(runs, "ppo", tmp_path)
    record = json.loads((run / "vae.json").read_text())
    evil = {":serialized:": base64.b64encode(payload(marker)).decode(), "py/object": "os.system"}
    (run / "vae.json").write_text(json.dumps({**record, "evil": evil}))
    state = json.loads((run / "train_state.json").read_text())
    (run / "train_state.json").write_text(json.dumps({**state, "evil": evil}))
    evaluate.run(run, episodes=1)
    (run / "vae.json").write_text(json.dumps({**record, "latent_dim": evil}))
    with pytest.raises(UserError) as e:
        load_model(run, load_run_config(run), run / "last.zip")
    one_line(e)
    assert not marker.exists()
