"""The dream: a batched SB3 ``VecEnv`` that steps the memory model M instead of the game.

World Models (Ha & Schmidhuber 2018, section "Training inside of the dream"; hardmaru's
``doomrnn`` in https://github.com/hardmaru/WorldModelsExperiments) trains the controller inside
M: an episode starts from ``z_0 ~ N(mu, sigma)`` of a real first frame, each step feeds
``[z_t, a_t]`` to M, reads the reward and the done flag from its heads and samples ``z_{t+1}``
with a temperature ``tau`` (mixture logits divided by ``tau``, Gaussian noise scaled by
``sqrt(tau)``). Their Doom agent, trained only in the dream at ``tau = 1.15``, scored
1092 +- 556 in the real game.

:class:`DreamVecEnv` runs ``N`` such dreams at once, in ONE batched
:meth:`~worldmodel.memory.LoadedMemory.step` and :meth:`~worldmodel.memory.LoadedMemory.sample`
per step (``torch.no_grad``, on the memory's device):

* **observations** ``[z_t, h_t]``: ``Box(-inf, inf, (Z + H,), float32)``, the latent and the
  LSTM output after the previous step (zeros at the start, as World Models' controller sees);
* **actions**: the real env's action space (rebuilt from the dataset manifest's
  ``action_space``, or passed in); ``Box`` actions are clipped to their bounds (M never saw
  others), ``Discrete`` ones are one-hot;
* **reward**: M's reward head; **terminated**: the done head's logit ``> 0``
  (``p(done) > 0.5``); **truncated**: ``max_episode_steps`` steps (the real env's cap);
* **infos** as SB3's ``VecMonitor`` writes them: ``episode`` (``r``, ``l``, ``t``) and
  ``terminal_observation`` when an episode ends (the env then starts a new one, as every SB3
  ``VecEnv`` does), ``TimeLimit.truncated`` on a truncation. ``env_is_wrapped(Monitor)`` is
  ``True``, so ``evaluate_policy`` reads these returns;
* **randomness** from one ``torch.Generator`` seeded by ``seed`` (:meth:`DreamVecEnv.seed`
  takes effect at the next :meth:`~DreamVecEnv.reset`, as in SB3): the start frames, their
  ``z`` noise and every sample, so a seed gives the same dreams for the same actions.

:class:`DreamEnv` is the single-env Gymnasium view (``N = 1``); :func:`make_dream_env` builds
either from a ``train-memory`` run folder (its dataset, VAE and latent cache);
:func:`dream_returns` measures a policy's returns in the dream at several temperatures.

Example (an untrained M, two start frames of 4 latents):
    >>> from worldmodel.config import resolve_config
    >>> from worldmodel.memory import LoadedMemory, build_memory
    >>> cfg = resolve_config(None, ["memory.hidden_size=8", "memory.mixtures=2"])
    >>> space = {"type": "Box", "shape": [2], "low": [-1, -1], "high": [1, 1]}
    >>> mem = LoadedMemory(build_memory(cfg.memory, 4, 2), cfg, space)
    >>> env = DreamVecEnv(mem, np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32),
    ...                   n_envs=3, max_episode_steps=5, seed=0)
    >>> obs = env.reset()
    >>> obs.shape, obs.dtype, env.action_space.shape
    ((3, 12), dtype('float32'), (2,))
    >>> obs, reward, done, infos = env.step(np.zeros((3, 2), np.float32))
    >>> reward.shape, done.shape
    ((3,), (3,))
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices

from worldmodel.errors import UserError
from worldmodel.memory import LoadedMemory

if TYPE_CHECKING:
    from worldmodel.dataset import DatasetReader

__all__ = [
    "DreamEnv",
    "DreamVecEnv",
    "action_space_from",
    "dream_returns",
    "dream_starts",
    "episode_cap",
    "make_dream_env",
]

log = logging.getLogger("worldmodel")


def action_space_from(desc: dict[str, Any]) -> spaces.Space[Any]:
    """The Gymnasium space a dataset manifest's ``action_space`` entry describes.

    :raise UserError: a space M cannot read (described only by its ``repr``).

    Example:
        >>> action_space_from({"type": "Discrete", "n": 5, "start": 0})
        Discrete(5)
        >>> action_space_from({"type": "Box", "shape": [2], "low": [-1, 0], "high": [1, 1]})
        Box([-1.  0.], 1.0, (2,), float32)
    """
    kind = desc.get("type") if isinstance(desc, dict) else None
    if kind == "Discrete":
        return spaces.Discrete(int(desc["n"]), start=int(desc.get("start", 0)))
    if kind == "MultiDiscrete":
        return spaces.MultiDiscrete(desc["nvec"])
    if kind == "Box":
        dtype = np.dtype(desc.get("dtype", "float32"))
        shape = tuple(int(s) for s in desc["shape"])
        low = np.asarray(desc.get("low", -np.inf), dtype=dtype)
        high = np.asarray(desc.get("high", np.inf), dtype=dtype)
        return spaces.Box(np.broadcast_to(low, shape), np.broadcast_to(high, shape), shape,
                          dtype=dtype)
    raise UserError(f"the dataset records no action space the dream can use ({kind or 'none'}); "
                    "it needs Box, Discrete or MultiDiscrete actions")


class DreamVecEnv(VecEnv):
    """``n_envs`` dreams of M stepped in one batch (see the module docstring).

    :param memory: the trained M (:func:`~worldmodel.memory.load_memory`).
    :param start_mu, start_logvar: ``(S, Z)`` float32, the VAE posterior of the real first
        frames an episode may start from (:func:`dream_starts`); each episode picks one at
        random and draws ``z_0 ~ N(mu, exp(logvar))``.
    :param n_envs: ``N``, dreams stepped together.
    :param tau: the temperature (> 0); ``None``: the memory run's ``memory.temperature``.
    :param max_episode_steps: truncate an episode after this many steps (``None``: only the
        done head ends one).
    :param action_space: the real env's action space; ``None``: rebuilt from
        ``memory.action_space`` (the dataset's description).
    :param seed: seeds the generator of every random draw (``None``: a random seed).
    """

    def __init__(self, memory: LoadedMemory, start_mu: np.ndarray, start_logvar: np.ndarray,
                 n_envs: int = 1, tau: float | None = None, max_episode_steps: int | None = None,
                 action_space: spaces.Space[Any] | None = None, seed: int | None = None) -> None:
        mu = np.asarray(start_mu, np.float32)
        logvar = np.asarray(start_logvar, np.float32)
        if mu.ndim != 2 or mu.shape != logvar.shape or len(mu) == 0:
            raise UserError(f"the dream needs start latents (S, Z) with S >= 1 and logvars of "
                            f"the same shape; got {mu.shape} and {logvar.shape}")
        if mu.shape[1] != memory.latent_dim:
            raise UserError(f"start latents of {mu.shape[1]} dimensions do not fit this memory, "
                            f"which reads {memory.latent_dim}")
        if n_envs < 1:
            raise UserError(f"n_envs must be >= 1, got {n_envs}")
        if max_episode_steps is not None and max_episode_steps < 1:
            raise UserError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        self.memory = memory
        self.tau = memory.temperature if tau is None else float(tau)
        if not self.tau > 0:
            raise UserError(f"the temperature must be > 0, got {self.tau}")
        self.max_episode_steps = max_episode_steps
        space = action_space if action_space is not None else action_space_from(
            memory.action_space)
        self._box = isinstance(space, spaces.Box)
        if self._box:
            assert isinstance(space, spaces.Box)
            self._low = space.low.reshape(-1).astype(np.float32)
            self._high = space.high.reshape(-1).astype(np.float32)
        self.device = memory.device
        self._start_mu = torch.as_tensor(mu, device=self.device)
        self._start_sigma = torch.as_tensor(np.exp(0.5 * logvar), device=self.device)
        self.render_mode = None
        z, hidden = memory.latent_dim, memory.hidden_size
        obs_space = spaces.Box(-np.inf, np.inf, (z + hidden,), np.float32)
        super().__init__(n_envs, obs_space, space)
        self.generator = torch.Generator(device=self.device)
        self._pending_seed: int | None = None
        self.seed(seed)
        self._actions: np.ndarray | None = None
        self._z = torch.zeros(n_envs, z, device=self.device)
        self._state = memory.initial_state(n_envs)
        self._returns = np.zeros(n_envs, np.float64)
        self._lengths = np.zeros(n_envs, np.int64)
        self._t0 = time.perf_counter()

    # ---------------------------------------------------------------------------------------
    # Seeding and starts

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        """Seed the dream's generator at the next :meth:`reset` (``None``: a random seed).

        :return: the seed of each env (``seed + i``, as SB3's VecEnvs report them).
        """
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        self._pending_seed = int(seed)
        return [int(seed) + i for i in range(self.num_envs)]

    def _draw_starts(self, count: int) -> torch.Tensor:
        """``count`` start latents: a random recorded first frame each, ``z ~ N(mu, sigma)``."""
        g = self.generator
        pick = torch.randint(len(self._start_mu), (count,), generator=g, device=self.device)
        eps = torch.randn((count, self._start_mu.shape[1]), generator=g, device=self.device)
        return self._start_mu[pick] + self._start_sigma[pick] * eps

    def _observe(self, z: torch.Tensor, h: torch.Tensor) -> np.ndarray:
        return torch.cat([z, h], dim=1).cpu().numpy()

    def reset(self) -> np.ndarray:
        """Start a new episode in every env; the observations ``(N, Z + H)`` float32."""
        if self._pending_seed is not None:
            self.generator.manual_seed(self._pending_seed)
            self._pending_seed = None
        n = self.num_envs
        self._z = self._draw_starts(n)
        self._state = self.memory.initial_state(n)
        self._returns[:] = 0.0
        self._lengths[:] = 0
        self.reset_infos = [{} for _ in range(n)]
        return self._observe(self._z, self._state[0][0])

    # ---------------------------------------------------------------------------------------
    # Stepping

    def _action_vectors(self, actions: np.ndarray) -> np.ndarray:
        a = np.asarray(actions)
        if self._box:
            a = a.reshape(self.num_envs, -1).astype(np.float32, copy=False)
            return np.clip(a, self._low, self._high)
        return self.memory.actions(a.reshape(self.num_envs, *np.shape(a)[1:]))

    def step(self, actions: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """Step every dream: observations ``(N, Z + H)``, rewards, dones ``(N,)``, infos."""
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: np.ndarray) -> None:
        """Remember the actions of the next :meth:`step_wait`."""
        self._actions = np.asarray(actions)

    @torch.no_grad()
    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """One batched step of M: observations, rewards, dones, infos (SB3's conventions)."""
        if self._actions is None:
            raise UserError("step_wait() without step_async(): call step(actions)")
        actions, self._actions = self._action_vectors(self._actions), None
        pred, state = self.memory.step(self._z, actions, self._state)
        z = self.memory.sample(pred, self.tau, generator=self.generator)
        h = state[0][0]
        obs = self._observe(z, h)
        rewards = pred.reward.cpu().numpy().astype(np.float32)
        terminated = (pred.done > 0).cpu().numpy()
        self._returns += rewards
        self._lengths += 1
        truncated = (self._lengths >= self.max_episode_steps if self.max_episode_steps
                     else np.zeros(self.num_envs, bool)) & ~terminated
        dones = terminated | truncated
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        ended = np.flatnonzero(dones)
        if len(ended):
            now = time.perf_counter()
            for i in ended:
                infos[i]["terminal_observation"] = obs[i].copy()
                infos[i]["TimeLimit.truncated"] = bool(truncated[i])
                infos[i]["episode"] = {"r": float(self._returns[i]), "l": int(self._lengths[i]),
                                       "t": round(now - self._t0, 6)}
            idx = torch.as_tensor(ended, device=self.device)
            z[idx] = self._draw_starts(len(ended))
            state = (state[0].clone(), state[1].clone())
            state[0][:, idx] = 0.0
            state[1][:, idx] = 0.0
            obs[ended] = self._observe(z[idx], state[0][0, idx])
            self._returns[ended] = 0.0
            self._lengths[ended] = 0
        self._z, self._state = z, state
        return obs, rewards, dones, infos

    def close(self) -> None:
        """Nothing to release (the memory stays usable)."""

    # ---------------------------------------------------------------------------------------
    # The VecEnv attribute interface: the N dreams share one object

    def _indices(self, indices: VecEnvIndices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        if isinstance(indices, int):
            return [indices]
        return list(indices)

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """The attribute of the dream, once per env asked (the envs share every attribute)."""
        value = getattr(self, attr_name)
        return [value for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Set a shared attribute (``tau``, ``max_episode_steps``) for every env at once."""
        if sorted(self._indices(indices)) != list(range(self.num_envs)):
            raise UserError(f"the dream's envs share their attributes: set {attr_name!r} for all "
                            "envs (indices=None)")
        if attr_name == "tau" and not float(value) > 0:
            raise UserError(f"the temperature must be > 0, got {value}")
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        """Call a method of the dream once and return its result for each env asked."""
        result = getattr(self, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper[Any, Any, Any, Any]],
                       indices: VecEnvIndices = None) -> list[bool]:
        """``True`` for SB3's ``Monitor`` (the dream writes its ``episode`` infos), else False."""
        from stable_baselines3.common.monitor import Monitor

        wrapped = issubclass(wrapper_class, Monitor)
        return [wrapped for _ in self._indices(indices)]


class DreamEnv(gym.Env[np.ndarray, Any]):
    """One dream as a Gymnasium env: a :class:`DreamVecEnv` of one env behind Gymnasium's API.

    ``reset(seed=s)`` reseeds the dream (same seed, same actions: same episode); ``step``
    returns the observation that ended an episode (the vec env's ``terminal_observation``) with
    ``terminated`` (the done head) or ``truncated`` (``max_episode_steps``); call ``reset``
    after either. ``info["episode"]`` holds the return ``r`` and length ``l`` at the end (not
    the wall time ``t``, so that a seed and the actions determine every info).

    :param vec: a :class:`DreamVecEnv` with ``num_envs == 1``.
    """

    def __init__(self, vec: DreamVecEnv) -> None:
        if vec.num_envs != 1:
            raise UserError(f"DreamEnv views one dream; got a DreamVecEnv of {vec.num_envs}")
        self.vec = vec
        self.observation_space = vec.observation_space
        self.action_space = vec.action_space
        self.render_mode = None
        self.metadata = {"render_modes": []}

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Start a dream (from ``seed`` when given); the observation and ``{}``."""
        super().reset(seed=seed)
        if seed is not None:
            self.vec.seed(seed)
        return self.vec.reset()[0], {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """One step of M: observation, reward, terminated, truncated, info."""
        obs, rewards, dones, infos = self.vec.step(np.asarray(action)[None])
        info = infos[0]
        if dones[0]:
            info["episode"].pop("t")  # wall time: the same seed and actions give the same info
            truncated = bool(info.pop("TimeLimit.truncated"))
            return info.pop("terminal_observation"), float(rewards[0]), not truncated, \
                truncated, info
        return obs[0], float(rewards[0]), False, False, info

    @property
    def tau(self) -> float:
        """The dream's temperature."""
        return self.vec.tau


def dream_returns(policy_fn: Callable[[np.ndarray], Any], env: DreamVecEnv,
                  taus: Sequence[float], episodes: int = 16,
                  seed: int = 0) -> dict[float, np.ndarray]:
    """The returns of a policy in the dream at each temperature (World Models' tau sweep).

    Each temperature replays the same seeded dream (``env.seed(seed)``) for ``episodes``
    episodes, ``(episodes + i) // N`` of them in env ``i`` (as SB3's ``evaluate_policy``
    spreads them, so that short episodes are not over-counted); ``env.tau`` is restored.

    :param policy_fn: observations ``(N, Z + H)`` -> actions ``(N, ...)``, e.g.
        ``lambda obs: model.predict(obs, deterministic=True)[0]``.
    :param env: the dream; it needs a cap (``max_episode_steps``) so that every episode ends.
    :param taus: the temperatures.
    :param episodes: episodes per temperature.
    :param seed: the dream's seed, the same for every temperature.
    :return: ``{tau: returns}``, each ``(episodes,)`` float64 in the order of the envs.
    """
    if env.max_episode_steps is None:
        raise UserError("dream_returns needs a dream with max_episode_steps: without a cap an "
                        "episode the done head never ends would never finish")
    if episodes < 1:
        raise UserError(f"episodes must be >= 1, got {episodes}")
    n = env.num_envs
    targets = np.array([(episodes + i) // n for i in range(n)])
    kept_tau = env.tau
    out: dict[float, np.ndarray] = {}
    try:
        for tau in taus:
            env.set_attr("tau", float(tau))
            env.seed(seed)
            obs = env.reset()
            returns: list[list[float]] = [[] for _ in range(n)]
            counts = np.zeros(n, np.int64)
            while (counts < targets).any():
                obs, _, dones, infos = env.step(np.asarray(policy_fn(obs)))
                for i in np.flatnonzero(dones):
                    if counts[i] < targets[i]:
                        returns[i].append(float(infos[i]["episode"]["r"]))
                        counts[i] += 1
            out[float(tau)] = np.array([r for per_env in returns for r in per_env], np.float64)
    finally:
        env.tau = kept_tau
    return out


# --------------------------------------------------------------------------------------------
# From a memory run


def _first_rows(reader: DatasetReader) -> tuple[list[int], np.ndarray]:
    """The episode ids in the cache's order and the row of each one's first frame."""
    index = reader.episode_index()
    lengths = np.array([int(e["length"]) for e in index], np.int64)
    firsts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return [int(e["id"]) for e in index], firsts


def _cached(path: Path, weights_hash: str, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    from worldmodel.train_memory import CACHE_VERSION

    try:
        with np.load(path) as f:
            if (str(f["weights_hash"]) == weights_hash and str(f["dataset_key"]) == key
                    and int(f["version"]) == CACHE_VERSION):
                return f["mu"], f["logvar"]
    except (OSError, ValueError, KeyError):
        pass
    return None


def dream_starts(memory_run: Path, data: Path | None = None, vae: Path | None = None,
                 checkpoint: Literal["best", "last"] = "best") -> tuple[np.ndarray, np.ndarray]:
    """The ``(mu, logvar)`` of the first frames of a memory run's training episodes.

    Read from the latent cache the run recorded (``summary.json``'s ``inputs.latent_cache``)
    when it still matches the dataset and the VAE weights M was trained on; otherwise the VAE
    run encodes the dataset again (:func:`~worldmodel.train_memory.cached_latents`). The training
    episodes are those of the run's split (``data.val_fraction``, ``seed``); with a single
    episode, that one.

    :param memory_run: a ``train-memory`` run folder.
    :param data: the dataset (``None``: the one the run recorded).
    :param vae: the VAE run (``None``: the one the run recorded).
    :param checkpoint: M's checkpoint, whose ``vae_hash`` the latents must match.
    :return: two ``(S, Z)`` float32 arrays.
    """
    from worldmodel.config import load_run_config
    from worldmodel.dataset import open_dataset
    from worldmodel.io import read_json
    from worldmodel.loaders import split_episodes
    from worldmodel.train_memory import cached_latents, dataset_key
    from worldmodel.vae import load_checkpoint, load_vae

    run = Path(memory_run)
    summary_file = run / "summary.json"
    inputs = read_json(summary_file).get("inputs", {}) if summary_file.is_file() else {}
    data = Path(data) if data is not None else (Path(inputs["dataset"]) if "dataset" in inputs
                                                 else None)
    if data is None:
        raise UserError(f"{run} records no dataset (no summary.json): pass the dataset it was "
                        "trained on (data=...)")
    if "://" not in str(data) and not data.exists():
        raise UserError(f"dataset {str(data)!r} of {run} is not there (a path relative to "
                        "another directory?): pass the dataset it was trained on (data=...)")
    reader = open_dataset(data)
    weights_hash = str(load_checkpoint(run / f"{checkpoint}.pt").get("vae_hash", ""))
    key = dataset_key(reader)
    found = None
    if vae is None and "latent_cache" in inputs:
        found = _cached(Path(inputs["latent_cache"]), weights_hash, key)
    if found is None:
        vae = Path(vae) if vae is not None else (Path(inputs["vae"]) if "vae" in inputs else None)
        if vae is None:
            raise UserError(f"{run} records no VAE run (no summary.json): pass the VAE run it "
                            "was trained on (vae=...)")
        cfg = load_run_config(run)
        encoder = load_vae(vae, cfg.memory.vae_checkpoint)
        if weights_hash and encoder.weights_hash != weights_hash:
            raise UserError(f"--vae {vae} holds other weights than the VAE {run} was trained on; "
                            "pass that VAE run")
        mu, logvar, _ = cached_latents(encoder, reader)
    else:
        mu, logvar = found
    if len(mu) != reader.num_frames:
        raise UserError(f"the latents of {data} do not cover its {reader.num_frames} frames")
    cfg = load_run_config(run)
    ids, firsts = _first_rows(reader)
    train_ids, _ = split_episodes(ids, cfg.data.val_fraction, cfg.seed)
    pos = {eid: p for p, eid in enumerate(ids)}
    rows = firsts[[pos[i] for i in train_ids]] if train_ids else firsts
    return np.asarray(mu[rows], np.float32), np.asarray(logvar[rows], np.float32)


def episode_cap(manifest: dict[str, Any]) -> int | None:
    """The real env's episode cap in agent steps, from a dataset manifest.

    ``env.max_episode_steps`` of the dataset's config; else Gymnasium's registered
    ``max_episode_steps`` of its env id divided by ``env.frame_skip`` (CarRacing: 1000); else
    ``None``.
    """
    env = (manifest.get("config") or {}).get("env") or {}
    if env.get("max_episode_steps"):
        return int(env["max_episode_steps"])
    env_id = manifest.get("env_id") or env.get("id")
    try:
        spec = gym.spec(str(env_id))
    except (gym.error.Error, ValueError, TypeError):
        return None
    if spec.max_episode_steps is None:
        return None
    return math.ceil(spec.max_episode_steps / max(int(env.get("frame_skip") or 1), 1))


def make_dream_env(memory_run: Path | str, data: Path | str | None = None, n_envs: int = 1,
                   tau: float | None = None, seed: int | None = 0,
                   max_episode_steps: int | None = None, *, vae: Path | str | None = None,
                   checkpoint: Literal["best", "last"] = "best",
                   device: torch.device | str = "cpu") -> DreamVecEnv:
    """A :class:`DreamVecEnv` of a ``train-memory`` run (wrap it in :class:`DreamEnv` for one).

    :param memory_run: the ``train-memory`` run folder (M, its config and ``summary.json``).
    :param data: the dataset (``None``: the one the run recorded); its first frames are the
        starts, its manifest gives the action space and the cap.
    :param n_envs: dreams stepped together.
    :param tau: the temperature (``None``: the run's ``memory.temperature``).
    :param seed: seeds the dream (``None``: random).
    :param max_episode_steps: the cap (``None``: the real env's, :func:`episode_cap`).
    :param vae: the VAE run (``None``: the one the run recorded; only read when the latent
        cache is gone or stale).
    :param checkpoint: M's checkpoint, ``best`` or ``last``.
    :param device: where M runs.
    """
    from worldmodel.dataset import open_dataset
    from worldmodel.io import read_json
    from worldmodel.memory import load_memory

    run = Path(memory_run)
    memory = load_memory(run, checkpoint, device)
    summary_file = run / "summary.json"
    if data is None and summary_file.is_file():
        recorded = read_json(summary_file).get("inputs", {}).get("dataset")
        data = Path(recorded) if recorded else None
    mu, logvar = dream_starts(run, None if data is None else Path(data),
                              None if vae is None else Path(vae), checkpoint)
    assert data is not None  # dream_starts raised otherwise
    manifest = open_dataset(Path(data)).manifest
    if max_episode_steps is None:
        max_episode_steps = episode_cap(manifest)
    space = action_space_from(manifest.get("action_space") or memory.action_space)
    log.info("dream: %d envs of %s at tau %.3g, %d start frames, cap %s", n_envs, run,
             memory.temperature if tau is None else tau, len(mu), max_episode_steps)
    return DreamVecEnv(memory, mu, logvar, n_envs=n_envs, tau=tau,
                       max_episode_steps=max_episode_steps, action_space=space, seed=seed)
