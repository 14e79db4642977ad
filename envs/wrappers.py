"""Frame preprocessing wrappers that Gymnasium does not ship.

Gymnasium's own wrappers (``ResizeObservation``, ``GrayscaleObservation``,
``AtariPreprocessing``, ``AddRenderObservation``, ``TimeLimit``) are used for everything else.
"""

from __future__ import annotations

from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.config import Crop


class EnvConfigError(gym.error.Error, ValueError):
    """An ``env`` setting that cannot work for this game (the CLI prints it as one line)."""


def check_crop(crop: Crop, h: int, w: int) -> None:
    """Raise :class:`EnvConfigError` when ``crop`` leaves nothing of ``(h, w)`` frames."""
    if crop.top + crop.bottom >= h or crop.left + crop.right >= w:
        raise EnvConfigError(
            f"env.crop {crop.model_dump()} leaves nothing of the {h}x{w} frame (HxW): "
            f"keep top + bottom below {h} and left + right below {w}"
        )


class CropObservation(gym.ObservationWrapper[np.ndarray, Any, np.ndarray]):
    """Remove pixels from the borders of ``(H, W, C)`` image observations.

    Example:
        >>> from envs.reach import ReachEnv
        >>> env = CropObservation(ReachEnv(size=32), Crop(bottom=4, left=2))
        >>> env.reset(seed=0)[0].shape
        (28, 30, 3)
    """

    def __init__(self, env: gym.Env[np.ndarray, Any], crop: Crop) -> None:
        super().__init__(env)
        space = env.observation_space
        assert isinstance(space, spaces.Box) and space.shape is not None
        h, w = space.shape[:2]
        check_crop(crop, h, w)
        self._rows = slice(crop.top, h - crop.bottom)
        self._cols = slice(crop.left, w - crop.right)
        shape = (h - crop.top - crop.bottom, w - crop.left - crop.right, *space.shape[2:])
        self.observation_space = spaces.Box(0, 255, shape, np.uint8)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        """Crop one frame: ``(H, W, C)`` -> ``(H - top - bottom, W - left - right, C)``."""
        return observation[self._rows, self._cols]


class FrameSkip(gym.Wrapper[Any, Any, Any, Any]):
    """Repeat each action ``skip`` times and sum the rewards (rl-baselines3-zoo's ``FrameSkip``).

    Unlike Gymnasium's ``MaxAndSkipObservation`` it does not max-pool frames, which suits games
    without Atari's sprite flicker (CarRacing).
    """

    def __init__(self, env: gym.Env[Any, Any], skip: int) -> None:
        if skip < 1:
            raise ValueError(f"skip must be >= 1, got {skip}")
        super().__init__(env)
        self.skip = skip

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        """Step ``skip`` times (fewer if the episode ends); return the last frame, summed reward."""
        total = 0.0
        for _ in range(self.skip):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, info


class ShrinkObservation(gym.ObservationWrapper[np.ndarray, Any, np.ndarray]):
    """Quickly shrink large ``(H, W, C)`` frames to ``(height, width, C)`` with bilinear sampling.

    OpenCV's area interpolation, which ``ResizeObservation`` uses, costs ~0.7 ms for CartPole's
    400x600 render to 64x64; bilinear costs ~0.02 ms but drops thin lines at big factors. Shrinking
    bilinearly to twice the target size first, then letting ``ResizeObservation`` average 2x2
    blocks, keeps thin lines (CartPole's pole) at a fraction of the cost.

    Example:
        >>> from envs.reach import ReachEnv
        >>> ShrinkObservation(ReachEnv(size=64), 16, 24).reset(seed=0)[0].shape
        (16, 24, 3)
    """

    def __init__(self, env: gym.Env[np.ndarray, Any], height: int, width: int) -> None:
        super().__init__(env)
        space = env.observation_space
        assert isinstance(space, spaces.Box) and space.shape is not None
        self._size = (width, height)  # OpenCV order
        self.observation_space = spaces.Box(0, 255, (height, width, *space.shape[2:]), np.uint8)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        """Shrink one frame: ``(H, W, C)`` -> ``(height, width, C)``."""
        import cv2

        out = cv2.resize(observation, self._size, interpolation=cv2.INTER_LINEAR)
        return out.reshape(self.observation_space.shape)  # cv2 drops a trailing 1-channel axis
