"""The EnvPool backend (``env.backend: envpool``): CarRacing and Atari on EnvPool's C++ engine.

EnvPool (``pip install "worldmodel[fast]"``) steps many envs in its own threads. This module
turns its batched output into exactly what the Gymnasium backend (:mod:`envs.factory`) yields:
``uint8`` frames ``(image_size, image_size, C)``, HWC, one frame per agent step.

* Ids: Gymnasium's ``ALE/<Game>-v5`` is EnvPool's ``<Game>-v5``; ``CarRacing-v3`` keeps its name.
  Other envs are not supported by this backend (:class:`~envs.factory.UnknownEnvError`).
* Atari: EnvPool's own preprocessing is configured like our ``AtariPreprocessing``: frame skip
  ``env.frame_skip`` with max-pooling of the last two frames, ``INTER_AREA`` resize to
  ``image_size``, grayscale or RGB, up to 30 no-op starts, no FIRE on reset, no episodic life,
  no reward clipping, one frame (no stack), ALE v5's sticky actions (0.25) and its 108,000-frame
  cap; EnvPool's ``(C, H, W)`` frames are transposed to ``(H, W, C)``.
* CarRacing: EnvPool's 96x96 RGB frames go through :func:`preprocess_frames`, the same
  operations as the Gymnasium wrappers (frame skip summing rewards, dashboard crop, resize,
  grayscale) applied to the whole batch at once, bit-identical to the wrappers on the same raw
  frame. ``env.kwargs.continuous=false`` maps Gymnasium's 5 discrete actions to the continuous
  ones Gymnasium's own env uses for them.
* Time limits: ``env.max_episode_steps`` (agent steps) is EnvPool's ``max_episode_steps``
  (raw steps for CarRacing, where we skip frames ourselves), combined with the game's own cap.

What differs from Gymnasium: EnvPool's tracks and Atari no-op counts come from its own RNG, so a
seed gives other (equally random) episodes than Gymnasium's; each EnvPool env is seeded once,
when the pool is built (``reset(seed=...)`` of :class:`EnvPoolEnv` therefore rebuilds its pool:
~3 ms for CarRacing, ~0.2 s for Atari, like ALE's own re-seeding), and an env that ended resets
on its next ``step`` unless reset explicitly (:class:`EnvPoolBatch` leaves that to the caller;
:class:`EnvPoolEnv` and the SB3 adapter in :mod:`envs.envpool_vec` hide it).
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.error import DependencyNotInstalled

from envs.config import Crop, EnvConfig
from envs.factory import DEFAULT_CROP, UnknownEnvError, check_atari_crop
from envs.wrappers import EnvConfigError, check_crop

if TYPE_CHECKING:
    from stable_baselines3.common.vec_env import VecEnv

PoolFamily = Literal["atari", "carracing"]

ENVPOOL_EXTRA = 'pip install "worldmodel[fast]"'
#: ALE v5's ``max_num_frames_per_episode`` (Gymnasium's Atari truncation, in emulator frames).
ATARI_MAX_FRAMES = 108_000
#: Gymnasium's CarRacing time limit, in raw env steps.
CARRACING_MAX_STEPS = 1000
#: Frames per second of the games (Gymnasium's metadata), for videos.
RENDER_FPS: dict[str, int] = {"atari": 30, "carracing": 50}
#: Gymnasium's CarRacing ``continuous=False`` actions (nothing, right, left, gas, brake) as the
#: continuous (steer, gas, brake) actions its ``step`` applies for them.
CARRACING_DISCRETE = np.array(
    [[0.0, 0.0, 0.0], [0.6, 0.0, 0.0], [-0.6, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, 0.8]],
    np.float32,
)
#: ``GrayscaleObservation``'s weights (applied in float64 and truncated, as it does).
GRAY_WEIGHTS = (0.2125, 0.7154, 0.0721)
#: Gymnasium ``env.kwargs`` of ALE envs that EnvPool's Atari envs take under the same name.
_ATARI_SAME = ("repeat_action_probability", "full_action_space", "mode", "difficulty")
#: EnvPool settings this module decides; ``env.kwargs`` may not override them.
_RESERVED = {
    "num_envs", "batch_size", "num_threads", "seed", "env_seed", "max_num_players",
    "thread_affinity_offset", "base_path", "gym_reset_return_info", "img_height", "img_width",
    "gray_scale", "frame_skip", "stack_num", "max_episode_steps",
}


class EnvPoolSettingError(EnvConfigError):
    """An ``env`` setting that only the EnvPool backend cannot honour (the CLI prints one line).

    A kind of :class:`~envs.EnvConfigError`; mistakes that no backend accepts (a crop of an
    Atari game, a crop larger than the frame) raise :class:`~envs.EnvConfigError` itself.
    """


def import_envpool() -> Any:
    """The ``envpool`` module, or a one-line error naming the extra that installs it."""
    try:
        import envpool
    except ImportError as e:
        raise DependencyNotInstalled(
            f"env.backend=envpool needs EnvPool, which is not installed: run `{ENVPOOL_EXTRA}` "
            "(or set env.backend=gymnasium)"
        ) from e
    return envpool


def envpool_task(env_id: str) -> tuple[str, PoolFamily]:
    """EnvPool's id for a Gymnasium env id, and its family.

    ``ALE/Pong-v5`` gives ``("Pong-v5", "atari")``, ``CarRacing-v3`` ``("CarRacing-v3",
    "carracing")``.

    :raises UnknownEnvError: EnvPool has no such env, or this backend does not support it
        (close matches are suggested).
    """
    envpool = import_envpool()
    from envpool.registration import registry

    specs: dict[str, tuple[str, str, dict[str, Any]]] = registry.specs
    if env_id.startswith("ALE/"):
        task = env_id.removeprefix("ALE/")
        if specs.get(task, ("",))[0] == "envpool.atari":
            return task, "atari"
    elif env_id.startswith("CarRacing") and env_id in specs:
        return env_id, "carracing"
    supported = [f"ALE/{t}" for t, s in specs.items() if s[0] == "envpool.atari"]
    supported += [t for t in envpool.list_all_envs() if t.startswith("CarRacing")]
    matches = difflib.get_close_matches(env_id, supported, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(matches)}? " if matches else ""
    raise UnknownEnvError(
        f"env.backend=envpool has no env {env_id!r}: {hint}it runs CarRacing-v3 and the Atari "
        "games as ALE/<Game>-v5 (EnvPool's <Game>-v5); use env.backend=gymnasium for other envs"
    )


def default_threads(n_envs: int) -> int:
    """EnvPool worker threads for ``n_envs`` envs: one per env, at most one per usable core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(n_envs, cores))


