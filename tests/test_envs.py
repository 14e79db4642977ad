from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import Crop, EnvConfig, UnknownEnvError, make_env, make_vec_env
from envs.factory import EnvConfigError
from envs.reach import ReachEnv
from envs.wrappers import FrameSkip


def rollout(env: gym.Env, seed: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    frames, rewards = [obs], []
    for _ in range(steps):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        frames.append(obs)
        rewards.append(reward)
        if terminated or truncated:
            obs, _ = env.reset()
    return np.stack(frames), np.array(rewards)


@pytest.mark.parametrize("continuous", [False, True])
def test_reach_passes_check_env(continuous: bool) -> None:
    env = gym.make("worldmodel/Reach-v0", continuous=continuous)
    check_env(env.unwrapped)
    assert isinstance(env.action_space, gym.spaces.Box if continuous else gym.spaces.Discrete)


def test_reach_state_matches_pixels() -> None:
    env = ReachEnv(size=64)
    obs, info = env.reset(seed=3)
    ax, ay, tx, ty = info["state"]
    free = 64 - env.side
    red = np.argwhere((obs == ReachEnv.agent_color).all(-1))
    green = np.argwhere((obs == ReachEnv.target_color).all(-1))
    assert red.min(0).tolist() == [round(ay * free), round(ax * free)]
    # the target may be partly hidden under the agent, but its far corner shows unless covered
    assert len(green) > 0 or np.abs(np.array([ax - tx, ay - ty])).max() < 0.3
    assert env.side == 16


def test_reach_reward_and_termination() -> None:
    env = ReachEnv()
    env.reset(seed=0)
    env._agent = np.array([0.5, 0.5])
    env._target = np.array([0.55, 0.5])
    _, reward, terminated, _, _ = env.step(1)  # +x moves onto the target
    assert terminated and reward == pytest.approx(1.0)
    env._agent = np.array([0.0, 0.0])
    env._target = np.array([1.0, 0.0])
    _, reward, terminated, _, _ = env.step(0)
    assert not terminated and reward == pytest.approx(-0.05)


def test_reach_is_deterministic_under_a_seed() -> None:
    a_frames, a_rewards = rollout(make_env(EnvConfig()), seed=7, steps=150)
    b_frames, b_rewards = rollout(make_env(EnvConfig()), seed=7, steps=150)
    c_frames, _ = rollout(make_env(EnvConfig()), seed=8, steps=150)
    np.testing.assert_array_equal(a_frames, b_frames)
    np.testing.assert_array_equal(a_rewards, b_rewards)
    assert not np.array_equal(a_frames, c_frames)


def test_reach_episode_cap_is_100_steps() -> None:
    env = make_env(EnvConfig())
    env.reset(seed=0)
    steps, done = 0, False
    while not done:
        _, _, terminated, truncated, _ = env.step(0)  # stand still: never arrives
        steps += 1
        done = terminated or truncated
    assert steps == 100 and truncated


@pytest.mark.parametrize(
    ("cfg", "shape"),
    [
        (EnvConfig(), (64, 64, 3)),
        (EnvConfig(image_size=32, grayscale=True), (32, 32, 1)),
        (EnvConfig(id="CartPole-v1", image_size=48), (48, 48, 3)),
        (EnvConfig(id="CarRacing-v3"), (64, 64, 3)),
        (EnvConfig(id="CarRacing-v3", kwargs={"continuous": False}, grayscale=True), (64, 64, 1)),
    ],
    ids=["reach", "reach-gray", "cartpole", "carracing", "carracing-discrete"],
)
def test_families_give_uint8_frames(cfg: EnvConfig, shape: tuple[int, int, int]) -> None:
    env = make_env(cfg)
    obs, _ = env.reset(seed=0)
    assert obs.shape == shape and obs.dtype == np.uint8
    assert env.observation_space.shape == shape
    obs, *_ = env.step(env.action_space.sample())
    assert obs.shape == shape and obs.dtype == np.uint8
    assert obs.std() > 0  # a real picture, not a blank frame
    env.close()


def test_carracing_crops_the_dashboard() -> None:
    env = make_env(EnvConfig(id="CarRacing-v3", image_size=84, crop=Crop()))
    full = make_env(EnvConfig(id="CarRacing-v3", image_size=84))
    assert "CropObservation" in str(full) and "CropObservation" not in str(env)
    assert EnvConfig(id="CarRacing-v3").crop is None


@pytest.mark.parametrize("env_id", ["ALE/Pong-v5", "ALE/Breakout-v5"])
def test_atari_preprocessing(env_id: str) -> None:
    pytest.importorskip("ale_py", reason="needs the atari extra: pip install 'worldmodel[atari]'")
    env = make_env(EnvConfig(id=env_id, frame_skip=4, grayscale=True, image_size=64))
    obs, _ = env.reset(seed=0)
    assert obs.shape == (64, 64, 1) and obs.dtype == np.uint8
    assert "AtariPreprocessing" in str(env)
    frames, _ = rollout(env, seed=1, steps=20)
    again, _ = rollout(make_env(EnvConfig(id=env_id, frame_skip=4, grayscale=True)), 1, 20)
    np.testing.assert_array_equal(frames, again)


def test_bad_crops_are_one_line_gymnasium_errors_naming_the_key() -> None:
    with pytest.raises(EnvConfigError, match=r"env\.crop .* leaves nothing of the 32x32") as e:
        make_env(EnvConfig(image_size=32, crop=Crop(top=20, bottom=12)))
    assert isinstance(e.value, gym.error.Error) and "\n" not in str(e.value)  # CLI: one line
    assert make_env(EnvConfig(image_size=32, crop=Crop(top=20, bottom=11))).observation_space.shape
    pytest.importorskip("ale_py", reason="needs the atari extra: pip install 'worldmodel[atari]'")
    with pytest.raises(EnvConfigError, match=r"env\.crop is not supported .*210x160") as e:
        make_env(EnvConfig(id="ALE/Pong-v5", crop=Crop(top=2)))
    assert type(e.value) is EnvConfigError  # the EnvPool backend raises the same class


def test_frame_skip_sums_rewards() -> None:
    base = make_env(EnvConfig())
    skipped = FrameSkip(make_env(EnvConfig()), 3)
    base.reset(seed=5)
    skipped.reset(seed=5)
    expected = sum(float(base.step(1)[1]) for _ in range(3))
    assert float(skipped.step(1)[1]) == pytest.approx(expected)


def test_max_episode_steps_counts_agent_steps() -> None:
    env = make_env(EnvConfig(max_episode_steps=5, frame_skip=2))
    env.reset(seed=0)
    truncated = [env.step(0)[3] for _ in range(5)]
    assert truncated == [False] * 4 + [True]


def test_unknown_env_id_suggests_close_matches() -> None:
    with pytest.raises(UnknownEnvError, match="did you mean CarRacing-v3") as info:
        make_env(EnvConfig(id="CarRacin-v3"))
    assert "worldmodel[atari]" in str(info.value)
    assert "\n" not in str(info.value)


def test_vec_env_shapes_and_seeds() -> None:
    venv = make_vec_env(EnvConfig(image_size=32), n_envs=3, seed=11)
    obs = venv.reset()
    assert obs.shape == (3, 32, 32, 3) and obs.dtype == np.uint8
    assert not np.array_equal(obs[0], obs[1])  # each env has its own seed
    again = make_vec_env(EnvConfig(image_size=32), n_envs=3, seed=11).reset()
    np.testing.assert_array_equal(obs, again)
    assert envs.env_family("worldmodel/Reach-v0") == "worldmodel"
