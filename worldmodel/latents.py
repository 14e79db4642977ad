"""What a trained VAE makes of a dataset: samples, posteriors and latent-space computations.

Shared by ``worldmodel visualize`` (pictures, :mod:`worldmodel.visualize`) and ``worldmodel
explore`` (the live page, :mod:`worldmodel.explore`); nothing here writes files.

* inputs: :func:`load_inputs` (a VAE run and a dataset that fits it), :func:`sample_frames` (a
  bounded, seeded :class:`Sample` of frames);
* the encoder: :func:`posterior` (``mu``, ``logvar``), :func:`kl_per_dim`;
* the decoder: :func:`latent_traversals`, :func:`interpolate`;
* the latent space: :func:`project_2d` (PCA, t-SNE, UMAP), :func:`held_out_representation`
  (:mod:`worldmodel.metrics` on held-out episodes).

Example (a tiny untrained VAE on a 4-frame "dataset"):
    >>> from worldmodel.config import resolve_config
    >>> from worldmodel.vae import LoadedVAE, build_vae
    >>> cfg = resolve_config(None, ["env.image_size=16", "vae.widths=[8]", "vae.latent_dim=3"])
    >>> vae = LoadedVAE(build_vae(cfg.vae, cfg.env), cfg)
    >>> post = posterior(vae, np.zeros((4, 16, 16, 3), np.uint8))
    >>> post.mu.shape, kl_per_dim(post.mu, post.logvar).shape
    ((4, 3), (3,))
    >>> latent_traversals(vae, post.mu[0], np.ones(3), dims=[2, 0], steps=5).shape
    (2, 5, 16, 16, 3)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from worldmodel.errors import RunNotFoundError, UserError

if TYPE_CHECKING:
    from worldmodel.dataset import DatasetReader
    from worldmodel.vae import LoadedVAE

log = logging.getLogger("worldmodel")

Method = Literal["pca", "tsne", "umap"]

__all__ = [
    "Method",
    "Posterior",
    "Sample",
    "checkpoint_name",
    "held_out_representation",
    "interpolate",
    "kl_per_dim",
    "latent_traversals",
    "load_inputs",
    "posterior",
    "project_2d",
    "sample_frames",
]


class Sample(NamedTuple):
    """Frames drawn from a dataset, with where they come from.

    :param frames: ``(N, H, W, C)`` uint8.
    :param episode: ``(N,)`` int64, the position of each frame's episode in the dataset
        (``reader.episode(i)``).
    :param t: ``(N,)`` int64, the step of each frame within its episode.
    :param reward: ``(N,)`` float32, the reward of the action taken on each frame.
    :param state: ``(N, S)`` float32 true state of each frame, or ``None``.
    """

    frames: np.ndarray
    episode: np.ndarray
    t: np.ndarray
    reward: np.ndarray
    state: np.ndarray | None


class Posterior(NamedTuple):
    """The encoder's posterior for a batch of frames.

    :param mu: ``(N, Z)`` float32.
    :param logvar: ``(N, Z)`` float32.
    """

    mu: np.ndarray
    logvar: np.ndarray


# --------------------------------------------------------------------------------------------
# Inputs


def load_inputs(vae_run: Path, data: Path | None) -> tuple[LoadedVAE, DatasetReader | None]:
    """Load a VAE run (``best.pt``, else ``last.pt``) and open a dataset that fits it.

    :param vae_run: a ``worldmodel train-vae`` run folder.
    :param data: a dataset folder, or ``None``.
    :raises UserError: missing run or dataset, or frames of another shape than the VAE's.
    """
    from worldmodel.vae import load_vae

    vae_run = Path(vae_run)
    if not vae_run.is_dir():
        raise RunNotFoundError(f"VAE run {str(vae_run)!r} not found; pass a `worldmodel train-vae` "
                        "run folder")
    vae = load_vae(vae_run, "last" if checkpoint_name(vae_run) == "last.pt" else "best")
    if data is None:
        return vae, None
    from worldmodel.dataset import open_dataset

    if not Path(data).exists():
        raise RunNotFoundError(f"dataset {str(data)!r} not found; pass a folder written by "
                        "`worldmodel collect`")
    reader = open_dataset(data)
    if tuple(reader.frame_shape) != tuple(vae.image_shape):
        h, w, c = reader.frame_shape
        vh, vw, vc = vae.image_shape
        raise UserError(
            f"{data} holds {h}x{w}x{c} frames but the VAE {vae_run} expects {vh}x{vw}x{vc} "
            f"(env.image_size={vh}, grayscale={vc == 1}); use a dataset collected with the "
            "VAE's env settings"
        )
    want, got = vae.config.env.id, reader.manifest.get("env_id")
    if got is not None and got != want:
        log.warning("the VAE was trained on %s but the dataset %s is from %s", want, data,
                    got)
    return vae, reader


def checkpoint_name(vae_run: Path) -> str:
    """The checkpoint :func:`load_inputs` loads: ``best.pt``, else ``last.pt``."""
    if (vae_run / "best.pt").is_file() or not (vae_run / "last.pt").is_file():
        return "best.pt"
    return "last.pt"


def sample_frames(
    reader: DatasetReader, max_frames: int = 2000, seed: int = 0, max_episodes: int = 64
) -> Sample:
    """A bounded, seeded sample of frames spread over up to ``max_episodes`` episodes.

    Episodes are drawn in a seeded random order; from each, up to
    ``ceil(max_frames / episodes drawn)`` frames are taken at evenly spaced steps, until
    ``max_frames`` frames are gathered. Only the drawn episodes are read.

    :param reader: an open dataset.
    :param max_frames: cap on the frames returned.
    :param seed: which episodes (and so frames) are drawn.
    :param max_episodes: cap on the episodes read.
    """
    rng = np.random.default_rng(seed)
    n_eps = min(reader.num_episodes, max_episodes)
    order = rng.permutation(reader.num_episodes)[:n_eps]
    per_episode = max(1, math.ceil(max_frames / max(n_eps, 1)))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("frames", "episode", "t", "reward",
                                                           "state")}
    count = 0
    for i in order:
        if count >= max_frames:
            break
        ep = reader.episode(int(i))
        take = min(ep.length, per_episode, max_frames - count)
        steps = np.unique(np.linspace(0, ep.length - 1, take).round().astype(np.int64))
        parts["frames"].append(ep.obs[steps])
        parts["episode"].append(np.full(len(steps), int(i), np.int64))
        parts["t"].append(steps)
        parts["reward"].append(np.asarray(ep.reward[steps], np.float32))
        if ep.state is not None:
            parts["state"].append(np.asarray(ep.state[steps], np.float32).reshape(len(steps), -1))
        count += len(steps)
    cat = {k: np.concatenate(v) for k, v in parts.items() if v}
    return Sample(cat["frames"], cat["episode"], cat["t"], cat["reward"], cat.get("state"))


# --------------------------------------------------------------------------------------------
# Latent computations


def posterior(vae: LoadedVAE, frames: np.ndarray, batch_size: int = 256) -> Posterior:
    """Posterior mean and log-variance of frames (no gradients, in batches).

    :param vae: the loaded VAE.
    :param frames: ``(N, H, W, C)`` uint8.
    """
    import torch

    from worldmodel.vae import frames_to_tensor

    vae.encode(frames[:1])  # shape/dtype check with the VAE's one-line errors
    mus, logvars = [], []
    with torch.no_grad():
        for i in range(0, len(frames), batch_size):
            mu, logvar = vae.model.encode(frames_to_tensor(frames[i : i + batch_size],
                                                           vae.device))
            mus.append(mu.cpu().numpy())
            logvars.append(logvar.cpu().numpy())
    return Posterior(np.concatenate(mus).astype(np.float32),
                     np.concatenate(logvars).astype(np.float32))


def kl_per_dim(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """Mean KL(q(z|x) || N(0, I)) of each latent dimension over frames, in nats.

    :param mu: ``(N, Z)``; :param logvar: ``(N, Z)``.
    :return: ``(Z,)`` float64.
    """
    mu64, lv = np.asarray(mu, np.float64), np.asarray(logvar, np.float64)
    return np.asarray((-0.5 * (1.0 + lv - mu64**2 - np.exp(lv))).mean(0))


def latent_traversals(
    vae: LoadedVAE,
    z0: np.ndarray,
    std: np.ndarray,
    dims: Sequence[int],
    steps: int = 7,
    span: float = 3.0,
) -> np.ndarray:
    """Decode sweeps of single latent dimensions around ``z0``.

    :param vae: the loaded VAE.
    :param z0: ``(Z,)`` the centre (a real frame's ``mu``).
    :param std: ``(Z,)`` the sweep unit of each dimension.
    :param dims: the dimensions to sweep, one output row each.
    :param steps: values per dimension, evenly spaced over ``z0_d +- span * std_d``.
    :return: ``(len(dims), steps, H, W, C)`` uint8.
    """
    offsets = np.linspace(-span, span, steps)
    z = np.repeat(np.asarray(z0, np.float32)[None, None], len(dims), 0).repeat(steps, 1)
    for row, d in enumerate(dims):
        z[row, :, d] = z0[d] + offsets * std[d]
    images = vae.decode(z.reshape(-1, z.shape[-1]))
    return images.reshape(len(dims), steps, *images.shape[1:])


def interpolate(vae: LoadedVAE, z_a: np.ndarray, z_b: np.ndarray, steps: int = 8) -> np.ndarray:
    """Decode the straight line from ``z_a`` to ``z_b``.

    :param z_a: ``(Z,)``; :param z_b: ``(Z,)``.
    :return: ``(steps, H, W, C)`` uint8, ``steps`` evenly spaced points including both ends.
    """
    a = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    return vae.decode((1.0 - a) * z_a[None] + a * z_b[None])


def project_2d(z: np.ndarray, method: Method = "pca", seed: int = 0) -> tuple[np.ndarray, str]:
    """Project latents to 2-D.

    :param z: ``(N, Z)`` latents.
    :param method: ``pca`` (sklearn), ``tsne`` (sklearn) or ``umap`` (needs umap-learn).
    :return: ``(N, 2)`` float32 coordinates and a one-line description of the projection.
    """
    z = np.asarray(z, np.float64)
    if method == "tsne" and len(z) < 5:
        log.info("projection: %d points are too few for t-SNE; using PCA", len(z))
        method = "pca"
    if z.shape[1] == 1:  # nothing to project: plot the one dimension against zero
        return np.c_[z, np.zeros_like(z)].astype(np.float32), "the single latent dimension"
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed)
        xy = pca.fit_transform(z)
        ev = pca.explained_variance_ratio_
        return xy.astype(np.float32), f"PCA, explained variance {ev[0]:.0%} + {ev[1]:.0%}"
    if method == "tsne":
        from sklearn.manifold import TSNE

        if len(z) > 1000:
            log.info("projection: t-SNE of %d points takes about a minute on 2 cores",
                     len(z))

        perplexity = float(min(30.0, max(2.0, (len(z) - 1) / 3)))
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed
                  ).fit_transform(z)
        return xy.astype(np.float32), f"t-SNE, perplexity {perplexity:.0f}"
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise UserError("projection method umap needs umap-learn: "
                            "`pip install umap-learn`, or use pca or tsne") from None
        xy = umap.UMAP(n_components=2, random_state=seed).fit_transform(z)
        return np.asarray(xy, np.float32), "UMAP"
    raise UserError(f"unknown projection method {method!r}; use pca, tsne or umap")


def held_out_representation(
    vae: LoadedVAE, reader: DatasetReader, max_frames: int, seed: int
) -> dict[str, Any] | None:
    """Linear-probe R^2 and KNN-MSE of the VAE's latents on held-out episodes.

    The metrics of :mod:`worldmodel.metrics`, with 20% of the dataset's episodes (seeded) held
    out and up to ``max_frames`` training frames.

    :return: the metrics, or ``None`` when the dataset has too few episodes or frames.
    """
    from worldmodel import metrics

    ids = np.random.default_rng(seed).permutation(reader.episode_ids)
    if len(ids) < 2:
        log.info("one episode only, no held-out episodes for the probe")
        return None
    n_test = max(1, round(0.2 * len(ids)))
    test_ids, train_ids = ids[:n_test].tolist(), ids[n_test:].tolist()
    train = metrics.load_probe_data(reader, train_ids, max_frames=max_frames, seed=seed)
    test = metrics.load_probe_data(reader, test_ids, max_frames=max(1, max_frames // 3),
                                   seed=seed)
    if len(train.frames) < 2 or len(test.frames) < 2:
        return None
    return dict(metrics.representation_metrics(vae.encode, train, test, seed=seed))