def pool_seed(seed: int) -> int:
    """A seed in EnvPool's range (non-negative int32).

    Example:
        >>> pool_seed(3), pool_seed(2**31 + 3)
        (3, 3)
    """
    return int(seed) % 2**31


#: Raw frame sizes ``(H, W)`` of the EnvPool families whose frames we crop ourselves.
RAW_FRAME = {"carracing": (96, 96)}


def _check_crop(crop: Crop, family: str) -> None:
    """Raise :class:`EnvConfigError` when ``crop`` leaves nothing of the raw frame."""
    if family in RAW_FRAME:
        check_crop(crop, *RAW_FRAME[family])


def _atari_kwargs(cfg: EnvConfig, user: dict[str, Any]) -> dict[str, Any]:
    check_atari_crop(cfg)
    limit = ATARI_MAX_FRAMES // cfg.frame_skip
    if "max_num_frames_per_episode" in user:
        limit = int(user.pop("max_num_frames_per_episode")) // cfg.frame_skip
    user.pop("obs_type", None)  # Gymnasium's ALE screen type: our frames follow env.grayscale
    kwargs: dict[str, Any] = {
        "img_height": cfg.image_size, "img_width": cfg.image_size,
        "gray_scale": cfg.grayscale, "frame_skip": cfg.frame_skip, "stack_num": 1,
        "noop_max": 30, "episodic_life": False, "zero_discount_on_life_loss": False,
        "reward_clip": False, "use_fire_reset": False, "use_inter_area_resize": True,
        "repeat_action_probability": 0.25, "full_action_space": False,
    }
    for key in _ATARI_SAME:
        if key in user:
            kwargs[key] = user.pop(key)
    if cfg.max_episode_steps is not None:
        limit = min(limit, cfg.max_episode_steps)
    kwargs["max_episode_steps"] = limit
    return kwargs


def _carracing_kwargs(cfg: EnvConfig, user: dict[str, Any]) -> dict[str, Any]:
    user.pop("continuous", None)  # handled by EnvPoolBatch (action mapping)
    if user.pop("domain_randomize", False):
        raise EnvPoolSettingError(
            "EnvPool's CarRacing has no domain_randomize; use env.backend=gymnasium"
        )
    limit = CARRACING_MAX_STEPS
    if cfg.max_episode_steps is not None:
        limit = min(limit, cfg.max_episode_steps * cfg.frame_skip)
    return {"max_episode_steps": limit}


