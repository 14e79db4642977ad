"""``worldmodel train-vae``: train the ConvVAE on a collected dataset.

The run folder explains itself::

    RUN/config.yaml      the resolved config (rebuilds the model: ``load_vae(RUN)``)
    RUN/last.pt          model, optimizer, step, RNG state, best-so-far: what --resume reads
    RUN/best.pt          the same, for the step with the lowest validation loss
    RUN/metrics.jsonl    one JSON record per log / validation step (same keys as TensorBoard)
    RUN/events.out.*     TensorBoard: vae/*, kl_per_dim/*, val/*, repr/*, image grids
    RUN/summary.json     final validation metrics, representation metrics, speed, warnings

Checkpoints are written at every validation (``vae.val_every`` steps and the last step), each
atomically, ``best.pt`` (when the loss improved) before ``last.pt``, so that the best step
``last.pt`` records is always on disk. A checkpoint holds everything the loop depends on:
weights, Adam state, the step, the torch RNG state (the only generator the loop draws from, for
``z`` samples) and the validation episode ids. The data order is a function of ``seed``, the
epoch, ``data.cache_bytes`` and the dataset's episodes (``FrameDataset.batches``), and ``step``
fixes the epoch and the batch within it. ``--resume`` refuses other ``output`` settings that
:data:`STAGE` reads (:func:`worldmodel.stages.resume_mismatches`) and another validation set (a
dataset that gained or lost episodes), so it continues exactly where ``last.pt`` left off.

Validation runs the model in eval mode (``z = mu``) on ``vae.val_frames`` frames sampled
(seeded, once) from the held-out episodes; ``val/loss`` is the training loss with that
deterministic ``z`` and the full ``beta`` (no KL warm-up), so it is comparable across steps.
``active units`` counts latent dimensions whose batch-mean KL exceeds 0.01 nats.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from envs.config import frame_keys
from worldmodel.config import Config
from worldmodel.errors import UserError
from worldmodel.metrics import ACTIVE_KL_NATS
from worldmodel.runfolder import RunFolder, check_kind
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
from worldmodel.vae import (
    ConvVAE,
    LoadedVAE,
    LossTerms,
    build_vae,
    frames_to_tensor,
    vae_loss,
)

if TYPE_CHECKING:

    from worldmodel.dataset import DatasetReader
    from worldmodel.loaders import FrameDataset
    from worldmodel.metrics import ProbeData

log = logging.getLogger("worldmodel")

#: Validation MSE above this fraction of the mean-image MSE counts as "stuck at the mean image".
MEAN_IMAGE_RATIO = 0.8
#: Validation MSE above this multiple of the mean-image MSE counts as "undertrained".
UNDERTRAINED_RATIO = 1.5
#: Files of an attempt that never wrote ``last.pt``, removed when a run starts over.
STALE_FILES = ("metrics.jsonl", "summary.json", "best.pt", "events.*")
IMAGES_IN_GRID = 8


@dataclass
class Progress:
    """What the loop has done so far (saved in every checkpoint)."""

    step: int = 0
    best_val_loss: float = math.inf
    best_step: int = 0
    train_seconds: float = 0.0  # time spent in training steps, over all sessions
    wall_seconds: float = 0.0  # total time, over all sessions


class Window:
    """The training terms since the last log line, kept as tensors: no device sync per step.

    :param first_step: the step counter (:attr:`Progress.step`) before the window's first step.
    """

    def __init__(self, first_step: int = 0) -> None:
        self.first_step = first_step
        self.rows: list[torch.Tensor] = []  # per step: (3,) loss, recon, kl
        self.kl_per_dim: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        """Steps in the window."""
        return len(self.rows)

    def add(self, terms: LossTerms) -> None:
        """Keep one step's terms."""
        self.rows.append(torch.stack([terms.loss, terms.recon, terms.kl]).detach())
        kl = terms.kl_per_dim.detach()
        self.kl_per_dim = kl if self.kl_per_dim is None else self.kl_per_dim + kl

    def first_nonfinite(self) -> int | None:
        """The step counter before the first step whose loss was NaN/inf, or ``None``."""
        if not self.rows:
            return None
        bad = torch.nonzero(~torch.isfinite(torch.stack(self.rows)[:, 0]))
        return None if len(bad) == 0 else self.first_step + int(bad[0, 0])

    def means(self) -> tuple[dict[str, float], np.ndarray]:
        """The window's mean scalars and mean KL per latent dimension ``(Z,)``."""
        if not self.rows or self.kl_per_dim is None:
            return {}, np.zeros(0)
        loss, recon, kl = torch.stack(self.rows).mean(0).tolist()
        kl_dims = (self.kl_per_dim / self.steps).cpu().numpy()
        return {
            "vae/loss": loss, "vae/recon": recon, "vae/kl": kl,
            "vae/active_units": float((kl_dims > ACTIVE_KL_NATS).sum()),
        }, kl_dims


