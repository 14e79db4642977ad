"""What every trainer of this project shares: run log, batch stream, progress, checkpoints.

A trainer (``train_vae``, ``train_memory``) keeps its own loop, top to bottom:
forward, loss, backward, step, log. What is the same for all of them lives here:

* :class:`RunLog`: TensorBoard and ``metrics.jsonl`` side by side with the same keys; on resume
  both drop what an interrupted session logged after the checkpoint, so no step is shown twice.
* :func:`batch_stream` and :class:`Prefetch`: an endless, resumable stream of batches of any
  dataset with ``batches(epoch, start)`` (``FrameDataset``, ``SequenceDataset``), read ahead in a
  background thread.
* :func:`progress_bar`: tqdm on a terminal, a progress line now and then in a log file.
* :func:`save_checkpoints`: ``best.pt`` (when improved) before ``last.pt``, atomically, so the best
  step that ``last.pt`` records is always on disk.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from worldmodel.errors import UserError
from worldmodel.io import append_jsonl, atomic_write_text, read_jsonl
from worldmodel.runfolder import RunFolder
from worldmodel.utils import LogProgress, progress

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from worldmodel.config import Config
    from worldmodel.stages import StageSpec

log = logging.getLogger("worldmodel")


class RunLog:
    """TensorBoard and ``metrics.jsonl``, written side by side with the same keys.

    :param out: the run folder.
    :param purge_step: on resume, the checkpoint's step: later records (of the interrupted
        session) are dropped from both logs so that they are not shown twice; the records of
        the checkpoint's step itself (its validation) stay.
    """

    def __init__(self, out: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(out) / "metrics.jsonl"
        if purge_step is not None and self.path.exists():
            keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= purge_step]
            atomic_write_text(self.path, "".join(_json_line(r) for r in keep))
        # TensorBoard hides the events at steps >= its purge_step: keep the checkpoint's own.
        self.writer: SummaryWriter = SummaryWriter(
            str(out), purge_step=None if purge_step is None else purge_step + 1
        )

    def record(self, step: int, values: dict[str, Any]) -> None:
        """Scalars (and lists, jsonl only) at ``step``."""
        for key, value in values.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(key, value, step)
        append_jsonl(self.path, {"step": step, "time": time.time(), **values})

    def per_dim(self, step: int, values: np.ndarray, prefix: str) -> None:
        """One scalar per dimension ``prefix/00, prefix/01, ...`` and a histogram (TensorBoard)."""
        for j, value in enumerate(values):
            self.writer.add_scalar(f"{prefix}/{j:02d}", float(value), step)
        self.writer.add_histogram(f"{prefix}/histogram", values, step)

    def image(self, step: int, tag: str, grid: np.ndarray) -> None:
        """A uint8 ``(H, W, C)`` image."""
        self.writer.add_image(tag, grid, step, dataformats="HWC")

    def close(self) -> None:
        """Flush and close TensorBoard's file."""
        self.writer.close()


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, default=float) + "\n"


class EpochBatches(Protocol):
    """A dataset that yields the batches of an epoch from a given batch on, in a fixed order."""

    def __len__(self) -> int: ...

    def batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """Batches ``start, start + 1, ...`` of ``epoch``."""
        ...


def batch_stream(dataset: EpochBatches, step: int) -> Iterator[Any]:
    """Training batches from optimizer step ``step`` on, epoch after epoch, without end.

    :return: the dataset's batches; batch ``i`` of epoch ``e`` is step ``e * len(dataset) + i``,
        so a resumed run continues with the batch the checkpoint's step was about to take.
    """
    epoch, start = divmod(step, len(dataset))
    while True:
        yield from dataset.batches(epoch, start)
        epoch, start = epoch + 1, 0


