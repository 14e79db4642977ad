"""``make_env`` and ``make_vec_env``: from an :class:`~envs.config.EnvConfig` to image envs.

Every env built here yields ``uint8`` frames ``(image_size, image_size, C)``. The recipe depends
on the env's family:

* ``worldmodel/...`` (ours): drawn at the target size directly.
* Atari (``ALE/...``): Gymnasium's ``AtariPreprocessing`` (no-op starts, frame skip, resize,
  grayscale) on an ALE env with ``frameskip=1``.
* ``CarRacing``: frame skip, dashboard crop, ``ResizeObservation``.
* anything else with image observations: crop and resize; with vector observations (classic
  control such as CartPole): pixels from ``render()`` via ``AddRenderObservation``, then resize.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from typing import TYPE_CHECKING, Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.registration import load_env_creator
from gymnasium.error import DependencyNotInstalled
from gymnasium.wrappers import (
    AddRenderObservation,
    AtariPreprocessing,
    GrayscaleObservation,
    ResizeObservation,
    TimeLimit,
)

from envs.config import Crop, EnvConfig
from envs.wrappers import CropObservation, EnvConfigError, FrameSkip, ShrinkObservation

if TYPE_CHECKING:
    from stable_baselines3.common.vec_env import VecEnv

Family = Literal["worldmodel", "atari", "carracing", "image", "render"]

#: Each family's default border crop (CarRacing: the 12-row dashboard at the bottom).
DEFAULT_CROP: dict[str, Crop] = {"carracing": Crop(bottom=12)}

ATARI_EXTRA = 'pip install "worldmodel[atari]"'

__all__ = [
    "EnvConfigError",
    "UnknownEnvError",
    "check_atari_crop",
    "check_env_id",
    "env_family",
    "make_env",
    "make_vec_env",
]


class UnknownEnvError(gym.error.Error):
    """The env id is not registered with Gymnasium (nor with EnvPool for that backend)."""


def _register_optional_envs(env_id: str) -> None:
    """Register the env families that live in optional packages (ALE) when they are needed."""
    if env_id.startswith("ALE/"):
        try:
            import ale_py
        except ImportError as e:
            raise DependencyNotInstalled(
                f"{env_id} needs the Arcade Learning Environment: run `{ATARI_EXTRA}`"
            ) from e
        gym.register_envs(ale_py)


def check_env_id(env_id: str) -> None:
    """Raise :class:`UnknownEnvError` with close matches when ``env_id`` is not registered."""
    _register_optional_envs(env_id)
    if env_id in gym.registry:
        return
    matches = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(matches)}? " if matches else ""
    raise UnknownEnvError(
        f"unknown env id {env_id!r}: {hint}Atari games need `{ATARI_EXTRA}` and ids like "
        "ALE/Pong-v5; see `python -c 'import gymnasium; gymnasium.pprint_registry()'`"
    )


def env_family(env_id: str) -> Family:
    """Which preprocessing recipe ``env_id`` gets (needs the id to be registered)."""
    if env_id.startswith("worldmodel/"):
        return "worldmodel"
    if env_id.startswith("ALE/"):
        return "atari"
    if env_id.startswith("CarRacing"):
        return "carracing"
    space = gym.spec(env_id).kwargs.get("observation_space")  # rarely set; fall back to probing
    if space is None:
        probe = gym.make(env_id)
        space = probe.observation_space
        probe.close()
    return "image" if _is_image_space(space) else "render"


def _is_image_space(space: spaces.Space[Any]) -> bool:
    return (
        isinstance(space, spaces.Box)
        and space.dtype == np.uint8
        and len(space.shape) == 3
        and space.shape[-1] in (1, 3, 4)
    )


def make_env(
    cfg: EnvConfig, *, render_mode: str | None = None, **overrides: Any
) -> gym.Env[np.ndarray, Any]:
    """Build one preprocessed image env.

    :param cfg: the ``env`` config section.
    :param render_mode: passed to the base env (``"rgb_array"`` for videos of the raw game).
    :param overrides: extra keyword arguments for ``gymnasium.make`` (on top of ``cfg.kwargs``).
    :return: an env whose observations are ``uint8`` arrays of shape ``cfg.obs_shape``.

    Example:
        >>> env = make_env(EnvConfig(image_size=32))
        >>> env.reset(seed=0)[0].shape
        (32, 32, 3)
    """
    if cfg.backend == "envpool":
        from envs.envpool import make_envpool_env

        return make_envpool_env(cfg, render_mode=render_mode, **overrides)
    check_env_id(cfg.id)
    family = env_family(cfg.id)
    kwargs = {**cfg.kwargs, **overrides}
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    if family == "atari":
        env = _make_atari(cfg, kwargs)
    else:
        env = _make_generic(cfg, family, kwargs)
    if cfg.max_episode_steps is not None:
        env = TimeLimit(env, cfg.max_episode_steps)
    if env.observation_space.shape != cfg.obs_shape:
        raise RuntimeError(f"built {env.observation_space.shape} frames, wanted {cfg.obs_shape}")
    return env


def check_atari_crop(cfg: EnvConfig) -> None:
    """Raise :class:`EnvConfigError` when ``cfg`` crops an Atari game.

    Both backends resize the whole screen themselves (Gymnasium's ``AtariPreprocessing``,
    EnvPool's Atari envs), so a crop cannot be honoured; the same error for both.
    """
    if cfg.crop is not None and not cfg.crop.is_empty():
        raise EnvConfigError(
            f"env.crop is not supported for Atari games ({cfg.id}: the whole 210x160 screen is "
            "resized to env.image_size); remove env.crop"
        )


_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


def _accepted_kwargs(env_id: str) -> list[str]:
    """The keyword arguments ``env_id``'s class takes (empty when they cannot be read)."""
    try:
        entry = gym.spec(env_id).entry_point
        creator = load_env_creator(entry) if isinstance(entry, str) else entry
        params = inspect.signature(creator).parameters.values()  # type: ignore[arg-type]
    except Exception:  # an exotic entry point: the message just lists no keys
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.name != "self"]