# --------------------------------------------------------------------------------------------
# Checks before training


def check_dataset(reader: DatasetReader, cfg: Config, data: Path) -> None:
    """Refuse a dataset whose frames do not fit the model ``cfg`` describes (``UserError``).

    Frames of another shape, or of another env or preprocessing (``manifest.json``'s
    ``preprocessing`` against ``cfg.env``: the run's ``config.yaml`` would name the wrong env),
    are refused with the ``--set`` options that match the dataset.
    """
    want = cfg.env.obs_shape
    if tuple(reader.frame_shape) != want:
        h, w, c = reader.frame_shape
        raise UserError(
            f"dataset {data} has {h}x{w}x{c} frames but the config's env (image_size="
            f"{cfg.env.image_size}, grayscale={cfg.env.grayscale}) gives {want[0]}x{want[1]}x"
            f"{want[2]}; use the config the dataset was collected with or --set "
            f"env.image_size={h} env.grayscale={str(c == 1).lower()}"
        )
    stored = reader.manifest.get("preprocessing")
    if isinstance(stored, dict):
        ours = cfg.env.model_dump(mode="json", include=set(stored))
        differ = sorted(k for k in stored if ours.get(k) != stored[k])
        if differ:
            # The VAE's config.yaml would name an env its frames do not come from.
            import json

            def shown(value: Any) -> str:
                return value if isinstance(value, str) else json.dumps(value)

            what = "; ".join(f"env.{k}: {shown(stored[k])} in the dataset, {shown(ours.get(k))} "
                             "here" for k in differ)
            sets = " ".join(f"--set env.{k}={shown(stored[k])}" for k in differ)
            config = Path(str(data)) / "config.yaml"
            also = f" (or start from --config {config})" if config.is_file() else ""
            raise UserError(
                f"dataset {data} was collected with other env settings than this config ({what}):"
                f" train on it with the dataset's settings, {sets}{also}"
            )


def open_run(
    out: Path, cfg: Config, resume: bool | None, val_episodes: list[int] | None = None
) -> tuple[RunFolder, dict[str, Any] | None]:
    """Open the run folder (:func:`worldmodel.training.open_trainer_run`); the checkpoint.

    ``last.pt`` marks a run that can be resumed. A ``best.pt`` without it is what an attempt
    killed while writing its first checkpoint leaves (``best.pt`` is written first): a fresh
    run replaces it.

    :param val_episodes: the validation episode ids of this session; a resume refuses a
        checkpoint that recorded other ones.
    :raise UserError: another kind of run or another writer in ``out``, a finished run without
        ``--resume``, or a resume with other ``output`` settings (:data:`STAGE`) or other
        validation episodes than the run was started with.
    """
    return open_trainer_run(out, cfg, STAGE, resume, STALE_FILES, val_episodes)


def total_steps(cfg: Config, batches_per_epoch: int) -> int:
    """``vae.steps``, or ``vae.epochs`` passes over the training split."""
    return cfg.vae.steps if cfg.vae.steps is not None else int(cfg.vae.epochs or 1) * (
        batches_per_epoch
    )


