"""The VecEnv an agent trains or is evaluated on: env frames wrapped for its observation mode.

Observation pipelines, by the mode's :attr:`~agents.modes.ObsModeSpec.wrapper`
(:data:`WRAPPERS`):

* ``frames`` (``pixel``, ``latent-finetune``): ``VecFrameStack(history)``, ``VecTransposeImage``
  -> a ``CnnPolicy`` (with a ``VAEFeaturesExtractor`` for ``latent-finetune``);
* ``latents`` (``latent``, ``random-encoder``): ``VecLatentObservation(history)`` -> ``MlpPolicy``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from stable_baselines3.common.vec_env import (
    VecEnv,
    VecEnvWrapper,
    VecFrameStack,
    VecNormalize,
    VecTransposeImage,
)
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from agents.latent import VecLatentObservation
from agents.modes import WrapperKind, get_mode

if TYPE_CHECKING:
    from worldmodel.config import Config
    from worldmodel.vae import LoadedVAE

#: Periodic and final evaluations use seeds ``seed + EVAL_SEED_OFFSET + i``, away from training's.
EVAL_SEED_OFFSET = 1000


def wrap_frames(venv: VecEnv, cfg: Config, encoder: LoadedVAE | None) -> VecEnv:
    """Frames for a CNN: the last ``agent.history`` frames stacked, channels first."""
    if cfg.agent.history > 1:
        venv = VecFrameStack(venv, cfg.agent.history, channels_order="last")
    return VecTransposeImage(venv)


def wrap_latents(venv: VecEnv, cfg: Config, encoder: LoadedVAE | None) -> VecEnv:
    """The frozen encoder's latents of the last ``agent.history`` frames."""
    assert encoder is not None
    return VecLatentObservation(venv, encoder, history=cfg.agent.history, latent=cfg.agent.latent)


#: How each :data:`~agents.modes.WrapperKind` turns raw frames into observations.
WRAPPERS: dict[WrapperKind, Callable[[VecEnv, Config, LoadedVAE | None], VecEnv]] = {
    "frames": wrap_frames,
    "latents": wrap_latents,
}


def wrap_observations(venv: VecEnv, cfg: Config, encoder: LoadedVAE | None) -> VecEnv:
    """Raw frames -> what the policy observes, for ``cfg.agent.obs_mode``."""
    return WRAPPERS[get_mode(cfg.agent.obs_mode).wrapper](venv, cfg, encoder)


class VecFrameRecorder(VecEnvWrapper):
    """Keep env 0's raw frames ``uint8 (H, W, C)`` of its first episode, for a video.

    ``frames[t]`` is the frame the agent saw before its ``t``-th action, so there are as many
    frames as steps; ``episode`` holds Monitor's ``{"r": return, "l": length}`` once it ends.
    """

    def __init__(self, venv: VecEnv) -> None:
        super().__init__(venv)
        self.frames: list[np.ndarray] = []
        self.episode: dict[str, float] | None = None

    def reset(self) -> np.ndarray:
        """Reset; record env 0's first frame."""
        obs = self.venv.reset()
        assert isinstance(obs, np.ndarray)
        if self.episode is None and not self.frames:
            self.frames.append(obs[0].copy())
        return obs

    def step_wait(self) -> VecEnvStepReturn:
        """Step; record env 0's next frame until its first episode ends."""
        obs, rewards, dones, infos = self.venv.step_wait()
        assert isinstance(obs, np.ndarray)
        if self.episode is None:
            if dones[0]:
                self.episode = dict(infos[0].get("episode", {"r": np.nan, "l": len(self.frames)}))
            else:
                self.frames.append(obs[0].copy())
        return obs, rewards, dones, infos


def make_agent_env(
    cfg: Config,
    encoder: LoadedVAE | None,
    *,
    n_envs: int,
    seed: int,
    training: bool = True,
    gamma: float = 0.99,
    normalize_from: Path | None = None,
    recorder: bool = False,
) -> VecEnv:
    """Build the VecEnv an agent trains or is evaluated on.

    :param cfg: the run config (``env`` and ``agent`` sections).
    :param encoder: the frozen encoder of the env wrapper (:func:`agents.encoders.load_encoder`).
    :param n_envs: parallel envs.
    :param seed: env ``i`` is seeded ``seed + i``.
    :param training: ``False`` for evaluation envs (reward normalisation frozen and off).
    :param gamma: discount of the reward normalisation.
    :param normalize_from: a saved ``VecNormalize`` (``vecnormalize.pkl``) to restore.
    :param recorder: insert a :class:`VecFrameRecorder` above the raw frames.
    """
    from envs import make_vec_env

    venv = make_vec_env(cfg.env, n_envs=n_envs, seed=seed)
    if recorder:
        venv = VecFrameRecorder(venv)
    venv = wrap_observations(venv, cfg, encoder)
    if cfg.agent.normalize_reward:
        if normalize_from is not None and normalize_from.is_file():
            venv = VecNormalize.load(str(normalize_from), venv)
            venv.training, venv.norm_reward = training, training
        else:
            venv = VecNormalize(
                venv, training=training, norm_obs=False, norm_reward=training, gamma=gamma
            )
    return venv


def find_wrapper(venv: VecEnv, cls: type[VecEnvWrapper]) -> Any:
    """The first wrapper of type ``cls`` in a VecEnv stack, or ``None``."""
    env: Any = venv
    while isinstance(env, VecEnvWrapper):
        if isinstance(env, cls):
            return env
        env = env.venv
    return None
