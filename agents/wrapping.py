"""The VecEnv an agent trains or is evaluated on: env frames wrapped for its observation mode.

Observation pipelines, by the mode's :attr:`~agents.modes.ObsModeSpec.wrapper`
(:data:`WRAPPERS`):

* ``frames`` (``pixel``, ``latent-finetune``): ``VecFrameStack(history)``, ``VecTransposeImage``
  -> a ``CnnPolicy`` (with a ``VAEFeaturesExtractor`` for ``latent-finetune``);
* ``latents`` (``latent``, ``random-encoder``): ``VecLatentObservation(history)`` -> ``MlpPolicy``;
* ``latents-memory`` (``latent-memory``, ``latent-memory-untrained``): ``VecLatentObservation``,
  ``VecMemoryObservation(history)`` (``[z_t, h_t]``, :mod:`agents.memory_obs`) -> ``MlpPolicy``.

The latent wrappers take the run's feature statistics (:mod:`agents.features`,
``features.json``): each step's ``z`` or ``[z, h]`` is standardised per dimension before it is
stacked.
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
    from agents.features import FeatureStats
    from worldmodel.config import Config
    from worldmodel.memory import LoadedMemory
    from worldmodel.vae import LoadedVAE

#: The reward-normalisation statistics of an agent run (:func:`save_normalization`), and the
#: pickle older versions wrote instead (never loaded).
NORMALIZE_FILE = "vecnormalize.json"
LEGACY_NORMALIZE_FILE = "vecnormalize.pkl"
NORMALIZE_FORMAT = "vecnormalize/1"

#: Periodic and final evaluations use seeds ``seed + EVAL_SEED_OFFSET + i``, away from training's.
EVAL_SEED_OFFSET = 1000


def wrap_frames(
    venv: VecEnv, cfg: Config, encoder: LoadedVAE | None, memory: LoadedMemory | None = None,
    features: FeatureStats | None = None,
) -> VecEnv:
    """Frames for a CNN: the last ``agent.history`` frames stacked, channels first."""
    if cfg.agent.history > 1:
        venv = VecFrameStack(venv, cfg.agent.history, channels_order="last")
    return VecTransposeImage(venv)


def wrap_latents(
    venv: VecEnv, cfg: Config, encoder: LoadedVAE | None, memory: LoadedMemory | None = None,
    features: FeatureStats | None = None,
) -> VecEnv:
    """The frozen encoder's latents of the last ``agent.history`` frames (standardised)."""
    assert encoder is not None
    return VecLatentObservation(venv, encoder, history=cfg.agent.history, latent=cfg.agent.latent,
                                stats=features)


def wrap_latents_memory(
    venv: VecEnv, cfg: Config, encoder: LoadedVAE | None, memory: LoadedMemory | None = None,
    features: FeatureStats | None = None,
) -> VecEnv:
    """``[z_t, h_t]``: each frame's latent and M's LSTM state, the last ``agent.history``.

    M reads the raw latents; ``features`` standardises the ``[z_t, h_t]`` the policy sees.
    """
    from agents.memory_obs import VecMemoryObservation

    assert encoder is not None and memory is not None
    latents = VecLatentObservation(venv, encoder, history=1, latent=cfg.agent.latent)
    return VecMemoryObservation(latents, memory, history=cfg.agent.history, stats=features)


#: How each :data:`~agents.modes.WrapperKind` turns raw frames into observations.
WRAPPERS: dict[WrapperKind, Callable[..., VecEnv]] = {
    "frames": wrap_frames,
    "latents": wrap_latents,
    "latents-memory": wrap_latents_memory,
}


