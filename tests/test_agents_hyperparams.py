"""agent.hyperparams -> SB3 keyword arguments: zoo schedules, class names, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import DQN, PPO, SAC, TD3
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike
from stable_baselines3.common.torch_layers import NatureCNN

from agents.extractor import VAEFeaturesExtractor
from agents.hyperparams import parse_hyperparams, parse_policy_kwargs_string
from worldmodel.errors import UserError


def test_zoo_schedules_and_yaml_number_strings() -> None:
    kw = parse_hyperparams(
        {"learning_rate": "lin_1e-4", "clip_range": "lin_0.1", "ent_coef": "1e-2",
         "n_steps": 512, "gamma": 0.99}, PPO)
    assert kw["learning_rate"](1.0) == pytest.approx(1e-4)
    assert kw["learning_rate"](0.25) == pytest.approx(2.5e-5)
    assert kw["clip_range"](0.0) == pytest.approx(0.0)
    assert kw["ent_coef"] == pytest.approx(0.01)  # YAML 1.1 reads 1e-2 as a string
    assert kw["n_steps"] == 512 and kw["gamma"] == 0.99
    assert parse_hyperparams({"learning_rate": 3e-4}, PPO)["learning_rate"] == 3e-4
    assert parse_hyperparams({"ent_coef": "auto_0.1"}, SAC)["ent_coef"] == "auto_0.1"


@pytest.mark.parametrize("name", ["GELU", "nn.GELU", "torch.nn.GELU", "th.nn.GELU"])
def test_activation_names(name: str) -> None:
    kw = parse_hyperparams({"policy_kwargs": {"activation_fn": name}}, PPO)
    assert kw["policy_kwargs"]["activation_fn"] is torch.nn.GELU


def test_zoo_policy_kwargs_string_is_parsed_without_eval() -> None:
    text = ("dict(log_std_init=-2, ortho_init=False, activation_fn=nn.GELU, "
            "net_arch=dict(pi=[256], vf=[256]), optimizer_class=RMSpropTFLike, "
            "optimizer_kwargs=dict(eps=1e-5))")
    kw = parse_hyperparams({"policy_kwargs": text, "use_sde": True, "sde_sample_freq": 4}, PPO)
    pk = kw["policy_kwargs"]
    assert pk["log_std_init"] == -2 and pk["ortho_init"] is False
    assert pk["activation_fn"] is torch.nn.GELU and pk["optimizer_class"] is RMSpropTFLike
    assert pk["net_arch"] == {"pi": [256], "vf": [256]}
    assert pk["optimizer_kwargs"] == {"eps": 1e-5}
    with pytest.raises(UserError, match="cannot read"):
        parse_policy_kwargs_string("dict(x=__import__('os').system('true'))")


def test_extractor_classes_by_name() -> None:
    for name, cls in [("NatureCNN", NatureCNN), ("VAEFeaturesExtractor", VAEFeaturesExtractor),
                      ("agents.extractor.VAEFeaturesExtractor", VAEFeaturesExtractor)]:
        kw = parse_hyperparams({"policy_kwargs": {"features_extractor_class": name}}, PPO)
        assert kw["policy_kwargs"]["features_extractor_class"] is cls
    with pytest.raises(UserError, match="unknown class 'Bogus'"):
        parse_hyperparams({"policy_kwargs": {"activation_fn": "Bogus"}}, PPO)


def test_train_freq_and_action_noise() -> None:
    box = spaces.Box(-1, 1, (3,), np.float32)
    kw = parse_hyperparams({"train_freq": [1, "episode"], "noise_type": "normal",
                            "noise_std": 0.3}, TD3, box)
    assert kw["train_freq"] == (1, "episode")
    noise = kw["action_noise"]
    assert isinstance(noise, NormalActionNoise) and noise().shape == (3,)
    assert np.allclose(noise._sigma, 0.3)
    assert "action_noise" not in parse_hyperparams({"noise_type": "normal"}, TD3)  # no space yet
    with pytest.raises(UserError, match="no action noise"):
        parse_hyperparams({"noise_type": "normal"}, PPO)


def test_unknown_and_zoo_only_keys_are_one_line_user_errors() -> None:
    with pytest.raises(UserError, match=r"n_stepz: unknown PPO argument; valid: .*n_steps") as e:
        parse_hyperparams({"n_stepz": 5}, PPO)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"set agent\.timesteps instead"):
        parse_hyperparams({"n_timesteps": 1e6}, PPO)
    with pytest.raises(UserError, match=r"agent\.history"):
        parse_hyperparams({"frame_stack": 4}, PPO)
    with pytest.raises(UserError, match="exploration_fraction: unknown PPO"):
        parse_hyperparams({"exploration_fraction": 0.1}, PPO)
    assert parse_hyperparams({"exploration_fraction": 0.1}, DQN) == {"exploration_fraction": 0.1}
    with pytest.raises(UserError, match="lin_"):
        parse_hyperparams({"learning_rate": "fast"}, PPO)


@pytest.mark.parametrize("name", ["carracing", "pong", "breakout"])
def test_shipped_configs_give_valid_sb3_arguments(name: str) -> None:
    from pathlib import Path

    from agents.models import algo_class
    from worldmodel.config import resolve_config

    cfg = resolve_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    kw = parse_hyperparams(cfg.agent.hyperparams, algo_class(cfg.agent.algo))
    assert callable(kw["learning_rate"]) and cfg.env.image_size == 64 and cfg.env.grayscale
    assert cfg.agent.history == (2 if name == "carracing" else 4)
    assert cfg.env.frame_skip == (2 if name == "carracing" else 4)
    if name == "carracing":
        assert kw["use_sde"] and kw["policy_kwargs"]["activation_fn"] is torch.nn.GELU


@pytest.mark.parametrize("value", [[4], [4, "steps"], ["x", "step"], [0, "step"], "4 step", 2.5])
def test_bad_train_freq_is_a_user_error_naming_the_key(value: object) -> None:
    with pytest.raises(UserError, match=r"train_freq: expected N or \[N, step\|episode\]"):
        parse_hyperparams({"train_freq": value}, DQN)
    assert parse_hyperparams({"train_freq": ["8", "step"]}, DQN)["train_freq"] == (8, "step")
    assert parse_hyperparams({"train_freq": 4}, DQN)["train_freq"] == 4


@pytest.mark.parametrize("value", ["abc", [1], -0.1, True])
def test_bad_noise_std_is_a_user_error_naming_the_key(value: object) -> None:
    with pytest.raises(UserError, match=r"noise_std: expected a number >= 0"):
        parse_hyperparams({"noise_type": "normal", "noise_std": value}, TD3)
    assert parse_hyperparams({"noise_std": "0.2"}, TD3) == {}  # no noise_type: no noise
