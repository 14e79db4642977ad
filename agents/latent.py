"""``LatentObservation``: image observations replaced by the latents of a trained VAE.

Two flavours with the same observation space ``Box(-inf, inf, (history * Z,), float32)``:

* :class:`LatentObservation`, a Gymnasium wrapper for one env (one frame per forward pass). It
  is also an rl-baselines3-zoo ``env_wrapper`` entry: its constructor takes the VAE run folder,
  so a zoo hyperparameter file can say::

      env_wrapper:
        - agents.latent.LatentObservation: {vae_run: runs/my-vae, history: 2}

  (the way the zoo's CarRacing SAC/TQC entries plug in an autoencoder). When the env's frames
  are not what the VAE expects (the zoo hands over raw 96x96 CarRacing frames), the wrapper first
  applies the VAE run's own ``env`` preprocessing: crop, resize, grayscale.
* :class:`VecLatentObservation`, an SB3 ``VecEnvWrapper``: all envs' frames (plus the
  ``terminal_observation`` of envs whose episode just ended, which SB3 needs to bootstrap
  truncated episodes) are encoded in ONE batched forward pass per step. This is what
  ``worldmodel train-agent`` uses.

History: the last ``history`` latents are concatenated, oldest first, newest last, with zeros
before the start of an episode -- exactly what SB3's ``VecFrameStack`` does with frames (both
use SB3's ``StackedObservations``), so pixel and latent agents see the same history.

``latent="mean"`` observes ``mu``; ``"sample"`` draws ``mu + sigma * eps`` each step.

``stats`` (:class:`~agents.features.FeatureStats`, ``agent.standardize``) standardises each
latent per dimension before it is stacked.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn
from stable_baselines3.common.vec_env.stacked_observations import StackedObservations

from worldmodel.errors import UserError

if TYPE_CHECKING:
    from agents.features import FeatureStats
    from worldmodel.vae import LoadedVAE

LatentMode = Literal["mean", "sample"]


@functools.lru_cache(maxsize=4)
def _load_vae_cached(path: str, checkpoint: str, device: str) -> LoadedVAE:
    from worldmodel.vae import load_vae

    return load_vae(Path(path), checkpoint, device)  # type: ignore[arg-type]


def get_vae(
    vae_run: str | Path | LoadedVAE,
    checkpoint: Literal["best", "last"] = "best",
    device: str = "cpu",
) -> LoadedVAE:
    """A :class:`~worldmodel.vae.LoadedVAE` from a run folder (cached per process) or as is.

    The cache means that the zoo's one-wrapper-per-env set-up loads the weights once.

    :param vae_run: a ``worldmodel train-vae`` run folder, or an already loaded VAE.
    :param checkpoint: ``best`` or ``last`` checkpoint of the run.
    :param device: where the encoder runs.
    """
    from worldmodel.vae import LoadedVAE

    if isinstance(vae_run, LoadedVAE):
        return vae_run
    return _load_vae_cached(str(Path(vae_run).resolve()), checkpoint, str(device))


def latent_space(latent_dim: int, history: int = 1) -> spaces.Box:
    """The observation space of the wrappers: ``Box(-inf, inf, (history * latent_dim,))``."""
    return spaces.Box(-np.inf, np.inf, (history * latent_dim,), np.float32)


def _check_args(history: int, latent: str) -> None:
    if history < 1:
        raise UserError(f"history must be >= 1 latents, got {history}")
    if latent not in ("mean", "sample"):
        raise UserError(f"latent must be 'mean' or 'sample', got {latent!r}")


def _shape_error(got: Any, vae: LoadedVAE, where: str) -> UserError:
    h, w, c = vae.image_shape
    origin = f" (VAE run {vae.run_dir})" if vae.run_dir is not None else ""
    return UserError(
        f"{where}: frames of shape {tuple(got)} do not fit the VAE{origin}, which takes "
        f"{h}x{w}x{c} uint8 frames; use the env preprocessing the VAE was trained with "
        f"(env.image_size={h}, env.grayscale={str(c == 1).lower()})"
    )


def preprocess_like_vae(env: gym.Env[Any, Any], vae: LoadedVAE) -> gym.Env[Any, Any]:
    """Crop, resize and grayscale ``env``'s frames the way the VAE run's ``env`` section says.

    Used when raw frames arrive (e.g. from the zoo's ``gym.make``); frame skip and Atari's
    preprocessing are the caller's business. Returns ``env`` unchanged when its frames already
    have the VAE's shape.
    """
    from gymnasium.wrappers import GrayscaleObservation, ResizeObservation

    from envs.factory import DEFAULT_CROP
    from envs.wrappers import CropObservation

    space = env.observation_space
    want = vae.image_shape
    if space.shape == want:
        return env
    if not isinstance(space, spaces.Box) or len(space.shape) != 3 or space.shape[2] not in (1, 3):
        raise _shape_error(space.shape, vae, "LatentObservation")
    env_cfg = vae.config.env
    crop = env_cfg.crop
    if crop is None and env_cfg.id.startswith("CarRacing"):  # the family default (dashboard)
        crop = DEFAULT_CROP["carracing"]
    if crop is not None and not crop.is_empty():
        env = CropObservation(env, crop)
    if env.observation_space.shape[:2] != want[:2]:  # type: ignore[index]
        env = ResizeObservation(env, want[:2])
    if want[2] == 1 and env.observation_space.shape[2] == 3:  # type: ignore[index]
        env = GrayscaleObservation(env, keep_dim=True)
    if env.observation_space.shape != want:
        raise _shape_error(space.shape, vae, "LatentObservation")
    return env


class LatentObservation(gym.Wrapper[np.ndarray, Any, np.ndarray, Any]):
    """Replace one env's ``uint8 (H, W, C)`` frames by VAE latents ``(history * Z,)`` float32.

    :param env: an env with image observations.
    :param vae_run: a ``worldmodel train-vae`` run folder (str or Path), or a ``LoadedVAE``.
    :param history: concatenate the last ``history`` latents (zeros before the episode start).
    :param latent: ``mean`` (``mu``) or ``sample`` (``mu + sigma * eps``).
    :param checkpoint: which checkpoint of the VAE run.
    :param device: where the encoder runs.
    :param preprocess: apply the VAE run's crop/resize/grayscale first; ``None`` (default) does
        so only when the frames do not already have the VAE's shape.

    Example:
        >>> from envs.reach import ReachEnv
        >>> from worldmodel.config import resolve_config
        >>> from worldmodel.vae import LoadedVAE, build_vae
        >>> cfg = resolve_config(None, ["env.image_size=16", "vae.widths=[4]", "vae.latent_dim=3"])
        >>> vae = LoadedVAE(build_vae(cfg.vae, cfg.env), cfg)
        >>> env = LatentObservation(ReachEnv(size=16), vae, history=2)
        >>> obs, _ = env.reset(seed=0)
        >>> obs.shape, bool((obs[:3] == 0).all())
        ((6,), True)
    """

    def __init__(
        self,
        env: gym.Env[Any, Any],
        vae_run: str | Path | LoadedVAE,
        history: int = 1,
        latent: LatentMode = "mean",
        checkpoint: Literal["best", "last"] = "best",
        device: str = "cpu",
        preprocess: bool | None = None,
    ) -> None:
        _check_args(history, latent)
        vae = get_vae(vae_run, checkpoint, device)
        if preprocess or (preprocess is None and env.observation_space.shape != vae.image_shape):
            env = preprocess_like_vae(env, vae)
        if env.observation_space.shape != vae.image_shape:
            raise _shape_error(env.observation_space.shape, vae, "LatentObservation")
        super().__init__(env)
        self.vae = vae
        self.history = history
        self.latent: LatentMode = latent
        self._stack = StackedObservations(1, history, latent_space(vae.latent_dim), "last")
        self.observation_space = self._stack.stacked_observation_space  # type: ignore[assignment]

    def encode(self, frame: np.ndarray) -> np.ndarray:
        """One frame ``uint8 (H, W, C)`` -> its latent ``(1, Z)`` float32."""
        return self.vae.encode(frame[None], mode=self.latent)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset the env and the latent history; return ``(history * Z,)`` float32."""
        frame, info = self.env.reset(seed=seed, options=options)
        return self._stack.reset(self.encode(frame))[0].copy(), info

    def step(self, action: Any) -> tuple[np.ndarray, Any, bool, bool, dict[str, Any]]:
        """Step the env; the observation is the updated latent history."""
        frame, reward, terminated, truncated, info = self.env.step(action)
        stacked, _ = self._stack.update(self.encode(frame), np.zeros(1, bool), [{}])
        return stacked[0].copy(), reward, terminated, truncated, info


class VecLatentObservation(VecEnvWrapper):
    """Replace a VecEnv's ``uint8 (n, H, W, C)`` frames by latents ``(n, history * Z)``.

    One batched forward pass per step encodes every env's new frame and the
    ``infos[i]["terminal_observation"]`` frames of envs that just finished; those entries are
    replaced by their (stacked) latents, as SB3's ``VecFrameStack`` does for frames.

    :param venv: a VecEnv with image observations of the VAE's shape.
    :param vae_run: a ``worldmodel train-vae`` run folder (str or Path), or a ``LoadedVAE``.
    :param history: concatenate the last ``history`` latents (zeros before the episode start).
    :param latent: ``mean`` or ``sample``.
    :param checkpoint: which checkpoint of the VAE run.
    :param device: where the encoder runs.
    :param stats: standardise each latent with these ``(Z,)`` statistics before stacking
        (``None``: raw latents).

    Attributes ``frames`` (the last raw frames, ``(n, H, W, C)``) and ``latents`` (their raw
    latents, ``(n, Z)``) are kept for videos and debugging.
    """

    def __init__(
        self,
        venv: VecEnv,
        vae_run: str | Path | LoadedVAE,
        history: int = 1,
        latent: LatentMode = "mean",
        checkpoint: Literal["best", "last"] = "best",
        device: str = "cpu",
        stats: FeatureStats | None = None,
    ) -> None:
        _check_args(history, latent)
        vae = get_vae(vae_run, checkpoint, device)
        if venv.observation_space.shape != vae.image_shape:
            raise _shape_error(venv.observation_space.shape, vae, "VecLatentObservation")
        if stats is not None:
            stats.check(vae.latent_dim, "VecLatentObservation")
        self.stats = stats
        self.vae = vae
        self.history = history
        self.latent: LatentMode = latent
        self._stack = StackedObservations(
            venv.num_envs, history, latent_space(vae.latent_dim), "last"
        )
        super().__init__(venv, observation_space=self._stack.stacked_observation_space)
        self.frames = np.zeros((venv.num_envs, *vae.image_shape), np.uint8)
        self.latents = np.zeros((venv.num_envs, vae.latent_dim), np.float32)

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """Frames ``uint8 (N, H, W, C)`` -> latents ``(N, Z)`` float32, one forward pass."""
        return self.vae.encode(frames, mode=self.latent, batch_size=max(256, len(frames)))

    def _features(self, z: np.ndarray) -> np.ndarray:
        """Latents ``(N, Z)`` -> what one step shows the policy: standardised with ``stats``."""
        return z if self.stats is None else self.stats.apply(z)

    def reset(self) -> np.ndarray:
        """Reset all envs and histories; return ``(n, history * Z)`` float32."""
        frames = self.venv.reset()
        assert isinstance(frames, np.ndarray)
        self.frames = frames
        self.latents = self.encode(frames)
        return self._stack.reset(self._features(self.latents)).copy()

    def step_wait(self) -> VecEnvStepReturn:
        """Step all envs; encode new and terminal frames together."""
        frames, rewards, dones, infos = self.venv.step_wait()
        assert isinstance(frames, np.ndarray)
        n = len(frames)
        ended = [i for i in range(n) if dones[i] and "terminal_observation" in infos[i]]
        batch = frames
        if ended:
            terminal = np.stack([infos[i]["terminal_observation"] for i in ended])
            batch = np.concatenate([frames, terminal])
        z = self.encode(batch)
        features = self._features(z)
        for j, i in enumerate(ended):
            infos[i]["terminal_observation"] = features[n + j]
        self.frames = frames
        self.latents = z[:n]
        stacked, infos = self._stack.update(features[:n], dones, infos)
        return stacked.copy(), rewards, dones, infos