def kl_weight(cfg: Config, step: int) -> float:
    """Weight of the KL term at optimizer step ``step`` (0-based).

    ``beta``, ramped up linearly from 0 over the first ``vae.kl_warmup_steps`` steps.
    """
    warmup = cfg.vae.kl_warmup_steps
    return cfg.vae.beta * min(1.0, step / warmup) if warmup else cfg.vae.beta


# --------------------------------------------------------------------------------------------
# Validation, metrics and checkpoints


@dataclass
class Held:
    """Held-out data, loaded once.

    :param frames: ``(N, H, W, C)`` uint8 validation frames.
    :param mean_image_mse: MSE per pixel of predicting the training mean image for them.
    :param probe_train: training-episode frames with states, for the representation metrics.
    :param probe_test: held-out-episode frames with states.
    :param state_names: names of the state components.
    """

    frames: np.ndarray
    mean_image_mse: float
    probe_train: ProbeData | None = None
    probe_test: ProbeData | None = None
    state_names: list[str] = field(default_factory=list)
    baseline: dict[str, Any] | None = None


def load_held_out(
    reader: DatasetReader, train: FrameDataset, val: FrameDataset | None, cfg: Config
) -> tuple[Held, list[str]]:
    """Validation frames, the mean-image reference and the probe data; plus warnings.

    :param val: the held-out split, or ``None`` when there is none (``data.val_fraction = 0``):
        then validation uses training frames and the representation metrics are skipped.
    """
    warnings: list[str] = []
    if val is None:
        msg = "no held-out episodes (data.val_fraction = 0): validating on training frames, " \
              "representation metrics skipped"
        log.warning(msg)
        warnings.append(msg)
    frames = (val or train).sample(cfg.vae.val_frames, seed=cfg.seed)
    mean = train.sample(2048, seed=cfg.seed + 1).mean(0, dtype=np.float64) / 255.0
    mean_image_mse = float(np.mean(np.square(frames / 255.0 - mean)))
    held = Held(frames, mean_image_mse)
    if reader.has_state and cfg.vae.probe_frames > 0 and val is not None:
        from worldmodel.metrics import load_probe_data

        held.probe_train = load_probe_data(reader, train.episode_ids, cfg.vae.probe_frames,
                                           cfg.seed)
        held.probe_test = load_probe_data(reader, val.episode_ids, cfg.vae.probe_frames, cfg.seed)
        dims = held.probe_test.states.shape[1]
        names = reader.manifest.get("state_names")
        if isinstance(names, list) and len(names) == dims:
            held.state_names = [str(n) for n in names]
        else:
            held.state_names = [f"s{j}" for j in range(dims)]
    return held, warnings


@torch.no_grad()
def validate(model: ConvVAE, frames: np.ndarray, cfg: Config, device: torch.device,
             batch_size: int = 256) -> tuple[dict[str, float], np.ndarray]:
    """Loss terms of the model in eval mode (``z = mu``) on ``frames``.

    :param frames: ``(N, H, W, C)`` uint8.
    :return: ``val/*`` scalars and the KL per latent dimension ``(Z,)``.
    """
    v = cfg.vae
    model.eval()
    totals = {"loss": 0.0, "recon": 0.0, "kl": 0.0, "sq": 0.0}
    kl_dims = torch.zeros(model.latent_dim, dtype=torch.float64)
    for i in range(0, len(frames), batch_size):
        x = frames_to_tensor(frames[i : i + batch_size], device)
        out = model(x)
        terms = vae_loss(out, x, v.beta, v.kl_tolerance, v.recon_loss)
        n = len(x)
        totals["loss"] += terms.loss.item() * n
        totals["recon"] += terms.recon.item() * n
        totals["kl"] += terms.kl.item() * n
        totals["sq"] += (out.recon - x).square().sum().item()
        kl_dims += terms.kl_per_dim.double().cpu() * n
    model.train()
    n = max(len(frames), 1)
    kl = (kl_dims / n).numpy()
    return {
        "val/loss": totals["loss"] / n,
        "val/recon": totals["recon"] / n,
        "val/kl": totals["kl"] / n,
        "val/mse_per_pixel": totals["sq"] / (n * int(np.prod(frames.shape[1:]))),
        "val/active_units": float((kl > ACTIVE_KL_NATS).sum()),
    }, kl