def wrap_observations(
    venv: VecEnv, cfg: Config, encoder: LoadedVAE | None, memory: LoadedMemory | None = None,
    features: FeatureStats | None = None,
) -> VecEnv:
    """Raw frames -> what the policy observes, for ``cfg.agent.obs_mode``.

    :param features: the run's feature statistics (latent wrappers; ``None``: raw features).
    """
    return WRAPPERS[get_mode(cfg.agent.obs_mode).wrapper](venv, cfg, encoder, memory, features)


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
    memory: LoadedMemory | None = None,
    features: FeatureStats | None = None,
) -> VecEnv:
    """Build the VecEnv an agent trains or is evaluated on.

    :param cfg: the run config (``env`` and ``agent`` sections).
    :param encoder: the frozen encoder of the env wrapper (:func:`agents.encoders.load_encoder`).
    :param n_envs: parallel envs.
    :param seed: env ``i`` is seeded ``seed + i``.
    :param training: ``False`` for evaluation envs (reward normalisation frozen and off).
    :param gamma: discount of the reward normalisation.
    :param normalize_from: reward statistics to restore (``vecnormalize.json``, see
        :func:`load_normalization`); a missing file leaves fresh ones.
    :param recorder: insert a :class:`VecFrameRecorder` above the raw frames.
    :param memory: M, for the memory modes (:func:`agents.memory_obs.load_agent_memory`).
    :param features: the run's feature statistics (:func:`agents.features.load_features`), for
        the latent modes; ``None`` observes raw features.
    """
    from envs import make_vec_env

    venv = make_vec_env(cfg.env, n_envs=n_envs, seed=seed)
    if recorder:
        venv = VecFrameRecorder(venv)
    venv = wrap_observations(venv, cfg, encoder, memory, features)
    if cfg.agent.normalize_reward:
        venv = VecNormalize(
            venv, training=training, norm_obs=False, norm_reward=training, gamma=gamma
        )
        if normalize_from is not None:
            load_normalization(normalize_from, venv)
    return venv


def save_normalization(venv: VecNormalize, path: Path) -> None:
    """Write the reward-normalisation statistics of ``venv`` to ``path`` as JSON (no pickle).

    ``returns`` (the running discounted return of each env's current episode) is recorded for
    inspection only: a resumed session resets its envs, so it starts from zeros.
    """
    from worldmodel.io import atomic_write_json

    rms = venv.ret_rms
    atomic_write_json(path, {
        "format": NORMALIZE_FORMAT,
        "ret_rms": {"mean": float(rms.mean), "var": float(rms.var), "count": float(rms.count)},
        "clip_obs": float(venv.clip_obs),
        "clip_reward": float(venv.clip_reward),
        "gamma": float(venv.gamma),
        "epsilon": float(venv.epsilon),
        "returns": [float(r) for r in np.asarray(venv.returns).ravel()],
    })


def load_normalization(path: Path, venv: VecNormalize) -> None:
    """Restore the statistics :func:`save_normalization` wrote into ``venv`` (training flags kept).

    Nothing is unpickled; a missing ``path`` leaves fresh statistics, unless an older version's
    ``vecnormalize.pkl`` sits beside it (refused: a pickle can run code).

    :raises UserError: an unreadable, truncated or inconsistent statistics file (one line).
    """
    import json

    from worldmodel.errors import UserError

    path = Path(path)
    if not path.is_file():
        legacy = path.with_name(LEGACY_NORMALIZE_FILE)
        if legacy.is_file():
            raise UserError(
                f"{legacy}: reward statistics saved as a pickle by an older version are not "
                f"loaded (unpickling can run code); delete it to resume with fresh statistics"
            )
        return
    try:
        state = json.loads(path.read_text())
        if state.get("format") != NORMALIZE_FORMAT:
            raise ValueError(f"format {state.get('format')!r}, expected {NORMALIZE_FORMAT!r}")
        rms = state["ret_rms"]
        mean, var, count = (float(rms[k]) for k in ("mean", "var", "count"))
        scalars = {k: float(state[k]) for k in ("clip_obs", "clip_reward", "gamma", "epsilon")}
        values = [mean, var, count, *scalars.values()]
        if not all(np.isfinite(values)) or var < 0 or count <= 0 or scalars["epsilon"] <= 0:
            raise ValueError("non-finite or out-of-range statistics")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        msg = " ".join(str(e).split())[:200]
        raise UserError(
            f"{path}: unreadable reward statistics ({type(e).__name__}: {msg}); delete it to "
            "resume with fresh statistics"
        ) from e
    venv.ret_rms.mean = np.array(mean, dtype=np.float64)
    venv.ret_rms.var = np.array(var, dtype=np.float64)
    venv.ret_rms.count = count
    venv.clip_obs, venv.clip_reward = scalars["clip_obs"], scalars["clip_reward"]
    venv.gamma, venv.epsilon = scalars["gamma"], scalars["epsilon"]


def find_wrapper(venv: VecEnv, cls: type[VecEnvWrapper]) -> Any:
    """The first wrapper of type ``cls`` in a VecEnv stack, or ``None``."""
    env: Any = venv
    while isinstance(env, VecEnvWrapper):
        if isinstance(env, cls):
            return env
        env = env.venv
    return None