class Prefetch:
    """Pull items of an iterator in a background thread, up to ``depth`` ahead.

    The loop then never waits for data while a core is free, also not at an epoch boundary,
    where ``FrameDataset`` loads the next epoch's first buffer. The order is unchanged.

    :param items: the iterator (e.g. :func:`batch_stream`).
    :param depth: items held ready.
    """

    _END = object()

    def __init__(self, items: Iterator[Any], depth: int) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(items,), daemon=True,
                                        name="batch-prefetch")
        self._thread.start()

    def _produce(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(self._END)
        except BaseException as e:  # handed to the consumer, raised there
            self._queue.put(e)

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the background thread."""
        self._stop.set()
        self._thread.join(timeout=5.0)


def prefetch_depth(batch_bytes: int, budget: int = 64 * 2**20) -> int:
    """Batches to hold ready: about ``budget`` bytes, between 2 and 64."""
    return int(min(64, max(2, budget // max(batch_bytes, 1))))


def progress_bar(total: int, initial: int, desc: str) -> tqdm[Any] | LogProgress:
    """The progress of optimizer steps (:func:`worldmodel.utils.progress`).

    A tqdm bar on a terminal, else a log line at most every ``WORLDMODEL_PROGRESS_SECONDS``
    seconds (nothing with ``-q``).
    """
    return progress(total, initial, desc, unit="step")


def save_checkpoints(out: Path, state: dict[str, Any], improved: bool) -> None:
    """Write ``best.pt`` (when ``improved``) and then ``last.pt``, each atomically.

    The order matters: ``last.pt`` must never name a best step that ``best.pt`` does not hold.
    ``state`` holds only tensors and plain values (loadable with ``weights_only=True``).
    """
    from worldmodel.vae import save_checkpoint

    if improved:
        save_checkpoint(Path(out) / "best.pt", state)
    save_checkpoint(Path(out) / "last.pt", state)


def open_trainer_run(
    out: Path,
    cfg: Config,
    spec: StageSpec,
    resume: bool | None,
    stale: Iterable[str],
    val_episodes: list[int] | None,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[RunFolder, dict[str, Any] | None]:
    """Open a trainer's run folder on ``last.pt``; the checkpoint to resume, or ``None``.

    The folder is a :class:`~worldmodel.runfolder.RunFolder` of ``spec.kind``: a resume refuses
    changed ``output`` settings (``spec``) and other validation episodes, and ``check`` may
    refuse more (other inputs); ``config.yaml`` is written. The folder is closed on error.

    :param stale: files a fresh start removes (an attempt that never wrote ``last.pt``).
    :param val_episodes: this session's validation episode ids.
    """
    from worldmodel.vae import load_checkpoint

    folder = RunFolder.open(out, spec.kind, resume=resume, checkpoint="last.pt", stale=stale)
    try:
        checkpoint = None
        folder.refuse_changed_settings(cfg, spec)
        if folder.resume:
            checkpoint = load_checkpoint(Path(out) / "last.pt")
            check_val_episodes(Path(out), checkpoint, val_episodes)
            if check is not None:
                check(checkpoint)
            log.info("resuming %s from step %d", out, checkpoint["step"])
        folder.save_config(cfg)
    except BaseException:
        folder.close()
        raise
    return folder, checkpoint


def check_val_episodes(out: Path, checkpoint: dict[str, Any],
                       val_episodes: list[int] | None) -> None:
    """Refuse to resume a run whose validation episodes are not this dataset's split."""
    saved = checkpoint.get("val_episodes")
    if saved is None or val_episodes is None or list(saved) == list(val_episodes):
        return  # (checkpoints of older versions did not record them)
    gone = sorted(set(saved) - set(val_episodes))
    new = sorted(set(val_episodes) - set(saved))
    raise UserError(
        f"cannot resume {out}: its validation episodes differ from this dataset's split "
        f"({len(gone)} of the run's {len(saved)} are gone, {len(new)} are new; the dataset "
        "gained or lost episodes), so its losses and data order would not continue; resume "
        "with the dataset the run started on, or start a new run"
    )
