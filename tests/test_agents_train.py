"""train-agent: every algorithm in every obs mode, run folder contents, resume, clear errors."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from agent_testing import PIXEL_SIZE, SIZE, agent_config, make_vae_run
from stable_baselines3.common.vec_env import VecNormalize

from agents import train
from agents.encoders import load_encoder
from agents.extractor import vae_extractors
from agents.models import algo_class, load_model
from agents.wrapping import find_wrapper, make_agent_env
from worldmodel.errors import UserError
from worldmodel.io import read_json, read_jsonl
from worldmodel.vae import load_vae

Z = 6
MODES = ["pixel", "latent", "latent-finetune", "random-encoder"]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_vae_run(tmp_path_factory.mktemp("vae") / "run")


@pytest.mark.parametrize("algo", ["PPO", "A2C", "SAC", "TD3", "DQN"])
@pytest.mark.parametrize("mode", MODES)
def test_each_algo_trains_in_each_obs_mode(
    algo: str, mode: str, vae_run: Path, tmp_path: Path
) -> None:
    cfg = agent_config(mode, algo, timesteps=192)
    out = train.run(cfg, tmp_path / "run", vae=None if mode == "pixel" else vae_run)
    summary = read_json(out / "summary.json")
    assert summary["timesteps"] >= 192 and summary["obs_mode"] == mode
    assert summary["steps_per_second"] > 0 and summary["wall_seconds"] > 0
    records = read_jsonl(out / "evaluations.jsonl")
    assert records[0]["timesteps"] >= 64 and len(records[-1]["returns"]) == 2
    assert records[-1]["timesteps"] == summary["timesteps"]
    seconds = [r["wall_seconds"] for r in records]
    assert seconds == sorted(seconds) and all(s > 0 for s in seconds)
    for name in ("config.yaml", "last.zip", "best_model.zip", "train_state.json", "progress.csv"):
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*"))
    model = load_model(out, cfg, out / "last.zip")
    space = model.observation_space.shape
    if mode in ("latent", "random-encoder"):
        assert space == (2 * Z,)
    else:
        size = PIXEL_SIZE if mode == "pixel" else SIZE
        assert space == (6, size, size)  # two stacked RGB frames, channels first
    assert (out / "vae.json").is_file() == (mode != "pixel")
    if algo in ("SAC", "TD3", "DQN"):
        assert (out / "replay_buffer.npz").is_file() and not (out / "replay_buffer.pkl").exists()


def test_finetune_trains_the_encoder_and_latent_mode_leaves_the_vae_alone(
    vae_run: Path, tmp_path: Path
) -> None:
    vae_state = load_vae(vae_run).model.state_dict()
    cfg = agent_config("latent-finetune", timesteps=128,
                       hyperparams={"n_steps": 32, "batch_size": 32, "n_epochs": 2,
                                    "learning_rate": 1e-3})
    out = train.run(cfg, tmp_path / "ft", vae=vae_run)
    (extractor,) = vae_extractors(load_model(out, cfg, out / "last.zip").policy)
    changed = [name for name, t in extractor.state_dict().items()
               if not torch.allclose(t, vae_state[name])]
    assert {"encoder.0.weight", "fc_mu.weight"} <= set(changed)

    record = read_json(out / "vae.json")
    assert record["weights_hash"] == load_vae(vae_run).weights_hash
    out = train.run(agent_config("latent", timesteps=128), tmp_path / "lat", vae=vae_run)
    assert load_vae(vae_run).weights_hash == record["weights_hash"]  # frozen VAE untouched
    assert read_json(out / "vae.json")["path"] == str(vae_run.resolve())


def test_resume_continues_the_step_count(vae_run: Path, tmp_path: Path) -> None:
    out = train.run(agent_config("latent", timesteps=128), tmp_path / "run", vae=vae_run)
    first = read_json(out / "summary.json")
    assert first["timesteps"] == 128
    with pytest.raises(UserError, match="pass --resume"):
        train.run(agent_config("latent", timesteps=256), out, vae=vae_run)
    train.run(agent_config("latent", timesteps=256), out, vae=vae_run, resume=True)
    second = read_json(out / "summary.json")
    assert second["timesteps"] == 256
    assert second["wall_seconds"] > first["wall_seconds"]
    steps = [r["timesteps"] for r in read_jsonl(out / "evaluations.jsonl")]
    assert steps == [64, 128, 192, 256]
    assert (out / "progress_1.csv").is_file()  # the first session's CSV is kept
    assert load_model(out, agent_config("latent"), out / "last.zip").num_timesteps == 256
    with pytest.raises(UserError, match=r"differ from .*agent.history"):
        train.run(agent_config("latent", "PPO", "agent.history=3", timesteps=384), out,
                  vae=vae_run, resume=True)
    with pytest.raises(UserError, match="nothing to resume"):
        train.run(agent_config("latent"), tmp_path / "empty", vae=vae_run, resume=True)


def test_one_seed_one_result(vae_run: Path, tmp_path: Path) -> None:
    a = train.run(agent_config("random-encoder"), tmp_path / "a", vae=vae_run)
    b = train.run(agent_config("random-encoder"), tmp_path / "b", vae=vae_run)
    c = train.run(agent_config("random-encoder", "PPO", "seed=1"), tmp_path / "c", vae=vae_run)
    ra, rb = (read_jsonl(p / "evaluations.jsonl") for p in (a, b))
    assert [r["returns"] for r in ra] == [r["returns"] for r in rb]
    va, vb, vc = (read_json(p / "vae.json") for p in (a, b, c))
    assert va["weights_hash"] == vb["weights_hash"] != vc["weights_hash"]
    assert va["weights_hash"] != load_vae(vae_run).weights_hash  # untrained, not the VAE's
    assert va["kind"] == "random" and va["latent_dim"] == Z  # architecture of the --vae run


def test_random_encoder_without_vae_uses_cfg_vae(tmp_path: Path) -> None:
    cfg = agent_config("random-encoder", "PPO", "vae.latent_dim=3")
    out = train.run(cfg, tmp_path / "run")
    assert load_model(out, cfg, out / "last.zip").observation_space.shape == (6,)
    assert read_json(out / "vae.json")["architecture_from"] is None


def test_clear_errors(vae_run: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="needs a trained VAE: pass --vae"):
        train.run(agent_config("latent"), tmp_path / "a")
    with pytest.raises(UserError, match="needs a trained VAE"):
        train.run(agent_config("latent-finetune"), tmp_path / "b")
    with pytest.raises(UserError, match=r"takes 32x32x3 frames .* gives 64x64x3"):
        train.run(agent_config("latent", size=64), tmp_path / "c", vae=vae_run)
    with pytest.raises(UserError, match=r"env\.grayscale=false"):
        train.run(agent_config("latent", "PPO", "env.grayscale=true"), tmp_path / "d",
                  vae=vae_run)
    with pytest.raises(UserError, match="SAC needs continuous"):
        cfg = agent_config("latent", "SAC", "env.kwargs.continuous=false")
        train.run(cfg, tmp_path / "e", vae=vae_run)
    with pytest.raises(UserError, match="DQN needs discrete"):
        cfg = agent_config("latent", "DQN", "env.kwargs.continuous=true")
        train.run(cfg, tmp_path / "f", vae=vae_run)
    with pytest.raises(UserError, match="n_stepz: unknown PPO argument"):
        train.run(agent_config("latent", hyperparams={"n_stepz": 3}), tmp_path / "g",
                  vae=vae_run)
    with pytest.raises(UserError, match="rejected the settings"):
        train.run(agent_config("latent", hyperparams={"n_steps": 32, "use_sde": True}),
                  tmp_path / "h", vae=vae_run)
    with pytest.raises(UserError, match=r"32x32 frames .*raise env\.image_size to >= 36 "
                       r".*features_extractor_class"):
        train.run(agent_config("pixel", size=32), tmp_path / "i")


def test_other_preprocessing_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vae = make_vae_run(tmp_path / "vae", "env.frame_skip=2")
    with caplog.at_level(logging.WARNING, logger="worldmodel"):
        train.run(agent_config("latent", timesteps=64), tmp_path / "run", vae=vae)
    assert "frame_skip: 2 vs 1" in caplog.text


def test_normalize_reward_saves_its_statistics(vae_run: Path, tmp_path: Path) -> None:
    cfg = agent_config("latent", "PPO", "agent.normalize_reward=true")
    out = train.run(cfg, tmp_path / "run", vae=vae_run)
    assert (out / "vecnormalize.json").is_file() and not (out / "vecnormalize.pkl").exists()
    stats = read_json(out / "vecnormalize.json")
    assert stats["ret_rms"]["count"] > 1 and stats["gamma"] == 0.99
    returns = read_jsonl(out / "evaluations.jsonl")[-1]["returns"]
    assert all(-20 * 0.05 * np.sqrt(2) - 1e-6 <= r <= 1.0 for r in returns)  # raw env returns
    assert algo_class("PPO").__name__ == "PPO"
    env = make_agent_env(cfg, load_encoder(out, cfg), n_envs=2, seed=0,
                         normalize_from=out / "vecnormalize.json")
    try:
        restored = find_wrapper(env, VecNormalize)
        assert restored.ret_rms.var == pytest.approx(stats["ret_rms"]["var"])
        assert restored.ret_rms.count == stats["ret_rms"]["count"] and restored.norm_reward
    finally:
        env.close()
    train.run(agent_config("latent", "PPO", "agent.normalize_reward=true", timesteps=192), out,
              vae=vae_run, resume=True)
    assert read_json(out / "vecnormalize.json")["ret_rms"]["count"] > stats["ret_rms"]["count"]


def test_off_policy_resume_restores_the_replay_buffer(vae_run: Path, tmp_path: Path) -> None:
    cfg = agent_config("latent", "DQN", timesteps=64)
    out = train.run(cfg, tmp_path / "run", vae=vae_run)
    with np.load(out / "replay_buffer.npz", allow_pickle=False) as npz:
        saved = {k: npz[k] for k in npz.files}
    model = load_model(out, cfg, out / "last.zip")
    train.load_replay_buffer(model, out / "replay_buffer.npz")
    buffer = model.replay_buffer  # type: ignore[attr-defined]
    assert buffer.pos == 32 and not buffer.full  # 64 steps in 2 envs
    np.testing.assert_array_equal(buffer.observations, saved["observations"])
    np.testing.assert_array_equal(buffer.actions, saved["actions"])
    train.run(agent_config("latent", "DQN", timesteps=128), out, vae=vae_run, resume=True)
    with np.load(out / "replay_buffer.npz", allow_pickle=False) as npz:
        assert npz["observations"][:32].tolist() == saved["observations"][:32].tolist()


def test_clock_excludes_pauses_and_never_goes_back() -> None:
    clock = train.Clock(seconds=10.0, elapsed=12.0)
    readings = [clock.seconds]
    with clock.paused():
        time.sleep(0.05)
        readings.append(clock.seconds)
        with clock.paused():
            time.sleep(0.02)
        readings.append(clock.seconds)
    readings.append(clock.seconds)
    assert readings == sorted(readings)
    assert readings[-1] - 10.0 < 0.05 and clock.elapsed - 12.0 >= 0.07


def test_fresh_run_drops_records_of_a_run_that_died_before_its_checkpoint(
    vae_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "evaluations.jsonl").write_text('{"timesteps": 999, "returns": [1.0]}\n')
    train.run(agent_config("latent", timesteps=64), out, vae=vae_run)
    assert [r["timesteps"] for r in read_jsonl(out / "evaluations.jsonl")] == [64]


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("algo", ["PPO", "A2C"])
def test_on_policy_checkpoints_count_only_trained_steps(
    algo: str, interrupt: type[BaseException], vae_run: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crash (or Ctrl-C) mid-run, then --resume: no env step is lost or counted twice."""
    cfg = agent_config("latent", algo, timesteps=256)
    rollout = cfg.agent.hyperparams["n_steps"] * cfg.env.n_envs  # PPO 64, A2C 16
    epochs = cfg.agent.hyperparams.get("n_epochs", 1)  # PPO's _n_updates counts epochs
    cls = algo_class(algo)
    original = cls.train
    crash_at = 64 + 2 * rollout  # in the update on the rollout that ends here

    def train_or_crash(self: Any) -> None:
        if self.num_timesteps == crash_at:
            raise interrupt("crash")
        original(self)

    monkeypatch.setattr(cls, "train", train_or_crash)
    with pytest.raises(interrupt):
        train.run(cfg, tmp_path / "run", vae=vae_run)
    out = tmp_path / "run"
    saved = load_model(out, cfg, out / "last.zip")
    assert saved.num_timesteps == rollout * saved._n_updates // epochs  # all of them trained on
    assert read_json(out / "train_state.json")["timesteps"] == saved.num_timesteps
    # a crash keeps the last periodic save (every 64 steps); Ctrl-C saves the last full update
    trained = crash_at - rollout
    expected = trained if interrupt is KeyboardInterrupt else trained // 64 * 64
    assert saved.num_timesteps == expected

    monkeypatch.setattr(cls, "train", original)
    train.run(cfg, out, vae=vae_run, resume=True)
    final = load_model(out, cfg, out / "last.zip")
    assert final.num_timesteps == 256 == rollout * final._n_updates // epochs
    assert [r["timesteps"] for r in read_jsonl(out / "evaluations.jsonl")] == [64, 128, 192, 256]