def pool_kwargs(cfg: EnvConfig, task: str, family: PoolFamily) -> dict[str, Any]:
    """EnvPool ``make`` settings for ``cfg`` (without ``num_envs``, threads and seeds).

    ``env.kwargs`` may hold Gymnasium's names (ALE's ``repeat_action_probability``,
    ``full_action_space``, ``mode``, ``difficulty``, ``max_num_frames_per_episode``; CarRacing's
    ``continuous``, ``lap_complete_percent``) or any other EnvPool setting of the game.

    :raises EnvPoolSettingError: a setting that EnvPool does not know or that this module
        decides.
    """
    user = dict(cfg.kwargs)
    if family == "atari":
        kwargs = _atari_kwargs(cfg, user)
    else:
        kwargs = _carracing_kwargs(cfg, user)
    envpool = import_envpool()
    known = set(envpool.make_spec(task).config._fields) - _RESERVED
    unknown = sorted(set(user) - known)
    if unknown:
        raise EnvPoolSettingError(
            f"env.kwargs {', '.join(unknown)} not supported by EnvPool's {task} (it takes "
            f"{', '.join(sorted(known))}); use env.backend=gymnasium"
        )
    return {**kwargs, **user}


def preprocess_frames(
    frames: np.ndarray, crop: Crop, image_size: int, grayscale: bool
) -> np.ndarray:
    """Crop, resize and grayscale a batch of frames like the Gymnasium backend's wrappers.

    Same operations, same order and same arithmetic as ``CropObservation``, ``ShrinkObservation``
    (for frames over 4x the target), ``ResizeObservation`` (OpenCV ``INTER_AREA``) and
    ``GrayscaleObservation`` (float64 weights, truncated), so each output frame is bit-identical
    to the wrappers' output on the same raw frame.

    :param frames: ``(N, H, W, 3)`` uint8 raw frames.
    :param crop: pixels removed from each border first.
    :param image_size: output side.
    :param grayscale: one channel instead of RGB.
    :return: ``(N, image_size, image_size, 1 or 3)`` uint8.

    Example:
        >>> out = preprocess_frames(np.zeros((2, 96, 96, 3), np.uint8), Crop(bottom=12), 64, True)
        >>> out.shape, out.dtype
        ((2, 64, 64, 1), dtype('uint8'))
    """
    import cv2

    n, height, width = frames.shape[:3]
    frames = frames[:, crop.top : height - crop.bottom, crop.left : width - crop.right]
    height, width = frames.shape[1:3]
    if (height, width) != (image_size, image_size):
        size = (image_size, image_size)
        shrink = min(height, width) > 4 * image_size
        out = np.empty((n, image_size, image_size, frames.shape[3]), np.uint8)
        for i in range(n):
            frame = frames[i]
            if shrink:
                frame = cv2.resize(frame, (2 * image_size, 2 * image_size),
                                   interpolation=cv2.INTER_LINEAR)
            out[i] = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        frames = out
    if grayscale:
        r, g, b = GRAY_WEIGHTS  # (r*wr + g*wg) + b*wb: the order of np.sum over the channels
        gray = frames[..., 0] * r + frames[..., 1] * g + frames[..., 2] * b
        frames = gray.astype(np.uint8)[..., None]
    return np.ascontiguousarray(frames)


