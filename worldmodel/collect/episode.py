"""One episode: the episode loop shared by every backend, and the frame buffers it fills.

:func:`run_episode` steps an env with a policy and keeps everything but the frames as Python
lists (:class:`Steps`); frames are copied into a reused :class:`FrameBuffer` (a worker's
buffers live in shared memory, see :mod:`worldmodel.collect.writer`), or kept as a list when
:func:`rollout` plays an episode outside a collection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from worldmodel.collect.policies import Policy
from worldmodel.dataset import Episode

if TYPE_CHECKING:
    import gymnasium as gym


@dataclass
class Steps:
    """An episode as Python lists (frames may go to a :class:`FrameBuffer` instead)."""

    obs: list[np.ndarray] = field(default_factory=list)
    action: list[Any] = field(default_factory=list)
    reward: list[Any] = field(default_factory=list)  # floats (as the env returns them)
    terminated: list[Any] = field(default_factory=list)  # bools (Python or NumPy)
    truncated: list[Any] = field(default_factory=list)
    state: list[np.ndarray] | None = None

    @property
    def length(self) -> int:
        """Steps taken."""
        return len(self.reward)


class FrameBuffer:
    """A reused, growable ``(capacity, H, W, C)`` uint8 array that frames are copied into.

    Keeping every frame object alive until a commit would make each step allocate fresh memory
    (page faults, cold caches); copying into two reused buffers keeps the env loop as cheap as
    a bare loop and hands the writer one contiguous array. Subclasses choose where the array
    lives (:meth:`_allocate`; a worker's buffers are shared with its writer process).
    """

    def __init__(self, frame_shape: tuple[int, ...], capacity: int) -> None:
        self.frame_shape = tuple(frame_shape)
        self.data = self._allocate(max(capacity, 1))
        self.n = 0

    def _allocate(self, capacity: int) -> np.ndarray:
        """A new ``(capacity, H, W, C)`` uint8 array."""
        return np.empty((capacity, *self.frame_shape), np.uint8)

    def append(self, frame: np.ndarray) -> None:
        """Append one ``(H, W, C)`` frame."""
        if self.n == len(self.data):  # a long episode: grow (rare)
            self._grow(self.n + 1)
        self.data[self.n] = frame
        self.n += 1

    def extend(self, frames: np.ndarray) -> None:
        """Append ``(T, H, W, C)`` frames."""
        if self.n + len(frames) > len(self.data):
            self._grow(self.n + len(frames))
        self.data[self.n : self.n + len(frames)] = frames
        self.n += len(frames)

    def _grow(self, need: int) -> None:
        old = self.data
        self.data = self._allocate(max(need, 2 * len(old)))
        self.data[: self.n] = old[: self.n]


def run_episode(
    env: gym.Env[np.ndarray, Any],
    policy: Policy,
    env_seed: int,
    policy_seed: int,
    max_steps: int | None = None,
    on_steps: Callable[[int], None] | None = None,
    obs_sink: Callable[[np.ndarray], None] | None = None,
) -> Steps:
    """Play one episode; frames go to ``obs_sink`` (default: the returned ``obs`` list).

    ``on_steps(n)`` is told about every 64 steps (and the remainder at the end).
    """
    seed = getattr(policy, "seed", None)
    if callable(seed):
        seed(policy_seed)
    obs, info = env.reset(seed=env_seed)
    policy.reset(obs, info)
    ep = Steps(state=[] if "state" in info else None)
    # Hot loop (Reach steps in ~13 us): bound methods and locals, plain values in the lists
    # (np.asarray converts them when the batch is stacked).
    keep_obs = ep.obs.append if obs_sink is None else obs_sink
    states = ep.state
    act, step = policy.act, env.step
    add_action, add_reward = ep.action.append, ep.reward.append
    add_terminated, add_truncated = ep.terminated.append, ep.truncated.append
    cap = -1 if max_steps is None else max(max_steps, 1)
    t = 0
    while True:
        keep_obs(obs)
        if states is not None:
            states.append(info["state"])
        action = act(obs, info)
        obs, reward, terminated, truncated, info = step(action)
        t += 1
        if t == cap:
            truncated = True
        add_action(action)
        add_reward(reward)
        add_terminated(terminated)
        add_truncated(truncated)
        if terminated or truncated:
            break
        if on_steps is not None and not t & 63:
            on_steps(64)
    if on_steps is not None:
        on_steps(t % 64 or 64)
    return ep


def rollout(
    env: gym.Env[np.ndarray, Any],
    policy: Policy,
    env_seed: int,
    policy_seed: int,
    max_steps: int | None = None,
) -> Episode:
    """Play one episode exactly as a collector worker does.

    :param env: a preprocessed env from ``envs.make_env``.
    :param policy: the policy; re-seeded with ``policy_seed`` when it has ``seed``.
    :param env_seed: passed to ``env.reset(seed=...)``.
    :param max_steps: truncate the episode after this many steps.
    :return: the episode; ``obs`` ``(T, H, W, C)`` uint8 holds the frames before each action.
    """
    ep = run_episode(env, policy, env_seed, policy_seed, max_steps)
    return Episode(
        obs=np.stack(ep.obs),
        action=np.asarray(ep.action),
        reward=np.asarray(ep.reward, np.float32),
        terminated=np.asarray(ep.terminated, bool),
        truncated=np.asarray(ep.truncated, bool),
        state=None if ep.state is None else np.asarray(ep.state, np.float32),
    )