def representation(model: ConvVAE, cfg: Config, held: Held) -> dict[str, Any] | None:
    """Linear-probe R^2 and KNN-MSE of the model's mean latents (None without state)."""
    if held.probe_train is None or held.probe_test is None:
        return None
    from worldmodel.metrics import representation_metrics

    encoder = LoadedVAE(model, cfg)
    result = representation_metrics(encoder.encode, held.probe_train, held.probe_test,
                                     k=cfg.vae.knn_k, baseline=held.baseline, seed=cfg.seed)
    model.train()
    held.baseline = result["random_projection"]
    result["state_names"] = held.state_names
    return result


def _repr_scalars(result: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard/jsonl scalars of a :func:`representation` result."""
    names = result["state_names"]
    rand = result["random_projection"]
    out = {
        "repr/probe_r2": result["probe_r2"]["mean"],
        "repr/knn_mse": result["knn_mse"],
        "repr/random_probe_r2": rand["probe_r2"]["mean"],
        "repr/random_knn_mse": rand["knn_mse"],
    }
    constant = set(result["probe_r2"].get("constant", []))
    for j, (name, value) in enumerate(zip(names, result["probe_r2"]["per_dim"], strict=True)):
        if j not in constant:  # no variance to explain: no R^2 (see linear_probe_r2)
            out[f"repr/probe_r2_{name}"] = value
    return out


def _constant_state_warning(result: dict[str, Any] | None) -> list[str]:
    """Say which state components the mean probe R^2 leaves out (constant on held-out frames)."""
    if result is None or not result["probe_r2"].get("constant"):
        return []
    names = ", ".join(result["state_names"][j] for j in result["probe_r2"]["constant"])
    return [f"state component(s) {names} are constant on the held-out probe frames: their R^2 "
            "means nothing and they are left out of the mean probe R^2"]


def image_grid(model: ConvVAE, cfg: Config, frames: np.ndarray) -> np.ndarray:
    """Originals (top row) over their reconstructions (bottom row): uint8 ``(2H, n*W, C)``."""
    recon = LoadedVAE(model, cfg).reconstruct(frames)
    model.train()
    top, bottom = np.concatenate(list(frames), axis=1), np.concatenate(list(recon), axis=1)
    return np.concatenate([top, bottom], axis=0)


def checkpoint_state(model: ConvVAE, opt: torch.optim.Optimizer, prog: Progress,
                     train_frames: int, val_episodes: list[int]) -> dict[str, Any]:
    """Everything ``--resume`` needs, as plain tensors and numbers (``weights_only``-loadable).

    :param train_frames: frames of the training split (a resume warns when they changed).
    :param val_episodes: the validation episode ids (a resume refuses other ones).
    """
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "progress": asdict(prog),
        "step": prog.step,
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "train_frames": train_frames,
        "val_episodes": [int(i) for i in val_episodes],
    }


def restore(checkpoint: dict[str, Any], model: ConvVAE, opt: torch.optim.Optimizer) -> Progress:
    """Load a checkpoint's weights, optimizer and RNG state; the progress it records."""
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng_torch"].cpu())
    if checkpoint["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in checkpoint["rng_cuda"]])
    return Progress(**checkpoint["progress"])


def quality_warnings(val: dict[str, float], mean_image_mse: float) -> list[str]:
    """The classic failure: no active latent, or reconstructions no better than the mean image."""
    warnings = []
    if val["val/active_units"] == 0:
        warnings.append(
            f"no active latent units (every latent's KL <= {ACTIVE_KL_NATS} nats): the VAE "
            "ignores its input; train longer, raise vae.kl_tolerance or lower vae.beta"
        )
    mse = val["val/mse_per_pixel"]
    if mse > UNDERTRAINED_RATIO * mean_image_mse:
        warnings.append(
            f"reconstructions are worse than the dataset's mean image (val MSE/pixel {mse:.5f} "
            f"vs {mean_image_mse:.5f}): the VAE is undertrained; train longer (vae.steps)"
        )
    elif mse > MEAN_IMAGE_RATIO * mean_image_mse:
        warnings.append(
            f"reconstructions are stuck near the dataset's mean image (val MSE/pixel {mse:.5f} "
            f"vs {mean_image_mse:.5f} for the mean image): small objects are probably lost; "
            "train longer, raise vae.kl_tolerance or lower vae.beta"
        )
    return warnings


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class Session:
    """The pieces of one training session (built by :func:`run`)."""

    cfg: Config
    out: Path
    model: ConvVAE
    opt: torch.optim.Optimizer
    device: torch.device
    train: FrameDataset
    held: Held
    logger: RunLog
    prog: Progress
    total: int
    warnings: list[str]
    val_episodes: list[int]
    last_val: dict[str, float] = field(default_factory=dict)
    last_kl: np.ndarray = field(default_factory=lambda: np.zeros(0))
    last_repr: dict[str, Any] | None = None
    started: float = field(default_factory=time.perf_counter)
    wall_base: float = 0.0  # wall seconds of earlier sessions

    def update_wall(self) -> None:
        """Count this session's time so far into ``prog.wall_seconds``."""
        self.prog.wall_seconds = self.wall_base + time.perf_counter() - self.started


def evaluate_and_checkpoint(s: Session) -> None:
    """Validate, log, write ``last.pt`` and (when it improved) ``best.pt``."""
    val, kl = validate(s.model, s.held.frames, s.cfg, s.device)
    if not math.isfinite(val["val/loss"]):
        raise _nan_error(s, "the validation loss")
    rep = representation(s.model, s.cfg, s.held)
    values: dict[str, Any] = {**val, "val/mean_image_mse": s.held.mean_image_mse,
                              "val/kl_per_dim": kl.tolist()}
    if rep is not None:
        values.update(_repr_scalars(rep))
    s.logger.record(s.prog.step, values)
    s.logger.per_dim(s.prog.step, kl, "val_kl_per_dim")
    s.last_val, s.last_kl, s.last_repr = val, kl, rep
    improved = val["val/loss"] < s.prog.best_val_loss
    if improved:
        s.prog.best_val_loss, s.prog.best_step = val["val/loss"], s.prog.step
    s.update_wall()
    state = checkpoint_state(s.model, s.opt, s.prog, s.train.num_frames, s.val_episodes)
    save_checkpoints(s.out, state, improved)


def _nan_error(s: Session, what: str, step: int | None = None) -> UserError:
    last = s.out / "last.pt"
    kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written"
    return UserError(
        f"{what} became NaN/inf at step {s.prog.step if step is None else step}; training "
        f"stopped and {kept}; lower vae.lr (now {s.cfg.vae.lr:g})", exit_code=1,
    )


def train_loop(s: Session) -> None:
    """Optimise until ``s.total`` steps: forward, loss, backward, step; log and validate."""
    v, model, opt = s.cfg.vae, s.model, s.opt
    window = Window(s.prog.step)
    batch_bytes = v.batch_size * int(np.prod(s.train.frame_shape))
    batches = Prefetch(batch_stream(s.train, s.prog.step), prefetch_depth(batch_bytes))
    model.train()
    tick = time.perf_counter()
    with closing(batches), progress_bar(s.total, s.prog.step, "train-vae") as bar:
        while s.prog.step < s.total:
            x = frames_to_tensor(next(batches), s.device)
            terms = vae_loss(model(x), x, kl_weight(s.cfg, s.prog.step), v.kl_tolerance,
                             v.recon_loss)
            opt.zero_grad(set_to_none=True)
            terms.loss.backward()
            opt.step()
            s.prog.step += 1
            window.add(terms)  # NaN/inf is looked for at the log line, before any checkpoint
            bar.update()

            step = s.prog.step
            validate_now = step % v.val_every == 0 or step == s.total
            log_now = validate_now or step % v.log_every == 0
            image_now = step % v.image_every == 0
            if log_now or image_now:
                s.prog.train_seconds += time.perf_counter() - tick
            if log_now:
                scalars = log_window(s, window)
                window = Window(step)
                bar.set_postfix(loss=f"{scalars['vae/loss']:.1f}", kl=f"{scalars['vae/kl']:.1f}")
            if image_now:
                grid = image_grid(model, s.cfg, s.held.frames[:IMAGES_IN_GRID])
                s.logger.image(step, "vae/reconstructions", grid)
            if validate_now:
                evaluate_and_checkpoint(s)
            if log_now or image_now:
                tick = time.perf_counter()  # logging and validation are not training time


def log_window(s: Session, window: Window) -> dict[str, float]:
    """Log the mean training terms since the last log line; return the scalars.

    :raise UserError: a step of the window had a NaN/inf loss (then no checkpoint is written
        after it: every validation comes right after a log line).
    """
    step = s.prog.step
    bad = window.first_nonfinite()
    if bad is not None:
        raise _nan_error(s, "the training loss", bad)
    scalars, kl = window.means()
    scalars["vae/kl_weight"] = kl_weight(s.cfg, step - 1)
    scalars["time/frames_per_second"] = (step * s.cfg.vae.batch_size
                                         / max(s.prog.train_seconds, 1e-9))
    s.logger.record(step, {**scalars, "vae/kl_per_dim": kl.tolist()})
    s.logger.per_dim(step, kl, "kl_per_dim")
    return scalars


def write_summary(s: Session, data: Path) -> dict[str, Any]:
    """The ``summary.json`` record: the final model's validation and representation metrics."""
    warnings = (s.warnings + quality_warnings(s.last_val, s.held.mean_image_mse)
                + _constant_state_warning(s.last_repr))
    for w in warnings:
        log.warning("%s", w)
    v = s.cfg.vae
    summary: dict[str, Any] = {
        "steps": s.prog.step,
        "epochs": s.prog.step * v.batch_size / max(s.train.num_frames, 1),
        "frames_per_second": s.prog.step * v.batch_size / max(s.prog.train_seconds, 1e-9),
        "train_seconds": s.prog.train_seconds,
        "wall_seconds": s.prog.wall_seconds,
        "device": str(s.device),
        "threads": torch.get_num_threads(),
        "val_mse_per_pixel": s.last_val["val/mse_per_pixel"],
        "val_kl": s.last_val["val/kl"],
        "val_loss": s.last_val["val/loss"],
        "active_units": int(s.last_val["val/active_units"]),
        "active_units_threshold_nats": ACTIVE_KL_NATS,
        "kl_per_dim": [float(k) for k in s.last_kl],
        "mean_image_mse": s.held.mean_image_mse,
        "best": {"step": s.prog.best_step, "val_loss": s.prog.best_val_loss},
        "representation": s.last_repr,
        "dataset": {
            "path": str(data),
            "train_frames": s.train.num_frames,
            "train_episodes": len(s.train.episode_ids),
            "val_frames": len(s.held.frames),
        },
        "warnings": warnings,
    }
    return summary


def run(cfg: Config, data: Path, out: Path, resume: bool | None = False) -> Path:
    """Train a ConvVAE on the dataset ``data`` into the run folder ``out``.

    :param cfg: the run config (``env`` fixes the input shape, ``vae`` everything else).
    :param data: a dataset folder written by ``worldmodel collect``.
    :param out: the run folder (see the module docstring for its files).
    :param resume: continue from ``out/last.pt``; ``False`` starts a run (an interrupted one
        in ``out`` is resumed), ``None`` resumes whenever ``last.pt`` exists (see
        :meth:`~worldmodel.runfolder.RunFolder.open`).
    :return: ``out``.
    """
    from worldmodel.dataset import open_dataset
    from worldmodel.loaders import split_episodes

    started = time.perf_counter()
    data, out = Path(data), Path(out)
    check_kind(out, STAGE.kind)  # before anything is read: a wrong --out is the first error
    reader = open_dataset(data)
    check_dataset(reader, cfg, data)
    d = cfg.data
    val_episodes = split_episodes(reader.episode_ids, d.val_fraction, cfg.seed)[1]
    folder, checkpoint = open_run(out, cfg, resume, val_episodes)
    with closing(folder):
        return _train(cfg, data, out, reader, folder, checkpoint, val_episodes, started)


def _train(cfg: Config, data: Path, out: Path, reader: DatasetReader, folder: RunFolder,
           checkpoint: dict[str, Any] | None, val_episodes: list[int], started: float) -> Path:
    from worldmodel.loaders import FrameDataset

    d = cfg.data
    seed_everything(cfg.seed)
    device = resolve_device(cfg.vae.device)
    train = FrameDataset(data, "train", batch_size=cfg.vae.batch_size, seed=cfg.seed,
                         val_fraction=d.val_fraction, cache_bytes=d.cache_bytes,
                         workers=d.loader_workers)
    val = None
    if d.val_fraction > 0:
        val = FrameDataset(data, "val", batch_size=256, seed=cfg.seed, drop_last=False,
                           val_fraction=d.val_fraction, cache_bytes=d.cache_bytes, workers=0)
    held, warnings = load_held_out(reader, train, val, cfg)
    model = build_vae(cfg.vae, cfg.env).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.vae.lr)
    prog = restore(checkpoint, model, opt) if checkpoint is not None else Progress()
    if checkpoint is not None and checkpoint.get("train_frames") != train.num_frames:
        log.warning("the dataset changed since %s started (%s -> %d training frames): the "
                    "resumed run sees a different data order", out,
                    checkpoint.get("train_frames"), train.num_frames)
    total = total_steps(cfg, len(train))
    log.info("train-vae: %d frames (%d episodes), %d steps of %d on %s, run %s",
             train.num_frames, len(train.episode_ids), total, cfg.vae.batch_size, device, out)
    logger = RunLog(out, purge_step=prog.step if checkpoint is not None else None)
    s = Session(cfg, out, model, opt, device, train, held, logger, prog, total, warnings,
                val_episodes, started=started, wall_base=prog.wall_seconds)
    try:
        if prog.step < total:
            train_loop(s)
        elif not s.last_val:
            log.info("%s already trained %d of %d steps", out, prog.step, total)
        if not s.last_val:  # nothing trained in this session: validate what we have
            s.last_val, s.last_kl = validate(model, held.frames, cfg, device)
            s.last_repr = representation(model, cfg, held)
        s.update_wall()
        summary = write_summary(s, data)
        folder.save_summary(summary)
        folder.finish()
    finally:
        logger.close()
    rep = summary["representation"]
    probe = f", probe R^2 {rep['probe_r2']['mean']:.3f}" if rep else ""
    log.info("train-vae done: val MSE/pixel %.5f, KL %.2f, %d active units%s, %.0f frames/s",
             summary["val_mse_per_pixel"], summary["val_kl"], summary["active_units"], probe,
             summary["frames_per_second"])
    return out


def _run_stage(cfg: Config, out: Path, inputs: Mapping[str, Any], resume: bool | None) -> Path:
    return run(cfg, inputs["collect"], out, resume=resume)


#: ``train-vae`` reads the frames' env settings, ``vae`` and ``data``; it needs a dataset.
STAGE = StageSpec(
    "train-vae", "vae",
    reads=("seed", "vae", "data", *(f"env.{k}" for k in sorted(frame_keys()))),
    needs=("collect",),
    run=_run_stage,
    folder="vae",
)
