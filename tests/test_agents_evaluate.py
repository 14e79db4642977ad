"""evaluate (eval.json, video) and the collector's agent:PATH policy."""

from __future__ import annotations

import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from agent_testing import PIXEL_SIZE, SIZE, agent_config, make_vae_run

from agents import evaluate, train
from agents.latent import VecLatentObservation
from agents.policy import AgentPolicy, make_policy
from envs import make_env, make_vec_env
from worldmodel.config import load_run_config
from worldmodel.errors import UserError
from worldmodel.io import read_json
from worldmodel.vae import load_vae

Z = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("agents")
    vae = make_vae_run(root / "vae")
    out = {"vae": vae}
    for mode in ("latent", "pixel", "latent-finetune"):
        out[mode] = train.run(agent_config(mode, timesteps=64), root / mode,
                              vae=None if mode == "pixel" else vae)
    return out


def test_eval_json_values(runs: dict[str, Path]) -> None:
    path = evaluate.run(runs["latent"], episodes=5, deterministic=True, seed=7)
    assert path == runs["latent"] / "eval.json"
    result = read_json(path)
    returns, lengths = np.array(result["returns"]), np.array(result["lengths"])
    assert len(returns) == len(lengths) == 5 and result["episodes"] == 5
    assert result["mean_return"] == pytest.approx(returns.mean())
    assert result["std_return"] == pytest.approx(returns.std())
    assert result["min_return"] == returns.min() and result["max_return"] == returns.max()
    assert result["mean_length"] == pytest.approx(lengths.mean())
    assert lengths.max() <= 20 and result["max_length"] == lengths.max()  # env.max_episode_steps
    assert result["deterministic"] is True and result["seed"] == 7 and result["video"] is None
    assert result["timesteps"] == 64
    again = read_json(evaluate.run(runs["latent"], episodes=5, deterministic=True, seed=7))
    assert again["returns"] == result["returns"]  # one seed, one result
    evaluate.run(runs["latent"], episodes=1, deterministic=True, seed=8)
    assert read_json(runs["latent"] / "eval.previous.json") == again  # nothing lost
    assert read_json(runs["latent"] / "eval.json")["episodes"] == 1


def test_deterministic_defaults_to_the_runs_eval_deterministic(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    def evaluate_as(eval_deterministic: bool, deterministic: bool | None) -> bool:
        run = tmp_path / f"{eval_deterministic}"
        if not run.exists():
            shutil.copytree(runs["latent"], run)
            cfg = load_run_config(run)
            cfg.agent.eval_deterministic = eval_deterministic
            cfg.save(run / "config.yaml")
        result = read_json(evaluate.run(run, episodes=1, deterministic=deterministic))
        return bool(result["deterministic"])

    assert evaluate_as(True, None) is True and evaluate_as(False, None) is False
    assert evaluate_as(False, True) is True and evaluate_as(True, False) is False  # flag wins


@pytest.mark.parametrize(("mode", "side_by_side"), [("latent", True), ("pixel", False),
                                                    ("latent-finetune", True)])
def test_video_has_one_frame_per_step(
    runs: dict[str, Path], mode: str, side_by_side: bool
) -> None:
    result = read_json(evaluate.run(runs[mode], episodes=2, video=True))
    video = result["video"]
    frames = iio.imread(runs[mode] / video["path"])
    size = PIXEL_SIZE if mode == "pixel" else SIZE
    scale = -(-256 // size)
    width = size * scale * (2 if side_by_side else 1)
    assert frames.shape == (video["length"], size * scale, width, 3)
    assert video["frames"] == video["length"] and video["reconstruction"] is side_by_side
    assert video["return"] in result["returns"]


def test_compose_video_upscales_with_nearest_neighbours() -> None:
    frames = np.zeros((2, 16, 16, 1), np.uint8)
    frames[:, 0, 0] = 200
    video = evaluate.compose_video(frames, np.full((2, 16, 16, 1), 9, np.uint8))
    assert video.shape == (2, 256, 512, 3)
    assert (video[:, :16, :16] == 200).all() and (video[:, 16:, :16] == 0).all()
    assert (video[:, :, 256:] == 9).all()


def test_agent_policy_sees_what_the_agent_was_trained_on(runs: dict[str, Path]) -> None:
    cfg = load_run_config(runs["latent"])
    env = make_env(cfg.env)
    policy = make_policy(f"agent:{runs['latent']}", env, seed=0, epsilon=0.0)
    assert isinstance(policy, AgentPolicy)
    vec = VecLatentObservation(make_vec_env(cfg.env, n_envs=1, seed=3), load_vae(runs["vae"]),
                               history=cfg.agent.history)
    frame, info = env.reset(seed=3)
    want = vec.reset()
    policy.reset(frame, info)
    for step in range(5):
        action = policy.act(frame, info)
        assert policy._obs is not None
        np.testing.assert_allclose(policy._obs, want, atol=1e-5, err_msg=f"step {step}")
        assert env.action_space.contains(action)
        frame, _, _, _, info = env.step(action)
        want, *_ = vec.step(np.array([action]))


def test_agent_policy_epsilon_and_pixel_runs(runs: dict[str, Path]) -> None:
    cfg = load_run_config(runs["pixel"])
    env = make_env(cfg.env)
    frame, info = env.reset(seed=0)
    greedy = make_policy(f"agent:{runs['pixel']}", env, seed=1, epsilon=0.0)
    greedy.deterministic = True
    greedy.reset(frame, info)
    first = greedy.act(frame, info)
    assert all(greedy.act(frame, info) == first for _ in range(5))  # deterministic, same input
    noisy = make_policy(f"agent:{runs['pixel']}", env, seed=1, epsilon=1.0)
    noisy.reset(frame, info)
    assert len({int(noisy.act(frame, info)) for _ in range(40)}) == 5  # uniformly random


def test_user_errors(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"is not a run folder of this project; pass an agent run"):
        evaluate.run(tmp_path, episodes=1)
    with pytest.raises(UserError, match="episodes"):
        evaluate.run(runs["latent"], episodes=0)
    big = make_env(load_run_config(runs["latent"]).env.model_copy(update={"image_size": 64}))
    with pytest.raises(UserError, match="collect with the agent's env settings"):
        make_policy(f"agent:{runs['latent']}", big, seed=0, epsilon=0.0)
    with pytest.raises(UserError, match="not an agent run folder"):
        make_policy(f"agent:{tmp_path / 'nope'}", big, seed=0, epsilon=0.0)
