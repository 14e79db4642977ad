"""``worldmodel train-memory``: train the memory model M on a dataset encoded by a VAE run.

The run folder explains itself::

    RUN/config.yaml      the resolved config (rebuilds the model: ``load_memory(RUN)``)
    RUN/last.pt          model, optimizer, step, RNG state, best-so-far: what --resume reads
    RUN/best.pt          the same, for the step with the lowest validation NLL
    RUN/metrics.jsonl    one JSON record per log / validation step (same keys as TensorBoard)
    RUN/events.out.*     TensorBoard: memory/*, val/*
    RUN/summary.json     final held-out metrics against the two baselines, speed, warnings

**The latent cache.** The dataset is encoded once per (dataset, VAE weights): the posterior
``mu`` and ``logvar`` of every frame (float32) go to
``VAE_RUN/latents/{weights_hash[:16]}/{dataset_key[:16]}.npz``, written atomically, beside the
weights they come from. ``weights_hash`` is the sha256 of the weights ``memory.vae_checkpoint``
names (:func:`worldmodel.vae.state_dict_hash`); ``dataset_key`` hashes the dataset's episodes
(ids, lengths, checksums) and frame shape, so a dataset that grew gets a new file. The file
records both hashes in full and is used only when both match (a hash prefix that collides, a
VAE resumed since, a truncated file: it is rebuilt). Every memory run on that dataset and VAE
reuses it. The VAE run folder is local (the dataset may be a URL), and ``train-vae`` never
removes ``latents/``.

**Training data.** As in World Models, ``z`` is resampled from ``(mu, logvar)`` for every batch
(so every epoch sees new samples); the noise is drawn from ``(seed, epoch, batch)``. Windows of
``memory.seq_len`` steps start every ``seq_len`` steps of each training episode and never cross
an episode: an episode's last window (and any episode shorter than ``seq_len``) is padded and
its padding masked out of the loss. Each window starts from a zero LSTM state (World Models'
windows were whole CarRacing episodes of 1,000 steps). Step ``t`` of a window predicts
``z_{t+1}`` (masked on an episode's last step, whose next frame is not stored), the reward of
``a_t`` and whether the env *terminated* after it (a time-limit truncation is not part of the
dynamics and is not a done).
Loss: mixture NLL per latent dimension + ``reward_weight * Huber`` + ``done_weight * BCE``;
Adam, gradient norm clipped to ``memory.grad_clip``. The reward head works on a standardised
scale, ``(r - median) / (1.4826 MAD)`` of the training rewards (saved with the weights): Reach's
dense reward has a std of ~0.01, far below the NLL's scale, and its rare +1 bonuses would
dominate a squared error on a mean/std scale (held-out reward R^2 0.26 unscaled, 0.53 with a
mean/std scale and MSE, 0.96 with this; one seed, quickstart data).

**Held-out metrics** (the validation episodes of :func:`worldmodel.loaders.split_episodes`, as
``train-vae`` splits them; latents ``z = mu``): the mixture NLL; the open-loop latent MSE after
``k = 1, 5, 15`` steps, where M starts from the state the real history gave it and then reads
its own prediction (the mixture's expected value, :func:`~worldmodel.memory.mixture_mean`) with
the real actions, against two baselines on the same starts: copy-last-z and a linear
least-squares model of ``z_{t+1}`` from ``(z_t, a_t)`` fitted on the training episodes, rolled
out open loop too; the reward R^2, of all steps and of the steps that did not terminate (a
terminal bonus M cannot foresee dominates the first); the done head's precision and recall
(threshold 0.5; the recall counts the terminal steps only, reported with their number).

**Several datasets** (``-d DATA -d DATA2 ...``: World Models' iterative procedure adds the
episodes each round's agent collects, :mod:`agents.iterate`): they must hold the same frame
shape and action space. Each keeps its own latent cache and its own validation episodes (split
as above, per dataset); the training and held-out episodes are the union. The first dataset is
the run's ``inputs.dataset`` (the dream's start frames and action space); ``summary.json``
records every dataset (``inputs.datasets``, ``inputs.latent_caches``, ``inputs.dataset_frames``)
and their frames in total, the real env steps M's data cost (``inputs.real_env_steps_collected``).

Checkpoints and resume follow ``train_vae``: ``best.pt`` (lower validation NLL) before
``last.pt`` at every validation; ``--resume`` refuses other ``output`` settings, other
validation episodes, another list of datasets and other VAE weights, and continues exactly
(the data order and the ``z`` noise are functions of the seed, the epoch and the batch).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from worldmodel.config import Config
from worldmodel.errors import UserError
from worldmodel.io import atomic_write
from worldmodel.memory import (
    MDNRNN,
    action_dim,
    build_memory,
    encode_actions,
    mdn_loss,
    mixture_mean,
)
from worldmodel.runfolder import RunFolder, check_kind, require_kind
from worldmodel.stages import StageSpec
from worldmodel.training import (
    Prefetch,
    RunLog,
    batch_stream,
    open_trainer_run,
    prefetch_depth,
    progress_bar,
    save_checkpoints,
)
from worldmodel.utils import resolve_device, seed_everything
from worldmodel.vae import LoadedVAE, load_vae

if TYPE_CHECKING:
    from worldmodel.dataset import DatasetReader

log = logging.getLogger("worldmodel")

#: Files of an attempt that never wrote ``last.pt``, removed when a run starts over.
STALE_FILES = ("metrics.jsonl", "summary.json", "best.pt", "events.*")
#: Open-loop horizons of the held-out metrics.
HORIZONS = (1, 5, 15)
#: At most this many open-loop start steps (a seeded sample of the held-out steps).
MAX_STARTS = 4096
CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------
# The latent cache and the episodes


class Episodes(NamedTuple):
    """Episodes laid end to end (all of the dataset, or one split).

    :param mu, logvar: ``(N, Z)`` float32, the VAE posterior of each frame.
    :param action: ``(N, A)`` float32 action vectors (Discrete: one-hot).
    :param reward: ``(N,)`` float32.
    :param done: ``(N,)`` bool, ``terminated`` after the step.
    :param starts, lengths: ``(E,)`` int64, where each episode begins in the arrays, its steps.
    """

    mu: np.ndarray
    logvar: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    done: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray

    def select(self, positions: list[int]) -> Episodes:
        """The episodes at ``positions`` (in the dataset's id order), laid end to end."""
        rows = np.concatenate([np.arange(self.starts[p], self.starts[p] + self.lengths[p])
                               for p in positions]) if positions else np.zeros(0, np.int64)
        lengths = self.lengths[positions]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return Episodes(self.mu[rows], self.logvar[rows], self.action[rows], self.reward[rows],
                        self.done[rows], starts, lengths.astype(np.int64))


def concat_episodes(parts: Sequence[Episodes]) -> Episodes:
    """Episodes of several datasets laid end to end (in the order of ``parts``)."""
    if len(parts) == 1:
        return parts[0]
    lengths = np.concatenate([p.lengths for p in parts]).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return Episodes(np.concatenate([p.mu for p in parts]),
                    np.concatenate([p.logvar for p in parts]),
                    np.concatenate([p.action for p in parts]),
                    np.concatenate([p.reward for p in parts]),
                    np.concatenate([p.done for p in parts]), starts, lengths)


def dataset_key(reader: DatasetReader) -> str:
    """sha256 of the dataset's episodes (id, length, checksums) and frame shape, hex."""
    items = [[int(e["id"]), int(e["length"]), e.get("crc32")] for e in reader.episode_index()]
    text = json.dumps({"frames": list(reader.frame_shape), "episodes": items}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(vae: LoadedVAE, reader: DatasetReader) -> Path:
    """Where the latents of ``reader``'s frames under ``vae``'s weights are kept."""
    assert vae.run_dir is not None
    return (vae.run_dir / "latents" / vae.weights_hash[:16] / f"{dataset_key(reader)[:16]}.npz")


def encode_dataset(vae: LoadedVAE, reader: DatasetReader) -> tuple[np.ndarray, np.ndarray]:
    """The posterior ``mu``, ``logvar`` of every frame, episodes in id order: ``(N, Z)`` float32."""
    from worldmodel.latents import posterior

    mus, logvars = [], []
    for e in reader.episode_index():
        lo = int(e["start"])
        post = posterior(vae, reader.read_range(e["shard"], "obs", lo, lo + int(e["length"])))
        mus.append(post.mu)
        logvars.append(post.logvar)
    return np.concatenate(mus), np.concatenate(logvars)


def cached_latents(vae: LoadedVAE, reader: DatasetReader) -> tuple[np.ndarray, np.ndarray, Path]:
    """``mu``, ``logvar`` of every frame from the cache (built on first use), and its path."""
    path = cache_path(vae, reader)
    key = dataset_key(reader)
    if path.is_file():
        try:
            with np.load(path) as f:
                ok = (str(f["weights_hash"]) == vae.weights_hash and str(f["dataset_key"]) == key
                      and int(f["version"]) == CACHE_VERSION
                      and f["mu"].shape == (reader.num_frames, vae.latent_dim))
                if ok:
                    log.info("train-memory: latents from %s", path)
                    return f["mu"], f["logvar"], path
        except (OSError, ValueError, KeyError) as e:
            log.warning("latent cache %s is unreadable (%s): encoding again", path, e)
        log.info("latent cache %s does not match this VAE and dataset: encoding again", path)
    started = time.perf_counter()
    mu, logvar = encode_dataset(vae, reader)
    buf = io.BytesIO()
    np.savez(buf, mu=mu, logvar=logvar, weights_hash=np.array(vae.weights_hash),
             dataset_key=np.array(key), version=np.array(CACHE_VERSION))
    try:
        atomic_write(path, lambda f: f.write(buf.getbuffer()))
    except OSError as e:  # a read-only VAE run: train anyway, without a cache
        log.warning("cannot write the latent cache %s (%s): the next run encodes again", path,
                    e.strerror or e)
    log.info("train-memory: encoded %d frames in %.1f s (cache %s)", len(mu),
             time.perf_counter() - started, path)
    return mu, logvar, path


def load_episodes(reader: DatasetReader, mu: np.ndarray, logvar: np.ndarray,
                  space: dict[str, Any]) -> Episodes:
    """Every episode's latents with its action vectors, rewards and done flags."""
    actions, rewards, dones, lengths = [], [], [], []
    for e in reader.episode_index():
        shard, lo = e["shard"], int(e["start"])
        hi = lo + int(e["length"])
        try:
            rewards.append(reader.read_range(shard, "reward", lo, hi).astype(np.float32))
        except UserError as err:
            raise UserError(f"dataset {reader.loc} has no readable rewards ({err}); the memory "
                            "model predicts them: collect the dataset again") from None
        actions.append(encode_actions(reader.read_range(shard, "action", lo, hi), space))
        dones.append(reader.read_range(shard, "terminated", lo, hi).astype(bool))
        lengths.append(hi - lo)
    lens = np.asarray(lengths, np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    return Episodes(mu, logvar, np.concatenate(actions), np.concatenate(rewards),
                    np.concatenate(dones), starts, lens)


# --------------------------------------------------------------------------------------------
# Windows


class Batch(NamedTuple):
    """``B`` windows of ``L`` steps (numpy arrays; torch tensors after :func:`to_device`).

    Float32 unless said.

    :param z: ``(B, L, Z)`` latents ``z_t``; :param target: ``(B, L, Z)`` latents ``z_{t+1}``.
    :param action: ``(B, L, A)``; :param reward: ``(B, L)``; :param done: ``(B, L)`` 0/1.
    :param step_mask: ``(B, L)`` bool, the step exists (not padding).
    :param target_mask: ``(B, L)`` bool, ``z_{t+1}`` exists.
    """

    z: Any
    target: Any
    action: Any
    reward: Any
    done: Any
    step_mask: Any
    target_mask: Any


class Windows:
    """Shuffled batches of windows inside single episodes, ``z`` resampled for every batch.

    :param episodes: the split's episodes.
    :param seq_len: steps per window ``L``.
    :param batch_size: windows per batch (the last batch of an epoch may be smaller).
    :param seed: seeds the order (``(seed, epoch)``) and the noise (``(seed, epoch, batch)``).
    :param sample: draw ``z ~ N(mu, exp(logvar))``; ``False``: ``z = mu``.
    """

    def __init__(self, episodes: Episodes, seq_len: int, batch_size: int, seed: int,
                 sample: bool = True) -> None:
        self.ep, self.seq_len, self.batch_size, self.seed = episodes, seq_len, batch_size, seed
        self.sample = sample
        self.windows = np.array([(e, s) for e, n in enumerate(episodes.lengths)
                                 for s in range(0, int(n), seq_len)], np.int64).reshape(-1, 2)
        if len(self.windows) == 0:
            raise UserError("the training split has no steps; collect more episodes")

    def __len__(self) -> int:
        """Batches per epoch."""
        return math.ceil(len(self.windows) / self.batch_size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches ``start, start + 1, ...`` of ``epoch``."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
        for i in range(start, len(self)):
            pick = self.windows[order[i * self.batch_size : (i + 1) * self.batch_size]]
            noise = np.random.default_rng([self.seed, epoch, i]) if self.sample else None
            yield self.gather(pick, noise)

    def gather(self, pick: np.ndarray, noise: np.random.Generator | None) -> Batch:
        """The windows ``pick`` (rows of ``(episode, start)``) as a batch."""
        ep, L = self.ep, self.seq_len
        t = pick[:, 1:2] + np.arange(L + 1)  # (B, L + 1) steps z_t .. z_{t+L}
        lengths = ep.lengths[pick[:, 0]][:, None]
        exists = t < lengths
        rows = ep.starts[pick[:, 0]][:, None] + np.minimum(t, lengths - 1)
        z = ep.mu[rows]
        if noise is not None:
            eps = noise.standard_normal(z.shape, dtype=np.float32)
            z = z + np.exp(0.5 * ep.logvar[rows]) * eps
        step = exists[:, :L]
        steps = rows[:, :L]
        return Batch(
            z=z[:, :L], target=z[:, 1:],
            action=ep.action[steps] * step[..., None],
            reward=ep.reward[steps] * step, done=(ep.done[steps] & step).astype(np.float32),
            step_mask=step, target_mask=exists[:, 1:],
        )


#: :func:`standardize_reward` uses the reward's std when its MAD scale is below this fraction
#: of it (Reach's dense reward: MAD scale ~0.4 of the std; CarRacing's: ~1e-6).
MIN_MAD_FRACTION = 0.05


def standardize_reward(model: MDNRNN, train: Episodes) -> None:
    """Set the reward head's scale to the training split's reward mean and std (floored)."""
    reward = train.reward.astype(np.float64)  # a split's steps lie end to end
    if len(reward) == 0:
        return
    mean = float(np.median(reward))
    std = 1.4826 * float(np.median(np.abs(reward - mean)))  # the MAD: robust to rare bonuses
    # A reward that is one value on most steps (CarRacing: -0.2 on every step without a new
    # tile, float32 round-off apart) has a MAD of ~0 (1e-6 measured): the rare steps would be
    # millions of units out and the reward Huber would swamp the mixture NLL. Such a reward is
    # scaled by its standard deviation instead.
    if std < MIN_MAD_FRACTION * float(reward.std()):
        std = float(reward.std())
    model.reward_mean.fill_(mean)
    model.reward_std.fill_(max(std, 1e-6 * max(abs(mean), 1.0)))


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch as torch tensors on ``device``."""
    return Batch(*(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in batch))


class LossTerms(NamedTuple):
    """The memory's loss and its terms (scalar float32 tensors)."""

    loss: torch.Tensor
    nll: torch.Tensor
    reward_loss: torch.Tensor
    done_bce: torch.Tensor


def reward_huber(model: MDNRNN, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-step Huber loss (delta 1) of rewards on the head's standardised scale."""
    return F.huber_loss(pred / model.reward_std, target / model.reward_std, reduction="none",
                        delta=1.0)


def memory_loss(model: MDNRNN, b: Batch, cfg: Config) -> LossTerms:
    """Mixture NLL + ``reward_weight`` * standardised reward Huber + ``done_weight`` * BCE."""
    out, _ = model(b.z, b.action)
    nll = mdn_loss(out, b.target, b.target_mask)
    m = b.step_mask.float()
    n = m.sum().clamp(min=1.0)
    # on the standardised scale of the reward head (MDNRNN.reward_std)
    reward_loss = (reward_huber(model, out.reward, b.reward) * m).sum() / n
    bce = F.binary_cross_entropy_with_logits(out.done, b.done, reduction="none")
    done_bce = (bce * m).sum() / n
    loss = nll + cfg.memory.reward_weight * reward_loss + cfg.memory.done_weight * done_bce
    return LossTerms(loss, nll, reward_loss, done_bce)


# --------------------------------------------------------------------------------------------
# Held-out metrics


def fit_linear(train: Episodes) -> np.ndarray:
    """Least squares ``z_{t+1} ~ [z_t, a_t, 1] W`` on the training episodes: ``W (Z+A+1, Z)``."""
    x, y = [], []
    for s, n in zip(train.starts, train.lengths, strict=True):
        if n < 2:
            continue
        rows = np.arange(s, s + n - 1)
        x.append(np.concatenate([train.mu[rows], train.action[rows],
                                 np.ones((len(rows), 1), np.float32)], axis=1))
        y.append(train.mu[rows + 1])
    if not x:
        z, a = train.mu.shape[1], train.action.shape[1]
        return np.vstack([np.eye(z), np.zeros((a + 1, z))]).astype(np.float64)
    w, *_ = np.linalg.lstsq(np.concatenate(x).astype(np.float64),
                            np.concatenate(y).astype(np.float64), rcond=None)
    return np.asarray(w)


def _starts(val: Episodes, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Open-loop start steps: ``(episode, t)`` with ``z_{t+1}`` known, at most MAX_STARTS."""
    pairs = np.array([(e, t) for e, n in enumerate(val.lengths) for t in range(int(n) - 1)],
                     np.int64).reshape(-1, 2)
    if len(pairs) > MAX_STARTS:
        keep = np.sort(np.random.default_rng(seed).choice(len(pairs), MAX_STARTS, replace=False))
        pairs = pairs[keep]
    return pairs[:, 0], pairs[:, 1]


@torch.no_grad()
def evaluate(model: MDNRNN, val: Episodes, linear: np.ndarray, cfg: Config,
             device: torch.device) -> dict[str, float]:
    """The held-out metrics (see the module docstring) as ``val/*`` scalars."""
    model.eval()
    # Teacher forcing over every held-out episode at once (padded), step by step, keeping the
    # LSTM state at each open-loop start.
    t_max = int(val.lengths.max())
    t = np.arange(t_max)
    exists = t[None] < val.lengths[:, None]  # (E, T)
    rows = val.starts[:, None] + np.minimum(t[None], val.lengths[:, None] - 1)
    mu = torch.from_numpy(val.mu[rows]).to(device)  # (E, T, Z)
    act = torch.from_numpy(val.action[rows]).to(device)
    start_ep, start_t = _starts(val, cfg.seed)
    h0 = torch.zeros(len(start_ep), model.hidden_size, device=device)
    c0 = torch.zeros_like(h0)
    outs = []
    state = None
    for step in range(t_max):
        here = np.nonzero(start_t == step)[0]
        if len(here) and state is not None:
            h0[here] = state[0][0, start_ep[here]]
            c0[here] = state[1][0, start_ep[here]]
        out, state = model(mu[:, step : step + 1], act[:, step : step + 1], state)
        outs.append(out)
    out = type(outs[0])(*(torch.cat(parts, dim=1) for parts in zip(*outs, strict=True)))
    exists_t = torch.from_numpy(exists).to(device)
    target_ok = torch.from_numpy(t[None] + 1 < val.lengths[:, None]).to(device)
    target = torch.cat([mu[:, 1:], mu[:, -1:]], dim=1)
    metrics: dict[str, float] = {"val/nll": float(mdn_loss(out, target, target_ok))}

    reward = torch.from_numpy(val.reward[rows]).to(device)[exists_t]
    pred_r = out.reward[exists_t]
    sst = float((reward - reward.mean()).square().sum())
    sse = float((pred_r - reward).square().sum())
    metrics["val/reward_mse"] = sse / max(len(reward), 1)
    metrics["val/reward_r2"] = 1.0 - sse / sst if sst > 0 else math.nan
    done = torch.from_numpy(val.done[rows]).to(device)[exists_t]
    # The same on the steps that did not end the episode: a rare terminal bonus (Reach's +1)
    # that M cannot foresee dominates the R^2 of all steps.
    dense, pred_dense = reward[~done], pred_r[~done]
    sst = float((dense - dense.mean()).square().sum()) if len(dense) else 0.0
    sse = float((pred_dense - dense).square().sum())
    metrics["val/reward_r2_nonterminal"] = 1.0 - sse / sst if sst > 0 else math.nan
    said = out.done_prob[exists_t] > 0.5
    tp = int((said & done).sum())
    metrics["val/done_precision"] = tp / int(said.sum()) if int(said.sum()) else math.nan
    metrics["val/done_recall"] = tp / int(done.sum()) if int(done.sum()) else math.nan
    metrics["val/done_terminal_steps"] = float(done.sum())
    metrics["val/done_bce"] = float(F.binary_cross_entropy_with_logits(
        out.done[exists_t], done.float()))
    reward_loss = float(reward_huber(model, pred_r, reward).mean())
    metrics["val/loss"] = (metrics["val/nll"] + cfg.memory.reward_weight * reward_loss
                           + cfg.memory.done_weight
                           * metrics["val/done_bce"])

    # Open loop: M, copy-last-z and the linear model from the same starts, real actions.
    ep_t = torch.from_numpy(start_ep).to(device)
    t0 = torch.from_numpy(start_t).to(device)
    lengths = torch.from_numpy(val.lengths).to(device)[ep_t]
    z_m = mu[ep_t, t0]
    z_copy = z_m.clone()
    z_lin = z_m.double()
    w = torch.from_numpy(linear).to(device)
    state = (h0[None], c0[None])
    # the first step of an episode starts from a zero state: h0/c0 stay zero for t = 0
    for k in range(1, max(HORIZONS) + 1):
        ti = torch.clamp(t0 + k - 1, max=t_max - 1)
        a = act[ep_t, ti]
        out_k, state = model(z_m[:, None], a[:, None], state)
        z_m = mixture_mean(out_k)[:, 0]
        ones = torch.ones(len(a), 1, device=device, dtype=torch.float64)
        z_lin = torch.cat([z_lin, a.double(), ones], dim=1) @ w
        if k in HORIZONS:
            ok = t0 + k < lengths
            truth = mu[ep_t, torch.clamp(t0 + k, max=t_max - 1)]
            for name, pred in (("latent", z_m), ("copy", z_copy), ("linear", z_lin.float())):
                err = (pred - truth).square().mean(-1)[ok]
                metrics[f"val/{name}_mse_k{k}"] = float(err.mean()) if len(err) else math.nan
    metrics["val/open_loop_starts"] = float(len(start_ep))
    model.train()
    return metrics


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class Progress:
    """What the loop has done so far (saved in every checkpoint)."""

    step: int = 0
    best_val_nll: float = math.inf
    best_step: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0


@dataclass
class Session:
    """The pieces of one training session (built by :func:`run`)."""

    cfg: Config
    out: Path
    model: MDNRNN
    opt: torch.optim.Optimizer
    device: torch.device
    train: Windows
    val: Episodes
    linear: np.ndarray
    logger: RunLog
    prog: Progress
    total: int
    extra: dict[str, Any]  # what every checkpoint records besides the training state
    warnings: list[str]
    last_val: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    wall_base: float = 0.0

    def update_wall(self) -> None:
        """Count this session's time so far into ``prog.wall_seconds``."""
        self.prog.wall_seconds = self.wall_base + time.perf_counter() - self.started


def checkpoint_state(s: Session) -> dict[str, Any]:
    """Everything ``--resume`` and :func:`~worldmodel.memory.load_memory` need (plain values)."""
    return {
        "model": s.model.state_dict(),
        "optimizer": s.opt.state_dict(),
        "progress": asdict(s.prog),
        "step": s.prog.step,
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **s.extra,
    }


def evaluate_and_checkpoint(s: Session) -> None:
    """Validate, log, write ``last.pt`` and (when the NLL improved) ``best.pt``."""
    val = evaluate(s.model, s.val, s.linear, s.cfg, s.device)
    if not math.isfinite(val["val/nll"]):
        raise _nan_error(s, "the validation NLL")
    s.logger.record(s.prog.step, val)
    s.last_val = val
    improved = val["val/nll"] < s.prog.best_val_nll
    if improved:
        s.prog.best_val_nll, s.prog.best_step = val["val/nll"], s.prog.step
    s.update_wall()
    save_checkpoints(s.out, checkpoint_state(s), improved)


def _nan_error(s: Session, what: str) -> UserError:
    last = s.out / "last.pt"
    kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written"
    return UserError(f"{what} became NaN/inf at step {s.prog.step}; training stopped and {kept}; "
                     f"lower memory.lr (now {s.cfg.memory.lr:g})", exit_code=1)


def train_loop(s: Session) -> None:
    """Optimise until ``s.total`` steps: forward, loss, backward, clip, step; log and validate."""
    m, model, opt = s.cfg.memory, s.model, s.opt
    rows: list[torch.Tensor] = []  # per step: loss, nll, reward_loss, done_bce
    z_dim, a_dim = s.train.ep.mu.shape[1], s.train.ep.action.shape[1]
    batch_bytes = m.batch_size * m.seq_len * 4 * (2 * z_dim + a_dim + 4)
    batches = Prefetch(batch_stream(s.train, s.prog.step), prefetch_depth(batch_bytes))
    model.train()
    tick = time.perf_counter()
    with closing(batches), progress_bar(s.total, s.prog.step, "train-memory") as bar:
        while s.prog.step < s.total:
            b = to_device(next(batches), s.device)
            terms = memory_loss(model, b, s.cfg)
            opt.zero_grad(set_to_none=True)
            terms.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), m.grad_clip)
            opt.step()
            s.prog.step += 1
            rows.append(torch.stack(list(terms)).detach())
            bar.update()

            step = s.prog.step
            validate_now = step % m.val_every == 0 or step == s.total
            if validate_now or step % m.log_every == 0:
                s.prog.train_seconds += time.perf_counter() - tick
                means = torch.stack(rows).mean(0).tolist()
                rows = []
                if not all(math.isfinite(v) for v in means):
                    raise _nan_error(s, "the training loss")
                scalars = dict(zip(("memory/loss", "memory/nll", "memory/reward_loss",
                                    "memory/done_bce"), means, strict=True))
                scalars["time/steps_per_second"] = step / max(s.prog.train_seconds, 1e-9)
                s.logger.record(step, scalars)
                bar.set_postfix(nll=f"{scalars['memory/nll']:.3f}")
                if validate_now:
                    evaluate_and_checkpoint(s)
                tick = time.perf_counter()


def _check_inputs(reader: DatasetReader, vae: LoadedVAE, data: Path, vae_dir: Path) -> None:
    if tuple(reader.frame_shape) != tuple(vae.image_shape):
        h, w, c = reader.frame_shape
        vh, vw, vc = vae.image_shape
        raise UserError(f"--vae {vae_dir} encodes {vh}x{vw}x{vc} frames but dataset {data} holds "
                        f"{h}x{w}x{c} frames; pass the VAE trained on this dataset's frames")


def _check_datasets(datas: list[Path], readers: list[DatasetReader]) -> dict[str, Any]:
    """Refuse datasets of other frames or actions than the first; its ``action_space``."""
    first, space = readers[0], readers[0].manifest.get("action_space")
    seen: dict[str, Path] = {}
    for data, reader in zip(datas, readers, strict=True):
        where = _location(data)
        if where in seen:
            raise UserError(f"dataset {data} is passed twice (-d); pass each dataset once")
        seen[where] = data
        if tuple(reader.frame_shape) != tuple(first.frame_shape):
            shape, want = ("x".join(map(str, r.frame_shape)) for r in (reader, first))
            raise UserError(f"dataset {data} holds {shape} frames but dataset {datas[0]} holds "
                            f"{want} frames; train M on datasets of one env and preprocessing")
        if reader.manifest.get("action_space") != space:
            raise UserError(f"dataset {data} has another action space than dataset {datas[0]} "
                            f"({reader.manifest.get('action_space')} vs {space}); train M on "
                            "datasets of one env")
    try:
        action_dim(space)
    except UserError as e:
        raise UserError(f"dataset {datas[0]}: {e}") from None
    assert isinstance(space, dict)
    return space


def _location(data: Path | str) -> str:
    """A dataset's location as compared on resume: a URL as it is, a local path resolved."""
    return str(data) if "://" in str(data) else str(Path(data).resolve())


def open_run(out: Path, cfg: Config, resume: bool | None, vae_hash: str,
             val_episodes: list[list[int]],
             datasets: list[dict[str, str]] | None = None,
             ) -> tuple[RunFolder, dict[str, Any] | None]:
    """Open the run folder; the checkpoint to resume (refusing other settings or inputs).

    :param val_episodes: the validation episode ids of each dataset.
    :param datasets: each dataset's ``location`` and ``key`` (:func:`dataset_key`): a resume
        refuses another list (a dataset counts as the same when its location or its episodes
        are; one that gained episodes is refused by its validation episodes).
    """

    def same_inputs(checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("vae_hash") != vae_hash:
            raise UserError(f"cannot resume {out}: it was trained on the latents of other "
                            "VAE weights; pass the --vae it started with, or start a new run")
        saved = checkpoint.get("datasets")
        if saved is None or datasets is None:
            return  # (checkpoints of older versions did not record them)
        same = len(saved) == len(datasets) and all(
            a["location"] == b["location"] or a["key"] == b["key"]
            for a, b in zip(saved, datasets, strict=True))
        if not same:
            was = ", ".join(d["location"] for d in saved)
            raise UserError(f"cannot resume {out}: it was trained on {len(saved)} dataset(s) "
                            f"({was}), not these {len(datasets)}; pass the same -d list in the "
                            "same order, or start a new run")
        saved_val = checkpoint.get("dataset_val_episodes")
        if len(datasets) > 1 and saved_val is not None and saved_val != val_episodes:
            raise UserError(f"cannot resume {out}: the validation episodes of its datasets "
                            "changed (a dataset gained or lost episodes); resume with the "
                            "datasets the run started on, or start a new run")

    # one dataset: its validation ids, checked as train-vae checks them (older checkpoints too)
    single = val_episodes[0] if len(val_episodes) == 1 else None
    return open_trainer_run(out, cfg, STAGE, resume, STALE_FILES, single, same_inputs)


def run(cfg: Config, data: Path | str | Sequence[Path | str], vae: Path, out: Path,
        resume: bool | None = False) -> Path:
    """Train M on the dataset(s) ``data``, encoded by the VAE run ``vae``, into the run ``out``.

    :param cfg: the run config (``memory``, ``data``, ``seed``).
    :param data: a dataset folder written by ``worldmodel collect``, or a list of them (same
        frames and action space; the first gives the dream its start frames).
    :param vae: a ``worldmodel train-vae`` run folder (its ``memory.vae_checkpoint``).
    :param out: the run folder (see the module docstring for its files).
    :param resume: continue from ``out/last.pt`` (as :func:`worldmodel.train_vae.run`).
    :return: ``out``.
    """
    from worldmodel.dataset import open_dataset
    from worldmodel.loaders import split_episodes

    started = time.perf_counter()
    datas = [Path(data)] if isinstance(data, str | Path) else [Path(d) for d in data]
    if not datas:
        raise UserError("train-memory needs a dataset: pass -d DATA (one or more)")
    vae, out = Path(vae), Path(out)
    check_kind(out, STAGE.kind)
    require_kind(vae, "vae", "--vae")
    readers = [open_dataset(d) for d in datas]
    space = _check_datasets(datas, readers)
    a_dim = action_dim(space)
    device = resolve_device(cfg.memory.device)
    encoder = load_vae(vae, cfg.memory.vae_checkpoint, device)
    _check_inputs(readers[0], encoder, datas[0], vae)
    splits = [split_episodes(r.episode_ids, cfg.data.val_fraction, cfg.seed) for r in readers]
    val_ids = [[int(i) for i in v] for _, v in splits]
    sources = [{"location": _location(d), "key": dataset_key(r)}
               for d, r in zip(datas, readers, strict=True)]
    folder, checkpoint = open_run(out, cfg, resume, encoder.weights_hash, val_ids, sources)
    with closing(folder):
        trains, vals, caches = [], [], []
        for reader, (train_i, val_i) in zip(readers, splits, strict=True):
            mu, logvar, cache = cached_latents(encoder, reader)
            episodes = load_episodes(reader, mu, logvar, space)
            pos = {eid: p for p, eid in enumerate(reader.episode_ids)}
            trains.append(episodes.select([pos[i] for i in train_i]))
            vals.append(episodes.select([pos[i] for i in val_i]))
            caches.append(cache)
        train = concat_episodes(trains)
        n_val = sum(len(v) for v in val_ids)
        warnings: list[str] = []
        if n_val:
            val = concat_episodes(vals)
        else:
            val = train
            warnings.append("no held-out episodes (data.val_fraction = 0): the held-out metrics "
                            "are measured on training episodes")
        extra: dict[str, Any] = {
            "vae_hash": encoder.weights_hash,
            "latent_dim": int(train.mu.shape[1]),
            "action_dim": a_dim,
            "action_space": json.dumps(space),
            "datasets": sources,
            "dataset_val_episodes": val_ids,
        }
        if len(datas) == 1:
            extra["val_episodes"] = val_ids[0]
        frames = [int(r.num_frames) for r in readers]
        summary_inputs = {"dataset": str(datas[0]), "vae": str(vae),
                          "latent_cache": str(caches[0]),
                          "datasets": [str(d) for d in datas],
                          "latent_caches": [str(c) for c in caches],
                          "dataset_frames": frames, "real_env_steps_collected": sum(frames),
                          "train_episodes": sum(len(t) for t, _ in splits),
                          "val_episodes": n_val, "train_steps": int(train.lengths.sum())}
        return _train(cfg, out, folder, checkpoint, train, val, extra, summary_inputs,
                      warnings, device, started)


def _train(cfg: Config, out: Path, folder: RunFolder, checkpoint: dict[str, Any] | None,
           train: Episodes, val: Episodes, extra: dict[str, Any], inputs: dict[str, Any],
           warnings: list[str], device: torch.device, started: float) -> Path:
    m = cfg.memory
    seed_everything(cfg.seed)
    model = build_memory(m, int(extra["latent_dim"]), int(extra["action_dim"])).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=m.lr)
    prog = Progress()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng_torch"].cpu())
        prog = Progress(**checkpoint["progress"])
    else:
        standardize_reward(model, train)
    windows = Windows(train, m.seq_len, m.batch_size, cfg.seed)
    total = m.steps if m.steps is not None else int(m.epochs or 1) * len(windows)
    linear = fit_linear(train)
    log.info("train-memory: %d windows of %d steps (%d episodes), %d steps of %d on %s, run %s",
             len(windows.windows), m.seq_len, len(train.lengths), total, m.batch_size, device,
             out)
    logger = RunLog(out, purge_step=prog.step if checkpoint is not None else None)
    s = Session(cfg, out, model, opt, device, windows, val, linear, logger, prog, total, extra,
                warnings, started=started, wall_base=prog.wall_seconds)
    try:
        if prog.step < total:
            train_loop(s)
        if not s.last_val:  # nothing trained in this session: measure what we have
            s.last_val = evaluate(model, val, linear, cfg, device)
        s.update_wall()
        summary = write_summary(s, inputs)
        folder.save_summary(summary)
        folder.finish()
    finally:
        logger.close()
    k1 = summary["open_loop_mse"]["1"]
    shown = {k: "n/a" if x is None else f"{x:.4g}" for k, x in k1.items()}
    log.info("train-memory done: val NLL %.3f, k=1 latent MSE %s (copy %s, linear %s)",
             summary["val_nll"], shown["memory"], shown["copy_last_z"], shown["linear"])
    return out


def write_summary(s: Session, inputs: dict[str, Any]) -> dict[str, Any]:
    """The ``summary.json`` record: the final model's held-out metrics and the baselines."""
    # undefined metrics (no terminal step, constant rewards) are null in summary.json
    v: dict[str, Any] = {k: x if math.isfinite(x) else None for k, x in s.last_val.items()}
    warnings = list(s.warnings)
    k1, copy = v["val/latent_mse_k1"], v["val/copy_mse_k1"]
    if k1 is not None and copy is not None and not k1 < copy:
        warnings.append(f"M's one-step latent MSE ({k1:.4g}) does not beat copying the last z "
                        f"({copy:.4g}): train longer (memory.steps)")
    for w in warnings:
        log.warning("%s", w)
    return {
        "steps": s.prog.step,
        "epochs": s.prog.step / max(len(s.train), 1),
        "steps_per_second": s.prog.step / max(s.prog.train_seconds, 1e-9),
        "train_seconds": s.prog.train_seconds,
        "wall_seconds": s.prog.wall_seconds,
        "device": str(s.device),
        "val_nll": v["val/nll"],
        "val_loss": v["val/loss"],
        "open_loop_mse": {str(k): {"memory": v[f"val/latent_mse_k{k}"],
                                   "copy_last_z": v[f"val/copy_mse_k{k}"],
                                   "linear": v[f"val/linear_mse_k{k}"]} for k in HORIZONS},
        "open_loop_starts": int(v["val/open_loop_starts"]),
        "reward_r2": v["val/reward_r2"],
        "reward_r2_nonterminal": v["val/reward_r2_nonterminal"],
        "reward_mse": v["val/reward_mse"],
        "done": {"precision": v["val/done_precision"], "recall": v["val/done_recall"],
                 "terminal_steps": int(v["val/done_terminal_steps"]), "threshold": 0.5},
        "best": {"step": s.prog.best_step, "val_nll": s.prog.best_val_nll},
        "inputs": {**inputs, "vae_weights_hash": s.extra["vae_hash"]},
        "warnings": warnings,
    }


def _run_stage(cfg: Config, out: Path, inputs: Mapping[str, Any], resume: bool | None) -> Path:
    return run(cfg, inputs["collect"], inputs["train-vae"], out, resume=resume)


#: ``train-memory`` reads ``memory`` (but the dream's temperature) and ``data``; it needs a
#: dataset and a VAE run. The pipeline runs it only when an agent arm reads M (``on_demand``).
STAGE = StageSpec(
    "train-memory", "memory",
    reads=("seed", "memory", "data"),
    ignores=("memory.temperature",),
    needs=("collect", "train-vae"),
    run=_run_stage,
    folder="memory",
    on_demand=True,
)
