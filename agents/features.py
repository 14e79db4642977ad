"""Fair controls: the latent modes' policy features, standardised per dimension.

An untrained encoder's latents spread hundreds of times less than a trained VAE's (per
dimension std ~0.001 against ~0.6), so without rescaling the ``random-encoder`` control would be
handicapped by the scale of its inputs, not by what they tell. With ``agent.standardize`` (the
default) every mode whose policy observes latents (``latent``, ``random-encoder``,
``latent-memory``, ``latent-memory-untrained``, ``dream``) observes::

    x' = (x - mean) / std        per dimension of x, the vector one step gives the policy

where ``x`` is ``z_t`` (latent modes) or ``[z_t, h_t]`` (memory modes and the dream) and
``mean``, ``std`` come from the dataset the VAE (or M) was trained on, run through the mode's own
encoder and M (:func:`compute_features`). A control then differs from its arm only in the weights.

* **The sample** (:func:`sample_episodes`): whole training-split episodes (the split of the run
  that records the dataset: ``data.val_fraction`` and ``seed`` of M's run for memory modes, of
  the VAE run otherwise), every ``k``-th in id order so that they spread over the dataset, about
  :data:`MAX_FRAMES` frames in all; deterministic.
* **The features**: the encoder's ``mu`` (``agent.latent=mean``) or ``mu + sigma * eps``
  (``sample``, ``eps`` from a fixed seed), as :class:`~agents.latent.VecLatentObservation` gives
  them; memory modes step their M (trained or untrained) through each episode with the recorded
  actions from ``h_0 = 0``, as :class:`~agents.memory_obs.VecMemoryObservation` does, and take
  ``[z_t, h_t]``. At most :data:`MAX_FRAMES` rows (evenly spaced) enter the statistics.
* **History**: the wrappers standardise each step's vector *before* stacking ``agent.history`` of
  them, so the zeros before an episode's start stay zeros and one ``(D,)`` pair of statistics
  serves every slot.
* ``std`` is floored at :data:`STD_FLOOR`, so a constant dimension does not explode.

The agent run records them in ``features.json`` (:data:`FEATURES_RECORD`: ``mean``, ``std``,
``n_samples``, the dataset path as given, the encoder's and M's weights hashes), written
atomically and read with ``json`` only. Training, its periodic and final evaluations,
``worldmodel evaluate``, the collector's ``agent:PATH`` policy and the dream
(:class:`VecStandardize`) all apply the recorded statistics; a run without the file (older runs,
``agent.standardize=false``, the frame modes) observes raw features, as before.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from agents.modes import get_mode
from worldmodel.errors import UserError
from worldmodel.io import atomic_write_json, read_json

if TYPE_CHECKING:
    from worldmodel.config import Config
    from worldmodel.dataset import DatasetReader
    from worldmodel.memory import LoadedMemory
    from worldmodel.vae import LoadedVAE

log = logging.getLogger("worldmodel")

FEATURES_RECORD = "features.json"
FEATURES_FORMAT = "features/1"
#: At most this many frames (rows of features) enter the statistics.
MAX_FRAMES = 20_000
#: The smallest ``std`` used: a constant dimension is shifted, not blown up.
STD_FLOOR = 1e-6
#: Seeds the ``eps`` of ``agent.latent=sample`` features.
SAMPLE_SEED = 0
#: Episodes stepped through M together.
MEMORY_BATCH = 64


@dataclass(frozen=True)
class FeatureStats:
    """Per-dimension statistics of what a policy observes in one step.

    :param mean: ``(D,)`` float32.
    :param std: ``(D,)`` float32, every entry ``>= STD_FLOOR``.
    """

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, np.float32).reshape(-1)
        std = np.asarray(self.std, np.float32).reshape(-1)
        if mean.shape != std.shape or not (np.isfinite(mean).all() and np.isfinite(std).all()):
            raise ValueError(f"mean {mean.shape} and std {std.shape}: not finite vectors of one "
                             "size")
        if (std <= 0).any():
            raise ValueError("std has entries <= 0")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def dim(self) -> int:
        """``D``, the size of one step's feature vector."""
        return int(self.mean.shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std``: ``(..., D)`` -> ``(..., D)`` float32."""
        return ((np.asarray(x, np.float32) - self.mean) / self.std).astype(np.float32, copy=False)

    def check(self, dim: int, where: str) -> None:
        """Refuse (one line) statistics of another size than the ``dim`` features they scale."""
        if self.dim != dim:
            raise UserError(f"{where}: the recorded feature statistics ({FEATURES_RECORD}) have "
                            f"{self.dim} dimensions but the features have {dim}")


def feature_stats(features: np.ndarray) -> FeatureStats:
    """Mean and floored std of each column of ``features`` ``(N, D)`` (computed in float64)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise UserError(f"feature statistics need (N, D) features with N >= 1, got {x.shape}")
    return FeatureStats(x.mean(0), np.maximum(x.std(0), STD_FLOOR))


class VecStandardize(VecEnvWrapper):
    """Standardise a VecEnv's ``(n, D)`` observations and ``terminal_observation`` entries.

    For envs that emit one step's features unstacked, such as the dream
    (:class:`~worldmodel.dream.DreamVecEnv`, ``[z, h]``); the real-env wrappers standardise
    before stacking themselves.
    """

    def __init__(self, venv: VecEnv, stats: FeatureStats) -> None:
        stats.check(int(np.prod(venv.observation_space.shape or (0,))), "VecStandardize")
        super().__init__(venv)
        self.stats = stats

    def reset(self) -> np.ndarray:
        """Reset; the standardised observations."""
        return self.stats.apply(np.asarray(self.venv.reset()))

    def step_wait(self) -> VecEnvStepReturn:
        """Step; standardise the observations and the terminal observations."""
        obs, rewards, dones, infos = self.venv.step_wait()
        for info in infos:
            if "terminal_observation" in info:
                info["terminal_observation"] = self.stats.apply(info["terminal_observation"])
        return self.stats.apply(np.asarray(obs)), rewards, dones, infos


# --------------------------------------------------------------------------------------------
# The dataset and its sample


@dataclass(frozen=True)
class Source:
    """Where a mode's feature statistics come from.

    :param data: the dataset path, as given or recorded.
    :param split_from: the run whose ``data.val_fraction`` and ``seed`` define the training
        split (``None``: the agent's config).
    """

    data: str
    split_from: Path | None


def locate_dataset(cfg: Config, vae_path: Path | None, memory_path: Path | None,
                   data: Path | None = None) -> Source:
    """The dataset the VAE (memory modes: M) was trained on, from its run's ``summary.json``.

    :param data: the dataset to use instead (``--data``).
    :raises UserError: (one line) no dataset recorded, or the recorded one is gone.
    """
    mode = get_mode(cfg.agent.obs_mode)
    split_from = memory_path if mode.needs_memory_run and memory_path is not None else vae_path
    if split_from is not None and not (Path(split_from) / "config.yaml").is_file():
        split_from = None
    if data is not None:
        return Source(str(data), split_from)
    found: tuple[str, Path] | None = None
    if mode.needs_memory_run and memory_path is not None:
        summary = _summary(memory_path)
        recorded = (summary.get("inputs") or {}).get("dataset")
        found = (str(recorded), Path(memory_path)) if recorded else None
    if found is None and vae_path is not None:
        recorded = (_summary(vae_path).get("dataset") or {}).get("path")
        found = (str(recorded), Path(vae_path)) if recorded else None
    fix = "pass --data DATASET (the dataset the VAE was trained on) or set agent.standardize=false"
    if found is None:
        where = " or ".join(str(p) for p in (memory_path if mode.needs_memory_run else None,
                                               vae_path) if p is not None) or "no --vae run"
        raise UserError(f"agent.standardize needs the dataset of {where}, which records none "
                        f"(no summary.json with its dataset): {fix}")
    recorded, run = found
    if "://" not in recorded and not Path(recorded).exists():
        raise UserError(f"dataset {recorded!r} recorded by {run} is not there (a path relative "
                        f"to another directory?): {fix}")
    return Source(recorded, split_from)


def _summary(run: Path) -> dict[str, Any]:
    path = Path(run) / "summary.json"
    value = read_json(path) if path.is_file() else {}
    return value if isinstance(value, dict) else {}


def sample_episodes(reader: DatasetReader, val_fraction: float, seed: int,
                    max_frames: int = MAX_FRAMES) -> list[dict[str, Any]]:
    """Training-split episodes (index entries), every ``k``-th in id order, ~``max_frames`` frames.

    ``k = ceil(training frames / max_frames)``; at least one episode. Deterministic.
    """
    from worldmodel.loaders import split_episodes

    train_ids = set(split_episodes(reader.episode_ids, val_fraction, seed)[0])
    entries = [e for e in reader.episode_index() if int(e["id"]) in train_ids]
    if not entries:  # a single-episode dataset: no training split
        entries = reader.episode_index()
    total = sum(int(e["length"]) for e in entries)
    stride = max(1, math.ceil(total / max(max_frames, 1)))
    return entries[::stride]


def _spread(n: int, cap: int) -> np.ndarray:
    """At most ``cap`` evenly spaced indices of ``range(n)``, ``(<= cap,)`` int64."""
    if n <= cap:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, cap).round().astype(np.int64))


