"""Environment factories: Gymnasium games as ``uint8`` image envs, plus our fast pixel env.

Importing this package registers ``worldmodel/Reach-v0`` with Gymnasium (cheap: no env is
built).
"""

from __future__ import annotations

import gymnasium as gym

from envs.config import Crop, EnvConfig
from envs.factory import (
    EnvConfigError,
    UnknownEnvError,
    check_env_id,
    env_family,
    make_env,
    make_vec_env,
)

if "worldmodel/Reach-v0" not in gym.registry:
    gym.register("worldmodel/Reach-v0", entry_point="envs.reach:ReachEnv", max_episode_steps=100)

__all__ = [
    "Crop",
    "EnvConfig",
    "EnvConfigError",
    "UnknownEnvError",
    "check_env_id",
    "env_family",
    "make_env",
    "make_vec_env",
]
