"""Collection policies and per-episode seeds.

``random`` samples the action space; ``brownian`` is World Models' temporally correlated
exploration (ctallec/world-models): for ``Box`` actions ``a_0 ~ U(low, high)``,
``a_{t+1} = clip(a_t + sqrt(dt) * N(0, I), low, high)``; for ``Discrete``/``MultiDiscrete``
actions (no notion of a small step) a sticky random action that is resampled uniformly with
probability ``sqrt(dt)`` per step (mean run ``1/sqrt(dt)`` ~ 7 steps at ``dt = 1/50``).
``agent:PATH`` policies come from the :data:`MakePolicy` factory the CLI injects
(``agents.policy.make_policy``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from worldmodel.errors import UserError

if TYPE_CHECKING:
    import gymnasium as gym
    from gymnasium import spaces


@runtime_checkable
class Policy(Protocol):
    """What the collector needs from a policy.

    A policy that also has ``seed(seed: int) -> None`` is re-seeded before every episode with
    that episode's policy seed, so its episodes do not depend on which worker ran them.
    """

    def reset(self, obs: np.ndarray, info: dict[str, Any]) -> None:
        """Start an episode whose first frame is ``obs`` (``(H, W, C)`` uint8)."""

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> Any:
        """The action to take on frame ``obs`` (``(H, W, C)`` uint8)."""


#: ``make_policy(spec, env, seed, epsilon) -> Policy`` for ``agent:PATH`` (agents/policy.py).
MakePolicy = Callable[[str, "gym.Env[Any, Any]", int, float], Policy]


def episode_seeds(seed: int, episode: int) -> tuple[int, int]:
    """The env seed and the policy seed of episode ``episode`` of a collection seeded ``seed``.

    Example:
        >>> episode_seeds(0, 3) == episode_seeds(0, 3) != episode_seeds(1, 3)
        True
    """
    env_seed, policy_seed = np.random.SeedSequence(seed, spawn_key=(episode,)).generate_state(2)
    return int(env_seed), int(policy_seed)


class RandomPolicy:
    """Uniform random actions: ``action_space.sample()`` of a private, per-episode seeded copy."""

    def __init__(self, space: spaces.Space[Any]) -> None:
        self.space = copy.deepcopy(space)

    def seed(self, seed: int) -> None:
        """Seed the action sampler for the next episode."""
        self.space.seed(seed)

    def reset(self, obs: np.ndarray, info: dict[str, Any]) -> None:
        """Nothing to reset."""

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> Any:
        """A uniformly random action."""
        return self.space.sample()


class BrownianPolicy:
    """Temporally correlated random actions (World Models' CarRacing exploration).

    ``Box``: ``a_0 ~ U(low, high)`` (``space.sample()``), then
    ``a_{t+1} = clip(a_t + sqrt(dt) * N(0, I), low, high)``.
    ``Discrete`` / ``MultiDiscrete``: the previous action (per component) is kept, and resampled
    uniformly with probability ``sqrt(dt)`` per step.

    :param space: the env's action space.
    :param dt: time step of the Brownian motion (ctallec/world-models uses 1/50).

    Example:
        >>> from gymnasium.spaces import Box
        >>> p = BrownianPolicy(Box(-1.0, 1.0, (2,)), dt=0.02)
        >>> p.seed(0)
        >>> a0 = p.act(None, {}); a1 = p.act(None, {})
        >>> bool(abs(a1 - a0).max() < 1.0)  # small steps: sqrt(0.02) ~ 0.14 per unit noise
        True
    """

    def __init__(self, space: spaces.Space[Any], dt: float = 1 / 50) -> None:
        from gymnasium import spaces

        if not isinstance(space, spaces.Box | spaces.Discrete | spaces.MultiDiscrete):
            raise UserError(
                f"policy brownian supports Box, Discrete and MultiDiscrete actions, not "
                f"{type(space).__name__}; use collect.policy=random"
            )
        self.space = copy.deepcopy(space)
        self.scale = math.sqrt(dt)
        self.rng = np.random.default_rng()
        self._last: Any = None

    def seed(self, seed: int) -> None:
        """Seed for the next episode (the first action is drawn afresh)."""
        self.space.seed(seed)
        self.rng = np.random.default_rng(seed)
        self._last = None

    def reset(self, obs: np.ndarray, info: dict[str, Any]) -> None:
        """Forget the previous action: the next one is uniform."""
        self._last = None

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> Any:
        """The next action of the random walk."""
        from gymnasium import spaces

        if self._last is None:
            self._last = self.space.sample()
            return self._last
        space = self.space
        if isinstance(space, spaces.Box):
            step = self.scale * self.rng.standard_normal(space.shape)
            self._last = np.clip(self._last + step, space.low, space.high).astype(space.dtype)
        elif isinstance(space, spaces.Discrete):
            if self.rng.random() < self.scale:
                self._last = space.start + self.rng.integers(space.n)
        else:
            fresh = space.sample()
            switch = self.rng.random(np.shape(fresh)) < self.scale
            self._last = np.where(switch, fresh, self._last).astype(space.dtype)
        return self._last


def make_builtin_policy(name: str, space: spaces.Space[Any], dt: float = 1 / 50) -> Policy:
    """``random`` or ``brownian`` for an action space."""
    if name == "random":
        return RandomPolicy(space)
    if name == "brownian":
        return BrownianPolicy(space, dt=dt)
    raise UserError(f"unknown built-in policy {name!r}; use random, brownian or agent:PATH")