def compute_features(cfg: Config, encoder: LoadedVAE, memory: LoadedMemory | None,
                     reader: DatasetReader, episodes: Sequence[dict[str, Any]],
                     max_frames: int = MAX_FRAMES) -> np.ndarray:
    """What the policy of ``cfg.agent.obs_mode`` observes in one step, on dataset episodes.

    :param encoder: the mode's frozen encoder (trained VAE, or the untrained one).
    :param memory: the mode's M (trained or untrained), or ``None`` for the latent modes.
    :param episodes: index entries of the episodes (:func:`sample_episodes`).
    :return: ``(N, Z)`` or ``(N, Z + H)`` float32, ``N <= max_frames`` rows evenly spaced over
        the episodes' steps.
    """
    from worldmodel.latents import posterior

    rng = np.random.default_rng(SAMPLE_SEED)
    latents, actions = [], []
    for e in episodes:
        shard, lo = e["shard"], int(e["start"])
        hi = lo + int(e["length"])
        post = posterior(encoder, reader.read_range(shard, "obs", lo, hi))
        z = post.mu
        if cfg.agent.latent == "sample":
            eps = rng.standard_normal(z.shape).astype(np.float32)
            z = z + np.exp(0.5 * post.logvar) * eps
        latents.append(z.astype(np.float32))
        if memory is not None:
            actions.append(memory.actions(reader.read_range(shard, "action", lo, hi)))
    if memory is not None:
        hidden = _hidden_states(memory, latents, actions)
        rows = [np.concatenate([z, h], axis=1) for z, h in zip(latents, hidden, strict=True)]
    else:
        rows = latents
    features = np.concatenate(rows)
    return features[_spread(len(features), max_frames)]