def _gym_make(cfg: EnvConfig, **kwargs: Any) -> gym.Env[Any, Any]:
    """``gym.make(cfg.id, **kwargs)``, with unknown keyword arguments as one-line errors.

    An ``env.kwargs`` key the env does not take is an :class:`EnvConfigError` naming it and the
    keys it takes (Gymnasium raises a ``TypeError`` from deep inside the env's constructor).
    """
    try:
        return gym.make(cfg.id, **kwargs)
    except TypeError as e:
        found = _UNEXPECTED.search(str(e))
        if found is None:
            raise
        key = found.group(1)
        where = f"env.kwargs.{key}" if key in cfg.kwargs else f"keyword argument {key!r}"
        accepted = _accepted_kwargs(cfg.id)
        valid = f"; valid keys: {', '.join(accepted)}" if accepted else ""
        raise EnvConfigError(
            f"{where}: {cfg.id} takes no such keyword argument{valid}; remove it"
        ) from None


def _make_atari(cfg: EnvConfig, kwargs: dict[str, Any]) -> gym.Env[np.ndarray, Any]:
    check_atari_crop(cfg)
    # AtariPreprocessing reads the screen itself: a grayscale base skips an RGB copy per frame.
    kwargs.setdefault("obs_type", "grayscale" if cfg.grayscale else "rgb")
    base = _gym_make(cfg, frameskip=1, **kwargs)
    return AtariPreprocessing(
        base,
        noop_max=30,
        frame_skip=cfg.frame_skip,
        screen_size=cfg.image_size,
        terminal_on_life_loss=False,
        grayscale_obs=cfg.grayscale,
        grayscale_newaxis=True,
        scale_obs=False,
    )


def _make_generic(
    cfg: EnvConfig, family: Family, kwargs: dict[str, Any]
) -> gym.Env[np.ndarray, Any]:
    if family == "worldmodel":
        kwargs.setdefault("size", cfg.image_size)
    if family == "render":
        kwargs["render_mode"] = "rgb_array"
    env: gym.Env[Any, Any] = _gym_make(cfg, **kwargs)
    if cfg.frame_skip > 1:
        env = FrameSkip(env, cfg.frame_skip)
    if family == "render":
        env = AddRenderObservation(env, render_only=True)
    crop = cfg.crop if cfg.crop is not None else DEFAULT_CROP.get(family, Crop())
    if not crop.is_empty():
        env = CropObservation(env, crop)
    height, width = env.observation_space.shape[:2]  # type: ignore[index]
    if (height, width) != (cfg.image_size, cfg.image_size):
        if min(height, width) > 4 * cfg.image_size:  # big renders (CartPole: 400x600)
            env = ShrinkObservation(env, 2 * cfg.image_size, 2 * cfg.image_size)
        env = ResizeObservation(env, (cfg.image_size, cfg.image_size))
    if cfg.grayscale:
        env = GrayscaleObservation(env, keep_dim=True)
    return env


def make_vec_env(
    cfg: EnvConfig,
    *,
    n_envs: int | None = None,
    seed: int = 0,
    vec_env: Literal["dummy", "subproc"] | None = None,
) -> VecEnv:
    """Build ``n_envs`` (default ``cfg.n_envs``) preprocessed envs as an SB3 ``VecEnv``.

    Each env is wrapped in SB3's ``Monitor`` (episode returns in ``info["episode"]``) and seeded
    with ``seed + rank``.

    :return: a VecEnv with ``uint8`` observations ``(n_envs, H, W, C)``.
    """
    n = n_envs if n_envs is not None else cfg.n_envs
    if cfg.backend == "envpool":
        from envs.envpool import make_envpool_vec_env

        return make_envpool_vec_env(cfg, n_envs=n, seed=seed)
    from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    check_env_id(cfg.id)
    kind = vec_env or cfg.vec_env
    return sb3_make_vec_env(
        functools.partial(make_env, cfg),
        n_envs=n,
        seed=seed,
        vec_env_cls=SubprocVecEnv if kind == "subproc" and n > 1 else DummyVecEnv,
    )