def _action_space(task: str, family: PoolFamily, kwargs: dict[str, Any],
                  continuous: bool) -> spaces.Space[Any]:
    if family == "carracing":
        if not continuous:
            return spaces.Discrete(len(CARRACING_DISCRETE))
        return spaces.Box(np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = import_envpool().make_spec(task, **kwargs).gymnasium_action_space
    return spaces.Discrete(int(space.n))


class EnvPoolBatch:
    """``n`` EnvPool envs of one game with our preprocessing, stepped together or by subsets.

    :meth:`step` is :meth:`send` (returns at once; EnvPool's threads step the envs) then
    :meth:`recv` (waits, does the rest of the frame skip, preprocesses the frames), so a caller
    can work while the envs step. An env whose episode ended (``terminated | truncated``) must be
    reset with :meth:`reset` before it steps again (otherwise EnvPool resets it on that step and
    ignores the action).

    :param cfg: the ``env`` config section (``backend`` is not read).
    :param seeds: one seed per env; env ``i`` is built with ``pool_seed(seeds[i])``.
    :param num_threads: EnvPool worker threads (default :func:`default_threads`).
    :param render_mode: ``"rgb_array"`` makes :meth:`render` return the games' full frames.
    """

    def __init__(
        self,
        cfg: EnvConfig,
        seeds: Sequence[int],
        *,
        num_threads: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.cfg = cfg
        self.task, self.family = envpool_task(cfg.id)
        self.kwargs = pool_kwargs(cfg, self.task, self.family)
        self.num_envs = len(seeds)
        if self.num_envs < 1:
            raise ValueError("EnvPoolBatch needs at least one env")
        self.num_threads = num_threads or default_threads(self.num_envs)
        self.render_mode = render_mode
        self.continuous = bool(cfg.kwargs.get("continuous", True))
        self.crop = cfg.crop if cfg.crop is not None else DEFAULT_CROP.get(self.family, Crop())
        _check_crop(self.crop, self.family)
        self.observation_space = spaces.Box(0, 255, cfg.obs_shape, np.uint8)
        self.action_space = _action_space(self.task, self.family, self.kwargs, self.continuous)
        self._all = np.arange(self.num_envs, dtype=np.int32)
        self._pool: Any = None
        self._pending: tuple[np.ndarray, np.ndarray] | None = None
        self._state_index: dict[str, int] | None = None
        self.seeds: list[int] = []
        self.reseed(seeds)

    def reseed(self, seeds: Sequence[int]) -> None:
        """Rebuild the pool with new seeds (EnvPool seeds its envs only when built)."""
        if len(seeds) != self.num_envs:
            raise ValueError(f"{self.num_envs} envs need {self.num_envs} seeds, got {len(seeds)}")
        self.close()
        self._pending = None
        self.seeds = [pool_seed(s) for s in seeds]
        extra = {"render_mode": self.render_mode} if self.render_mode else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Box precision notes from EnvPool's spaces
            self._pool = import_envpool().make_gymnasium(
                self.task, num_envs=self.num_envs, batch_size=self.num_envs,
                num_threads=self.num_threads, seed=self.seeds, **self.kwargs, **extra,
            )
        self._state_index = self._direct_api(self._pool)

    @staticmethod
    def _direct_api(pool: Any) -> dict[str, int] | None:
        """Where EnvPool's raw step results are, if its low-level API is the one we know.

        Stepping through ``_send``/``_recv`` skips EnvPool's generic Python conversions (~50 us
        per call, as much as our preprocessing of a frame); any other EnvPool falls back to its
        public ``send``/``recv``.
        """
        try:
            actions, states = list(pool._action_keys), list(pool._state_keys)
        except AttributeError:  # pragma: no cover - another EnvPool version
            return None
        wanted = ("info:env_id", "done", "trunc", "reward", "obs")
        if actions != ["env_id", "players.env_id", "action"] or not set(wanted) <= set(states):
            return None  # pragma: no cover - another EnvPool version
        return {k: states.index(k) for k in (*wanted, "info:lives") if k in states}

    def _ids(self, env_ids: np.ndarray | Sequence[int] | None) -> np.ndarray:
        if env_ids is None:
            return self._all
        ids = np.asarray(env_ids, np.int32).reshape(-1)
        if len(ids) > 1 and not (np.diff(ids) > 0).all():
            raise ValueError("env_ids must be increasing")
        return ids

    @staticmethod
    def _order(ids: np.ndarray, info: dict[str, Any]) -> np.ndarray | None:
        """Row permutation that puts EnvPool's results in the order of ``ids`` (None: already)."""
        got = np.asarray(info["env_id"])
        if np.array_equal(got, ids):
            return None
        return np.argsort(got, kind="stable")

    def _frames(self, obs: np.ndarray) -> np.ndarray:
        """EnvPool's batch of observations -> our ``(k, H, W, C)`` uint8 frames."""
        if self.family == "atari":  # EnvPool preprocessed it: (k, C, H, W) -> (k, H, W, C)
            return np.ascontiguousarray(obs.transpose(0, 2, 3, 1))
        return preprocess_frames(obs, self.crop, self.cfg.image_size, self.cfg.grayscale)

    def _info(self, info: dict[str, Any], order: np.ndarray | None) -> dict[str, np.ndarray]:
        out = {"env_id": np.asarray(info["env_id"])}
        if "lives" in info:
            out["lives"] = np.asarray(info["lives"])
        return out if order is None else {k: v[order] for k, v in out.items()}

    def reset(
        self, env_ids: np.ndarray | Sequence[int] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Start new episodes in ``env_ids`` (default all; increasing ids).

        :return: frames ``(k, H, W, C)`` uint8 in the order of ``env_ids``, and info arrays
            (``env_id``; ``lives`` for Atari).
        """
        if self._pending is not None:
            raise RuntimeError("recv() the pending step before a reset")
        ids = self._ids(env_ids)
        obs, info = self._pool.reset(ids)
        order = self._order(ids, info)
        if order is not None:
            obs = obs[order]
        return self._frames(obs), self._info(info, order)

    def _send(self, acts: np.ndarray, ids: np.ndarray) -> None:
        if self._state_index is None:
            self._pool.send(acts, ids)
        else:  # single-player envs: players.env_id is env_id
            self._pool._send([ids, ids, np.ascontiguousarray(acts)])

    def _recv(self) -> tuple[Any, ...]:
        if self._state_index is None:
            return tuple(self._pool.recv())
        index, state = self._state_index, self._pool._recv()
        info = {"env_id": state[index["info:env_id"]]}
        if "info:lives" in index:
            info["lives"] = state[index["info:lives"]]
        done, truncated = state[index["done"]], state[index["trunc"]]
        return state[index["obs"]], state[index["reward"]], done & ~truncated, truncated, info

    def _step_raw(self, acts: np.ndarray, ids: np.ndarray) -> tuple[Any, ...]:
        self._send(acts, ids)
        return self._recv()

    def _ordered(
        self, ids: np.ndarray, out: tuple[Any, ...]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        obs, reward, terminated, truncated, info = out
        order = self._order(ids, info)
        if order is not None:
            obs, reward = obs[order], reward[order]
            terminated, truncated = terminated[order], truncated[order]
        return obs, reward, terminated, truncated, self._info(info, order)

    def _actions(self, actions: Any, k: int) -> np.ndarray:
        if self.family == "atari":
            return np.asarray(actions, np.int32).reshape(k)
        if self.continuous:
            return np.asarray(actions, np.float32).reshape(k, -1)
        return CARRACING_DISCRETE[np.asarray(actions, np.int64).reshape(k)]  # Gymnasium's 5

    def send(self, actions: Any, env_ids: np.ndarray | Sequence[int] | None = None) -> None:
        """Start one agent step of the envs ``env_ids`` (default all) without waiting for it.

        :param actions: ``(k, ...)``, one action per env in ``env_ids``.
        """
        if self._pending is not None:
            raise RuntimeError("recv() the previous step first")
        ids = self._ids(env_ids)
        acts = self._actions(actions, len(ids))
        self._send(acts, ids)
        self._pending = (acts, ids)

    def recv(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Finish the step started by :meth:`send` (the rest of the frame skip happens here).

        :return: frames ``(k, H, W, C)`` uint8, summed rewards ``(k,)`` float64, ``terminated``
            and ``truncated`` ``(k,)`` bool, info arrays; rows in the order of ``env_ids``.
        """
        if self._pending is None:
            raise RuntimeError("send() a step first")
        acts, ids = self._pending
        self._pending = None
        obs, reward, terminated, truncated, info = self._ordered(ids, self._recv())
        total = reward.astype(np.float64)
        skip = self.cfg.frame_skip if self.family == "carracing" else 1  # Atari: inside EnvPool
        for _ in range(1, skip):  # like FrameSkip: an env whose episode ended stops stepping
            running = ~(terminated | truncated)
            if not running.any():
                break
            if running.all():
                obs, r, terminated, truncated, _ = self._ordered(ids, self._step_raw(acts, ids))
                total += r
                continue
            rows = np.flatnonzero(running)
            o, r, te, tr, _ = self._ordered(ids[rows], self._step_raw(acts[rows], ids[rows]))
            obs, terminated, truncated = obs.copy(), terminated.copy(), truncated.copy()
            obs[rows], terminated[rows], truncated[rows] = o, te, tr
            total[rows] += r
        return self._frames(obs), total, terminated.astype(bool), truncated.astype(bool), info

    def step(
        self, actions: Any, env_ids: np.ndarray | Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """One agent step of the envs ``env_ids`` (default all), ``env.frame_skip`` frames each.

        :param actions: ``(k, ...)``, one action per env in ``env_ids``.
        :return: as :meth:`recv`.
        """
        self.send(actions, env_ids)
        return self.recv()

    def render(self, env_ids: np.ndarray | Sequence[int] | None = None) -> np.ndarray | None:
        """The games' full RGB frames ``(k, H0, W0, 3)`` (``None`` without ``rgb_array``)."""
        if self.render_mode != "rgb_array":
            return None
        frames: np.ndarray = self._pool.render(self._ids(env_ids))
        return frames

    def close(self) -> None:
        """Stop EnvPool's threads."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None


class EnvPoolEnv(gym.Env[np.ndarray, Any]):
    """One EnvPool env as a Gymnasium env, with the semantics of the Gymnasium backend's envs.

    ``reset(seed=s)`` rebuilds the env with seed ``s`` (EnvPool seeds only at build time), so a
    seed always gives the same episode; ``reset()`` continues the env's random stream. Frames
    are ``uint8 (image_size, image_size, C)``; ``info`` holds ``lives`` for Atari games.

    :param cfg: the ``env`` config section.
    :param render_mode: ``"rgb_array"``: :meth:`render` returns the game's full frame.
    """

    def __init__(self, cfg: EnvConfig, render_mode: str | None = None) -> None:
        self.cfg = cfg
        self.render_mode = render_mode
        self.task, self.family = envpool_task(cfg.id)
        kwargs = pool_kwargs(cfg, self.task, self.family)
        continuous = bool(cfg.kwargs.get("continuous", True))
        self.observation_space = spaces.Box(0, 255, cfg.obs_shape, np.uint8)
        self.action_space = _action_space(self.task, self.family, kwargs, continuous)
        self.metadata = {"render_modes": ["rgb_array"], "render_fps": RENDER_FPS[self.family]}
        self._batch: EnvPoolBatch | None = None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode (with ``seed``: in a freshly built env seeded ``seed``)."""
        super().reset(seed=seed)
        if seed is not None or self._batch is None:
            env_seed = seed if seed is not None else int(self.np_random.integers(2**31))
            if self._batch is None:
                self._batch = EnvPoolBatch(self.cfg, [env_seed], num_threads=1,
                                           render_mode=self.render_mode)
            else:
                self._batch.reseed([env_seed])
        obs, info = self._batch.reset()
        return obs[0], self._scalar_info(info)

    @staticmethod
    def _scalar_info(info: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: v[0].item() for k, v in info.items() if k != "env_id"}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """One agent step (``env.frame_skip`` frames)."""
        if self._batch is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        obs, reward, terminated, truncated, info = self._batch.step(np.asarray(action)[None])
        return (obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]),
                self._scalar_info(info))

    def render(self) -> np.ndarray | None:
        """The game's full RGB frame with ``render_mode="rgb_array"``, else ``None``."""
        if self._batch is None:
            return None
        frames = self._batch.render()
        return None if frames is None else frames[0]

    def close(self) -> None:
        """Stop EnvPool's thread."""
        if self._batch is not None:
            self._batch.close()
            self._batch = None


def make_envpool_env(
    cfg: EnvConfig, *, render_mode: str | None = None, **overrides: Any
) -> gym.Env[np.ndarray, Any]:
    """One preprocessed EnvPool env (see :class:`EnvPoolEnv`); ``envs.make_env`` calls it.

    :param cfg: the ``env`` config section with ``backend: envpool``.
    :param render_mode: ``"rgb_array"`` for the game's full frames from ``render()``.
    :param overrides: extra EnvPool settings (on top of ``cfg.kwargs``).
    :return: an env whose observations are ``uint8`` arrays of shape ``cfg.obs_shape``.
    """
    if overrides:
        cfg = cfg.model_copy(update={"kwargs": {**cfg.kwargs, **overrides}})
    return EnvPoolEnv(cfg, render_mode=render_mode)


def make_envpool_vec_env(
    cfg: EnvConfig,
    *,
    n_envs: int,
    seed: int = 0,
    num_threads: int | None = None,
    render_mode: str | None = None,
) -> VecEnv:
    """``n_envs`` EnvPool envs in one pool as an SB3 VecEnv (see :mod:`envs.envpool_vec`).

    Env ``i`` is seeded ``seed + i``; a ``VecMonitor`` adds episode returns and lengths
    (``info["episode"]``), as ``Monitor`` does for the Gymnasium backend.

    :param num_threads: EnvPool worker threads (default: one per env, at most one per core).
    :return: a VecEnv with ``uint8`` observations ``(n_envs, H, W, C)``.
    """
    from envs.envpool_vec import make_envpool_vec_env as make

    return make(cfg, n_envs=n_envs, seed=seed, num_threads=num_threads, render_mode=render_mode)