def _hidden_states(memory: LoadedMemory, latents: list[np.ndarray],
                   actions: list[np.ndarray]) -> list[np.ndarray]:
    """M's ``h_t`` before each step of each episode (``h_0 = 0``): ``(T_e, H)`` float32 each.

    M reads ``(z_t, a_t)`` after step ``t``, one batched :meth:`LoadedMemory.step` per time step
    over up to :data:`MEMORY_BATCH` episodes of similar length, as the env wrapper steps it.
    """
    out: list[np.ndarray] = [np.zeros((len(z), memory.hidden_size), np.float32) for z in latents]
    order = sorted(range(len(latents)), key=lambda i: len(latents[i]))
    for b in range(0, len(order), MEMORY_BATCH):
        group = order[b : b + MEMORY_BATCH]
        lengths = np.array([len(latents[i]) for i in group])
        steps = int(lengths.max())
        z = np.zeros((len(group), steps, memory.latent_dim), np.float32)
        a = np.zeros((len(group), steps, memory.action_dim), np.float32)
        for j, i in enumerate(group):
            z[j, : lengths[j]] = latents[i]
            a[j, : lengths[j]] = actions[i]
        state = memory.initial_state(len(group))
        h = np.zeros((len(group), steps, memory.hidden_size), np.float32)
        for t in range(steps):
            h[:, t] = state[0][0].cpu().numpy()
            if t + 1 < steps:
                _, state = memory.step(z[:, t], a[:, t], state)
        for j, i in enumerate(group):
            out[i] = h[j, : lengths[j]]
    return out


# --------------------------------------------------------------------------------------------
# The statistics of an agent run: computed when it starts, recorded in features.json


def uses_features(cfg: Config) -> bool:
    """The mode's policy observes latents (with a frozen encoder) and ``agent.standardize``."""
    mode = get_mode(cfg.agent.obs_mode)
    return bool(cfg.agent.standardize) and mode.policy_input == "latents" and mode.frozen_encoder


