"""The collector's ``agent:PATH`` policy: a trained agent run acting in a single env.

``worldmodel collect`` with ``collect.policy: agent:RUN`` calls :func:`make_policy` in each worker
(it is a picklable module-level function). The policy builds the observation pipeline the run
was trained with, from its folder (:mod:`agents.encoders`): the same VAE (checked by weights hash),
the same latent or frame history (zeros before the episode start) and the same latent mode;
the memory modes also carry M's LSTM state through the episode (:mod:`agents.memory_obs`), and
the latent modes standardise their features with the run's ``features.json``
(:mod:`agents.features`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.vec_env.stacked_observations import StackedObservations

from agents.encoders import load_encoder
from agents.features import load_features
from agents.latent import latent_space
from agents.memory_obs import load_agent_memory
from agents.models import agent_device, load_model
from agents.modes import get_mode
from worldmodel.errors import UserError

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm

    from agents.features import FeatureStats
    from worldmodel.config import Config
    from worldmodel.memory import LoadedMemory
    from worldmodel.vae import LoadedVAE


class AgentPolicy:
    """Act with a trained SB3 agent on raw ``uint8 (H, W, C)`` frames, one env, one step at a time.

    :param model: the loaded SB3 agent.
    :param cfg: the agent run's config.
    :param encoder: its VAE (latent modes) or ``None``.
    :param action_space: the env's action space (for epsilon-random actions).
    :param seed: seeds the random actions and the policy's sampling.
    :param epsilon: probability of a uniformly random action at each step.
    :param deterministic: greedy actions instead of sampling from the policy.
    :param memory: M (memory modes): observations are ``[z_t, h_t]``, and M reads
        ``(z_t, a_t)`` after each action.
    :param features: the run's feature statistics: each step's ``z`` or ``[z, h]`` is
        standardised before it is stacked (``None``: raw).
    """

    def __init__(
        self,
        model: BaseAlgorithm,
        cfg: Config,
        encoder: LoadedVAE | None,
        action_space: spaces.Space[Any],
        seed: int = 0,
        epsilon: float = 0.0,
        deterministic: bool = False,
        memory: LoadedMemory | None = None,
        features: FeatureStats | None = None,
    ) -> None:
        self.model = model
        self.features = features
        self.encoder = encoder
        self.memory = memory
        self._state = memory.initial_state(1) if memory is not None else None
        self._z: np.ndarray | None = None
        self.latent = cfg.agent.latent
        self.epsilon = epsilon
        self.deterministic = deterministic
        self.action_space = copy.deepcopy(action_space)
        self.seed(seed)
        if get_mode(cfg.agent.obs_mode).policy_input == "latents":
            assert encoder is not None
            base: spaces.Box = latent_space(encoder.latent_dim)
            if memory is not None:
                from agents.memory_obs import memory_space

                base = memory_space(encoder.latent_dim, memory.hidden_size)
        else:
            base = spaces.Box(0, 255, cfg.env.obs_shape, np.uint8)
        self._stack = StackedObservations(1, cfg.agent.history, base, "last")
        self._obs: np.ndarray | None = None
        self._fresh = False

    def seed(self, seed: int) -> None:
        """Re-seed the random actions and the policy's sampling.

        The collector calls it before every episode, so an episode does not depend on the worker
        that ran it.
        """
        self.rng = np.random.default_rng(seed)
        self.action_space.seed(seed)
        torch.manual_seed(seed)

    def _transform(self, frame: np.ndarray) -> np.ndarray:
        """One frame ``(H, W, C)`` -> ``(1, Z)`` latent, or ``(1, H, W, C)`` for pixel modes."""
        frames = np.asarray(frame)[None]
        if self.encoder is None:
            return frames
        z = self.encoder.encode(frames, mode=self.latent)
        if self.memory is None or self._state is None:
            return z if self.features is None else self.features.apply(z)
        self._z = z
        hidden = self._state[0][0].cpu().numpy()
        obs = np.concatenate([z, hidden], axis=1).astype(np.float32)
        return obs if self.features is None else self.features.apply(obs)

    def reset(self, obs: np.ndarray, info: dict[str, Any]) -> None:
        """Start an episode whose first frame is ``obs``."""
        if self.memory is not None:
            self._state = self.memory.initial_state(1)
        self._obs = self._stack.reset(self._transform(obs)).copy()
        self._fresh = True

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> Any:
        """The action for the current frame ``obs`` (the first call after reset may repeat it)."""
        if self._obs is None:
            self.reset(obs, info)
        elif not self._fresh:
            stacked, _ = self._stack.update(self._transform(obs), np.zeros(1, bool), [{}])
            self._obs = stacked.copy()
        self._fresh = False
        if self.epsilon > 0 and self.rng.random() < self.epsilon:
            return self._remember(self.action_space.sample())
        assert self._obs is not None
        action, _ = self.model.predict(self._obs, deterministic=self.deterministic)
        return self._remember(action[0])

    def _remember(self, action: Any) -> Any:
        """Memory modes: advance M's state with ``(z_t, a_t)``; return ``action``."""
        if self.memory is not None and self._state is not None and self._z is not None:
            vector = self.memory.actions(np.asarray([action]))
            _, self._state = self.memory.step(self._z, vector, self._state)
        return action


def make_policy(spec: str, env: gym.Env[Any, Any], seed: int, epsilon: float) -> AgentPolicy:
    """Build the ``agent:PATH`` policy for one collector env.

    :param spec: ``agent:PATH`` with PATH an agent run folder (its ``last.zip`` is used).
    :param env: the collector's env; its frames and actions must be the agent's.
    :param seed: seeds epsilon-random actions and the policy's action sampling.
    :param epsilon: probability of a random action at each step.
    :raises UserError: a bad spec or run folder, or an env that does not fit the agent.
    """
    from worldmodel.config import load_run_config

    if not spec.startswith("agent:") or len(spec) <= len("agent:"):
        raise UserError(f"policy {spec!r}: expected agent:PATH with PATH an agent run folder")
    run = Path(spec.removeprefix("agent:"))
    if not run.is_dir():
        raise UserError(f"policy {spec!r}: {run} is not an agent run folder")
    cfg = load_run_config(run)
    if env.observation_space.shape != cfg.env.obs_shape:
        raise UserError(
            f"policy {spec!r}: the agent was trained on {cfg.env.obs_shape} frames of "
            f"{cfg.env.id} but this env gives {env.observation_space.shape}; collect with the "
            "agent's env settings"
        )
    model = load_model(run, cfg, run / "last.zip", device=agent_device(cfg))
    if model.action_space != env.action_space:
        raise UserError(
            f"policy {spec!r}: the agent acts in {model.action_space}, this env in "
            f"{env.action_space}"
        )
    encoder = load_encoder(run, cfg)
    memory = load_agent_memory(run, cfg)
    features = load_features(run, encoder, memory)
    return AgentPolicy(model, cfg, encoder, env.action_space, seed, epsilon, memory=memory,
                       features=features)