def test_resume_after_a_crash_between_the_checkpoint_writes(vae_run: Path, tmp_path: Path) -> None:
    """last.zip newer than train_state.json: the clock of kept records never goes backwards."""
    out = train.run(agent_config("latent", timesteps=128), tmp_path / "run", vae=vae_run)
    (out / "eval.json").write_text('{"timesteps": 128}')  # `worldmodel evaluate` of that agent
    records = read_jsonl(out / "evaluations.jsonl")
    records[1]["wall_seconds"] = 1e6  # written after the state we fall back to
    (out / "evaluations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    state = read_json(out / "train_state.json")
    state.update(timesteps=64, wall_seconds=records[0]["wall_seconds"])  # last.zip is at 128
    (out / "train_state.json").write_text(json.dumps(state))
    (out / "summary.json").unlink()
    train.run(agent_config("latent", timesteps=256), out, vae=vae_run, resume=True)
    assert not (out / "eval.json").exists()  # it described the agent before this session
    assert read_json(out / "eval.previous.json") == {"timesteps": 128}  # kept aside, not lost
    records = read_jsonl(out / "evaluations.jsonl")
    assert [r["timesteps"] for r in records] == [64, 192, 256]
    seconds = [r["wall_seconds"] for r in records]
    assert seconds == sorted(seconds)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out))
    events.Reload()  # TensorBoard hides the same dropped evaluation as evaluations.jsonl
    assert [e.step for e in events.Scalars("eval/mean_reward")] == [64, 192, 256]

    (out / "train_state.json").unlink()  # a crash before the first state write: clock from 0
    train.run(agent_config("latent", timesteps=320), out, vae=vae_run, resume=True)
    assert [r["timesteps"] for r in read_jsonl(out / "evaluations.jsonl")] == [320]