def prepare_features(cfg: Config, encoder: LoadedVAE | None, memory: LoadedMemory | None,
                     run_dir: Path, vae_path: Path | None, memory_path: Path | None,
                     data: Path | None = None) -> FeatureStats | None:
    """The statistics a fresh run standardises with; writes ``features.json``.

    :param encoder: the run's frozen encoder (:func:`agents.encoders.prepare_encoder`).
    :param memory: its M (:func:`agents.memory_obs.prepare_memory`), or ``None``.
    :param vae_path: the ``--vae`` run (it records the dataset; ``random-encoder``: the run it
        borrows the architecture of).
    :param memory_path: the ``--memory`` run (memory modes: it records the dataset).
    :param data: the dataset to use instead of the recorded one (``--data``).
    :return: ``None`` when the mode does not standardise (frame modes, ``agent.standardize``
        off).
    :raises UserError: no dataset can be found (one line, saying what to pass).
    """
    from worldmodel.config import load_run_config
    from worldmodel.dataset import open_dataset
    from worldmodel.train_memory import dataset_key
    from worldmodel.vae import state_dict_hash

    if not uses_features(cfg):
        return None
    assert encoder is not None
    source = locate_dataset(cfg, vae_path, memory_path, data)
    split_cfg = load_run_config(source.split_from) if source.split_from is not None else cfg
    reader = open_dataset(source.data)
    if reader.frame_shape != encoder.image_shape:
        raise UserError(f"dataset {source.data} has {reader.frame_shape} frames but the encoder "
                        f"takes {encoder.image_shape}: pass --data with the VAE's dataset")
    episodes = sample_episodes(reader, split_cfg.data.val_fraction, split_cfg.seed)
    features = compute_features(cfg, encoder, memory, reader, episodes)
    stats = feature_stats(features)
    record = {
        "format": FEATURES_FORMAT,
        "obs_mode": cfg.agent.obs_mode,
        "latent": cfg.agent.latent,
        "dim": stats.dim,
        "mean": [float(x) for x in stats.mean],
        "std": [float(x) for x in stats.std],
        "std_floor": STD_FLOOR,
        "n_samples": len(features),
        "n_episodes": len(episodes),
        "dataset": source.data,
        "dataset_key": dataset_key(reader),
        "split": {"from": None if source.split_from is None else str(source.split_from),
                  "val_fraction": split_cfg.data.val_fraction, "seed": split_cfg.seed},
        "encoder_weights_hash": encoder.weights_hash,
        "memory_weights_hash": None if memory is None else state_dict_hash(memory.model),
    }
    atomic_write_json(Path(run_dir) / FEATURES_RECORD, record)
    log.info("features: standardised with the statistics of %d frames of %s (std %.3g .. %.3g)",
             len(features), source.data, float(stats.std.min()), float(stats.std.max()))
    return stats


def load_features(run_dir: Path, encoder: LoadedVAE | None = None,
                  memory: LoadedMemory | None = None) -> FeatureStats | None:
    """The statistics a run recorded in ``features.json``; ``None`` without the file.

    :param encoder, memory: when given, their weights hashes must be the recorded ones.
    :raises UserError: (one line) an unreadable or inconsistent file, or other weights.
    """
    from worldmodel.vae import state_dict_hash

    path = Path(run_dir) / FEATURES_RECORD
    if not path.is_file():
        return None
    try:
        record = read_json(path)
        if record.get("format") != FEATURES_FORMAT:
            raise ValueError(f"format {record.get('format')!r}, expected {FEATURES_FORMAT!r}")
        stats = FeatureStats(np.asarray(record["mean"], np.float64),
                             np.asarray(record["std"], np.float64))
        if stats.dim != int(record.get("dim", stats.dim)):
            raise ValueError(f"{stats.dim} values but dim {record['dim']}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        msg = " ".join(str(e).split())[:200]
        raise UserError(f"{path}: unreadable feature statistics ({type(e).__name__}: {msg}); "
                        "train the agent again") from e
    checks = []
    if encoder is not None:
        checks.append(("encoder", record.get("encoder_weights_hash"), encoder.weights_hash))
    if memory is not None:
        checks.append(("memory", record.get("memory_weights_hash"), state_dict_hash(memory.model)))
    for what, recorded, found in checks:
        if recorded is not None and recorded != found:
            raise UserError(f"{path}: the statistics were computed with other {what} weights "
                            f"({str(recorded)[:12]}) than the run's ({found[:12]})")
    return stats

