"""``worldmodel/Reach-v0``: a small, fast pixel env that needs vision and exposes its true state.

Two flat-coloured squares on a flat background: the agent (red) must reach the target (green).
Frames are drawn with numpy at the requested size (no pygame), so one core steps it at tens of
thousands of frames per second. The squares are a quarter of the image wide (16 px at 64x64):
small objects are the first thing a VAE drops, and these are big enough for it to keep.

The reward is dense, ``-0.05 * distance`` per step and ``+1`` on reaching the target, so PPO
learns it from pixels within ~100k steps (measured here: with a sparse reward, PPO on the true
state learned nothing in 100k steps). ``info["state"]`` holds the true positions ``(agent_x,
agent_y, target_x, target_y)`` in ``[0, 1]``, for representation metrics.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

# Discrete moves: no-op, +x, -x, +y, -y (x to the right, y downwards).
_MOVES = np.array([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]], dtype=np.float64)


class ReachEnv(gym.Env[np.ndarray, Any]):
    """Move a square onto a target square, seen only through pixels.

    :param size: side of the square frame in pixels; observations are ``(size, size, 3)`` uint8.
    :param continuous: ``Box(-1, 1, (2,))`` actions (a velocity) instead of ``Discrete(5)``.
    :param square: side of both squares as a fraction of ``size``.
    :param step_size: distance moved per step at full action, in units of the free range.
    :param reach_radius: the episode ends with ``+1`` when the centres are closer than this.
    :param render_mode: ``None`` or ``"rgb_array"`` (the observation itself).

    Example:
        >>> env = ReachEnv(size=32)
        >>> obs, info = env.reset(seed=0)
        >>> obs.shape, obs.dtype, info["state"].shape
        ((32, 32, 3), dtype('uint8'), (4,))
    """

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 30}  # noqa: RUF012

    background = (40, 40, 48)
    agent_color = (230, 60, 60)
    target_color = (60, 200, 90)

    def __init__(
        self,
        size: int = 64,
        continuous: bool = False,
        square: float = 0.25,
        step_size: float = 0.05,
        reach_radius: float = 0.08,
        render_mode: str | None = None,
    ) -> None:
        if size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {size}")
        if not 0.0 < square < 1.0:
            raise ValueError(f"square must be in (0, 1), got {square}")
        self.size = size
        self.continuous = continuous
        self.side = max(2, round(square * size))
        self.step_size = step_size
        self.reach_radius = reach_radius
        self.render_mode = render_mode
        self.observation_space = spaces.Box(0, 255, (size, size, 3), np.uint8)
        self.action_space: spaces.Space[Any] = (
            spaces.Box(-1.0, 1.0, (2,), np.float32) if continuous else spaces.Discrete(5)
        )
        self._free = size - self.side  # top-left corners live in [0, free] pixels
        self._canvas = np.empty((size, size, 3), np.uint8)
        self._canvas[:] = self.background
        self._agent = np.zeros(2)
        self._target = np.zeros(2)

    def _corner(self, pos: np.ndarray) -> tuple[int, int]:
        x, y = np.rint(pos * self._free).astype(int)
        return int(x), int(y)

    def _draw(self) -> np.ndarray:
        frame = self._canvas.copy()
        s = self.side
        for pos, color in ((self._target, self.target_color), (self._agent, self.agent_color)):
            x, y = self._corner(pos)
            frame[y : y + s, x : x + s] = color
        return frame

    def _state(self) -> np.ndarray:
        return np.concatenate([self._agent, self._target]).astype(np.float32)

    def _distance(self) -> float:
        return float(np.linalg.norm(self._agent - self._target))

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Place the agent and the target uniformly at random, at least 0.3 apart."""
        super().reset(seed=seed)
        self._agent = self.np_random.uniform(0.0, 1.0, 2)
        self._target = self.np_random.uniform(0.0, 1.0, 2)
        while self._distance() < 0.3:
            self._target = self.np_random.uniform(0.0, 1.0, 2)
        return self._draw(), {"state": self._state()}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Move the agent; reward ``-0.05 * distance``, plus 1 and the end when it arrives."""
        if self.continuous:
            move = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1.0, 1.0)
        else:
            move = _MOVES[int(action)]
        self._agent = np.clip(self._agent + self.step_size * move, 0.0, 1.0)
        distance = self._distance()
        reached = distance < self.reach_radius
        reward = -0.05 * distance + (1.0 if reached else 0.0)
        return self._draw(), reward, reached, False, {"state": self._state()}

    def render(self) -> np.ndarray | None:
        """The current frame when ``render_mode == "rgb_array"``."""
        return self._draw() if self.render_mode == "rgb_array" else None
