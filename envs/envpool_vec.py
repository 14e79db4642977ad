"""The SB3 ``VecEnv`` of the EnvPool backend: one pool of ``n`` envs, SB3's step semantics.

A module of its own so that :mod:`envs.envpool` (used by the collector) does not import
Stable-Baselines3 and torch.

What SB3 expects, and how EnvPool's behaviour is adapted:

* Same-step autoreset: EnvPool resets an env on the step AFTER its episode ended. Here the envs
  that ended are reset right away (:meth:`EnvPoolBatch.reset` on just those ids), so ``step``
  returns the first frame of the next episode, with the last frame of the ended one in
  ``infos[i]["terminal_observation"]`` and ``infos[i]["TimeLimit.truncated"]`` set when the
  episode was cut by a time limit rather than terminated.
* Seeding: env ``i`` is built with seed ``seed + i``. ``seed(s)`` (SB3 calls it when a model
  gets a seed) takes effect at the next ``reset()``, which then rebuilds the pool with seeds
  ``s + i``: the same seed always gives the same episodes.
* Episode statistics come from the ``VecMonitor`` that :func:`make_envpool_vec_env` adds.
* ``get_attr``/``set_attr``/``env_method`` act on per-env attribute records (spaces,
  ``render_mode``, ``metadata`` and whatever ``set_attr`` stored); ``env_method`` knows
  ``render`` and ``get_wrapper_attr``. ``render()`` tiles the games' full frames
  (``render_mode="rgb_array"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env import VecEnv, VecMonitor
from stable_baselines3.common.vec_env.base_vec_env import (
    VecEnvIndices,
    VecEnvObs,
    VecEnvStepReturn,
)

from envs.config import EnvConfig
from envs.envpool import RENDER_FPS, EnvPoolBatch, pool_seed


class EnvPoolVecEnv(VecEnv):
    """``n_envs`` preprocessed EnvPool envs as an SB3 VecEnv (observations ``(n, H, W, C)``).

    :param cfg: the ``env`` config section.
    :param n_envs: envs in the pool.
    :param seed: env ``i`` is seeded ``seed + i``.
    :param num_threads: EnvPool worker threads (default: one per env, at most one per core).
    :param render_mode: ``"rgb_array"`` to ``render()`` the games' full frames.
    """

    def __init__(
        self,
        cfg: EnvConfig,
        n_envs: int,
        seed: int = 0,
        *,
        num_threads: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        self.batch = EnvPoolBatch(cfg, [seed + i for i in range(n_envs)],
                                  num_threads=num_threads, render_mode=render_mode)
        self._attrs: list[dict[str, Any]] = [
            {
                "render_mode": render_mode,
                "observation_space": self.batch.observation_space,
                "action_space": self.batch.action_space,
                "metadata": {"render_modes": ["rgb_array"],
                             "render_fps": RENDER_FPS[self.batch.family]},
                "spec": None,
            }
            for _ in range(n_envs)
        ]
        self._actions: np.ndarray | None = None
        self._unused = True  # the pool was built (with self.batch.seeds) and not reset since
        super().__init__(n_envs, self.batch.observation_space, self.batch.action_space)
        self.metadata: dict[str, Any] = {**self.metadata,
                                         "render_fps": RENDER_FPS[self.batch.family]}

    def reset(self) -> VecEnvObs:
        """Start new episodes in all envs (first rebuilding the pool after ``seed()``)."""
        if any(s is not None for s in self._seeds):
            fresh = np.random.SeedSequence().generate_state(self.num_envs)
            seeds = [pool_seed(s if s is not None else int(f))
                     for s, f in zip(self._seeds, fresh, strict=True)]
            if not (self._unused and seeds == self.batch.seeds):  # else: already built so
                self.batch.reseed(seeds)
        self._unused = False
        obs, _ = self.batch.reset()
        self.reset_infos = [{} for _ in range(self.num_envs)]
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        """Remember the actions; :meth:`step_wait` steps all envs with them."""
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        """Step all envs; reset those whose episode ended (same-step autoreset)."""
        assert self._actions is not None, "step_async() first"
        obs, reward, terminated, truncated, _ = self.batch.step(self._actions)
        self._actions = None
        dones = terminated | truncated
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if dones.any():
            ended = np.flatnonzero(dones)
            terminal = obs[ended].copy()
            obs[ended], _ = self.batch.reset(ended)
            for k, i in enumerate(ended):
                infos[i]["terminal_observation"] = terminal[k]
                infos[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
        return obs, reward.astype(np.float32), dones, infos

    def close(self) -> None:
        """Stop EnvPool's threads."""
        self.batch.close()

    def get_images(self) -> Sequence[np.ndarray | None]:
        """Each env's full game frame (``render_mode="rgb_array"``), else ``None`` per env."""
        frames = self.batch.render()
        return [None] * self.num_envs if frames is None else list(frames)

    def _indices(self, indices: VecEnvIndices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        if isinstance(indices, int | np.integer):
            return [int(indices)]
        return [int(i) for i in indices]

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """An attribute of each env (spaces, ``render_mode``, ``metadata``, set attributes)."""
        out = []
        for i in self._indices(indices):
            if attr_name not in self._attrs[i]:
                raise AttributeError(f"EnvPool env {i} has no attribute {attr_name!r}")
            out.append(self._attrs[i][attr_name])
        return out

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Record an attribute per env (read back by :meth:`get_attr`; EnvPool is unchanged)."""
        for i in self._indices(indices):
            self._attrs[i][attr_name] = value

    def env_method(
        self,
        method_name: str,
        *method_args: Any,
        indices: VecEnvIndices = None,
        **method_kwargs: Any,
    ) -> list[Any]:
        """Per-env ``render()`` and ``get_wrapper_attr(name)``; other methods do not exist."""
        ids = self._indices(indices)
        if method_name == "render":
            frames = self.batch.render(ids)
            return [None] * len(ids) if frames is None else list(frames)
        if method_name == "get_wrapper_attr":
            return self.get_attr(method_args[0], ids)
        raise AttributeError(
            f"EnvPool envs have no method {method_name!r} (only render and get_wrapper_attr)"
        )

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        """EnvPool envs are never wrapped by Gymnasium wrappers."""
        return [False] * len(self._indices(indices))


def make_envpool_vec_env(
    cfg: EnvConfig,
    *,
    n_envs: int,
    seed: int = 0,
    num_threads: int | None = None,
    render_mode: str | None = None,
) -> VecMonitor:
    """:class:`EnvPoolVecEnv` in a ``VecMonitor`` (``info["episode"]``: return, length)."""
    return VecMonitor(EnvPoolVecEnv(cfg, n_envs, seed, num_threads=num_threads,
                                    render_mode=render_mode))
