"""How well do latents keep the true state? Linear probe R^2 and KNN-MSE, with a baseline.

For datasets whose env reports a true state (``Episode.state``, e.g. Reach's object positions),
two metrics from the state-representation literature (S-RL Toolbox, Raffin et al.):

* **linear probe R^2**: a ridge regression from latents to the true state, fitted on frames of
  the training episodes and scored (R^2 per state component and their mean) on frames of
  held-out episodes. 1 = the state is a linear function of the latent; 0 = no better than
  predicting the mean state. A component that is constant on the held-out frames has no R^2
  (no variance to explain) and is left out of the mean.
* **KNN-MSE**: for each held-out frame, the mean squared distance in true state between it and
  its ``k`` nearest neighbours in latent space (Euclidean), averaged over frames. Low = frames
  that the representation puts together really are in similar states.

Both are also computed for a **random projection** of the raw pixels (a fixed Gaussian matrix to
as many dimensions as the latent) so that the numbers have a reference: random features are a
strong baseline in that literature, and a VAE worth its training must beat them.

Example:
    >>> rng = np.random.default_rng(0)
    >>> state = rng.uniform(size=(200, 2))
    >>> latent = np.c_[state @ [[2.0, 0.0], [1.0, -1.0]], rng.normal(size=(200, 3))]
    >>> r2 = linear_probe_r2(latent[:150], state[:150], latent[150:], state[150:])
    >>> bool(r2["mean"] > 0.99)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from worldmodel.dataset import DatasetReader

__all__ = [
    "ACTIVE_KL_NATS",
    "ProbeData",
    "knn_mse",
    "linear_probe_r2",
    "load_probe_data",
    "random_projection",
    "representation_metrics",
]

#: A latent dimension whose mean KL(q(z|x) || N(0, I)) exceeds this many nats is "active" (the
#: decoder uses it): train-vae's ``active_units`` and visualize's count use this one threshold.
ACTIVE_KL_NATS = 0.01


class ProbeData(NamedTuple):
    """Frames and true states of whole episodes, for the representation metrics.

    :param frames: ``(N, H, W, C)`` uint8.
    :param states: ``(N, S)`` float32.
    :param episodes: ``(N,)`` int64, the episode id of each frame.
    """

    frames: np.ndarray
    states: np.ndarray
    episodes: np.ndarray


def load_probe_data(
    reader: DatasetReader, episode_ids: Sequence[int], max_frames: int, seed: int = 0
) -> ProbeData:
    """Up to ``max_frames`` frames spread evenly over (a seeded sample of) the episodes.

    Each episode gives an equal share of consecutive frames from a random offset (reading only
    those, so the cost stays bounded on long episodes). Spreading matters: a state component
    that is constant within an episode (Reach's target) takes one value per episode, so the
    probe needs many episodes more than many frames.

    :param reader: an open dataset with a state (``reader.has_state``; ``UserError`` otherwise).
    :param episode_ids: the episodes to draw from (ids, as in ``FrameDataset.episode_ids``).
    :param max_frames: cap on the frames returned.
    :param seed: which episodes (when there are more than ``max_frames``) and frames are drawn.
    """
    rng = np.random.default_rng(seed)
    position = {int(e): i for i, e in enumerate(reader.episode_ids)}
    ids = rng.permutation(np.asarray(episode_ids, dtype=np.int64))[:max_frames]
    index = reader.episode_index()
    lengths = np.array([int(index[position[int(e)]]["length"]) for e in ids], dtype=np.int64)
    # Frames per episode: an even share of max_frames, at most the episode's length.
    share = np.minimum(lengths, max(1, max_frames // max(len(ids), 1)))
    frames, states, episodes = [], [], []
    for ep_id, take, length in zip(ids, share, lengths, strict=True):
        entry = index[position[int(ep_id)]]
        lo = int(entry["start"]) + int(rng.integers(0, length - take + 1))
        frames.append(reader.read_range(entry["shard"], "obs", lo, lo + int(take)))
        states.append(reader.read_range(entry["shard"], "state", lo, lo + int(take)))
        episodes.append(np.full(int(take), ep_id, np.int64))
    if not frames:
        h, w, c = reader.frame_shape
        s = reader.layout.state_shape or (0,)
        return ProbeData(np.zeros((0, h, w, c), np.uint8), np.zeros((0, *s), np.float32),
                         np.zeros(0, np.int64))
    return ProbeData(np.concatenate(frames), np.concatenate(states).astype(np.float32),
                     np.concatenate(episodes))


def linear_probe_r2(
    train_x: np.ndarray,
    train_state: np.ndarray,
    test_x: np.ndarray,
    test_state: np.ndarray,
    alpha: float = 1e-3,
) -> dict[str, Any]:
    """R^2 of a linear (ridge) map from features to the true state, on held-out data.

    Features are standardised on the training set first, so ``alpha`` means the same for any
    latent scale.

    :param train_x: ``(N, D)`` features of training frames.
    :param train_state: ``(N, S)`` their true states.
    :param test_x: ``(M, D)`` features of held-out frames.
    :param test_state: ``(M, S)`` their true states.
    :param alpha: ridge penalty.
    :return: ``{"per_dim": [S floats], "mean": float, "constant": [indices]}``. A state
        component that is constant on the held-out frames has no variance to explain:
        scikit-learn scores it 1.0 when predicted exactly and 0.0 otherwise, which says
        nothing about the features, so such components are listed in ``constant`` and left
        out of ``mean`` (NaN when every component is constant).
    """
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), Ridge(alpha=alpha))
    probe.fit(np.asarray(train_x, np.float64), np.asarray(train_state, np.float64))
    pred = probe.predict(np.asarray(test_x, np.float64))
    per_dim = np.atleast_1d(r2_score(test_state, pred, multioutput="raw_values"))
    target = np.asarray(test_state).reshape(len(pred), -1)
    constant = np.all(target == target[:1], axis=0)
    varied = per_dim[~constant]
    return {"per_dim": [float(v) for v in per_dim],
            "mean": float(varied.mean()) if varied.size else float("nan"),
            "constant": [int(j) for j in np.flatnonzero(constant)]}


def knn_mse(features: np.ndarray, state: np.ndarray, k: int = 5) -> float:
    """Mean squared true-state distance between each frame and its ``k`` nearest neighbours.

    :param features: ``(N, D)`` representation of ``N > k`` frames.
    :param state: ``(N, S)`` their true states.
    :param k: neighbours per frame (the frame itself excluded).
    """
    from sklearn.neighbors import NearestNeighbors

    features = np.asarray(features, np.float64)
    k = min(k, len(features) - 1)
    if k < 1:
        return float("nan")
    nn = NearestNeighbors(n_neighbors=k + 1).fit(features)
    _, idx = nn.kneighbors(features)
    neighbours = idx[:, 1:]  # column 0 is the frame itself (or an exact duplicate of it)
    diff = state[neighbours] - state[:, None, :]
    return float(np.square(diff).sum(-1).mean())


def random_projection(
    train_frames: np.ndarray, n_components: int, seed: int = 0
) -> Callable[[np.ndarray], np.ndarray]:
    """A fixed Gaussian random projection of raw pixels, the baseline representation.

    :param train_frames: ``(N, H, W, C)`` uint8, used only for the input size.
    :param n_components: output dimension (use the VAE's ``latent_dim``).
    :param seed: the projection matrix's seed.
    :return: a function ``(M, H, W, C) uint8 -> (M, n_components) float32``.
    """
    from sklearn.random_projection import GaussianRandomProjection

    proj = GaussianRandomProjection(n_components=n_components, random_state=seed)
    proj.fit(np.zeros((1, int(np.prod(train_frames.shape[1:]))), np.float32))

    def transform(frames: np.ndarray) -> np.ndarray:
        flat = frames.reshape(len(frames), -1).astype(np.float32) / 255.0
        return np.asarray(proj.transform(flat), np.float32)

    return transform


def representation_metrics(
    encode: Callable[[np.ndarray], np.ndarray],
    train: ProbeData,
    test: ProbeData,
    k: int = 5,
    baseline: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Linear probe R^2 and KNN-MSE of an encoder, next to those of a random projection.

    :param encode: ``(N, H, W, C) uint8 -> (N, Z) float32``, e.g. ``LoadedVAE.encode``.
    :param train: frames of training episodes (the probe is fitted on them).
    :param test: frames of held-out episodes (everything is scored on them).
    :param k: neighbours for KNN-MSE.
    :param baseline: a previous result's ``"random_projection"`` entry, reused as is (it does
        not change while the encoder trains); computed when ``None``.
    :param seed: seed of the random projection.
    :return: ``{"probe_r2": {"per_dim", "mean", "constant"}, "knn_mse": float, "random_projection":
        {"probe_r2": ..., "knn_mse": ...}, "frames": {"train": N, "test": M}}``.
    """
    z_train, z_test = encode(train.frames), encode(test.frames)
    if baseline is None:
        project = random_projection(train.frames, z_train.shape[1], seed)
        r_train, r_test = project(train.frames), project(test.frames)
        baseline = {
            "probe_r2": linear_probe_r2(r_train, train.states, r_test, test.states),
            "knn_mse": knn_mse(r_test, test.states, k),
        }
    return {
        "probe_r2": linear_probe_r2(z_train, train.states, z_test, test.states),
        "knn_mse": knn_mse(z_test, test.states, k),
        "random_projection": baseline,
        "frames": {"train": len(train.frames), "test": len(test.frames)},
    }
