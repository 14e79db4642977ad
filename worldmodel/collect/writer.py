"""The writer of a worker's shard: compresses, writes and commits batches of episodes."""

from __future__ import annotations

import math
import os
import queue
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from worldmodel.collect.episode import FrameBuffer, Steps
from worldmodel.dataset import ShardWriter
from worldmodel.errors import UserError

if TYPE_CHECKING:
    from worldmodel.collect.worker import QueueLike, WorkerSpec


Batch = tuple[FrameBuffer, list[tuple[dict[str, Any], Steps]]]


def _stack(spec: WorkerSpec, batch: Batch) -> dict[str, np.ndarray]:
    """One array per stored field for a batch of episodes (frames: a view of the buffer)."""
    frames, episodes = batch
    out: dict[str, np.ndarray] = {"obs": frames.data[: frames.n]}
    for name, (shape, dtype) in spec.layout.fields().items():
        if name == "obs":
            continue
        flat = [x for _, ep in episodes for x in getattr(ep, name)]
        # np.stack copies arrays ~8x faster than np.asarray(list, dtype=...)
        arr = np.stack(flat) if isinstance(flat[0], np.ndarray) else np.asarray(flat)
        arr = arr.astype(dtype, copy=False)
        want = (len(flat), *shape)
        if arr.shape != want:
            if arr.size == math.prod(want):
                arr = arr.reshape(want)
            else:
                raise UserError(
                    f"{name} of one step has shape {arr.shape[1:]}, the dataset stores {shape}"
                )
        out[name] = arr
    return out


class Committer:
    """The worker's writer thread: compresses, writes and commits batches of episodes.

    Two frame buffers circulate: the env loop fills one while this thread writes the other;
    :meth:`free_buffer` blocks while both are busy (back-pressure on a slow disk).
    """

    def __init__(self, spec: WorkerSpec, writer: ShardWriter, results: QueueLike) -> None:
        self.spec, self.writer, self.results = spec, writer, results
        self.jobs: queue.Queue[Batch | None] = queue.Queue()
        self.free: queue.Queue[FrameBuffer] = queue.Queue()
        for _ in range(2):
            self.free.put(FrameBuffer(spec.layout.frame_shape,
                                      spec.commit_bytes // spec.layout.step_bytes + 1024))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="commit", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (batch := self.jobs.get()) is not None:
            frames = batch[0]
            if self.error is None:
                try:
                    self._write(batch)
                except BaseException as e:
                    self.error = e
            frames.n = 0
            self.free.put(frames)

    def _write(self, batch: Batch) -> None:
        stacked = _stack(self.spec, batch)
        if self.spec.parent_pid is not None and os.getppid() != self.spec.parent_pid:
            os._exit(1)  # orphaned: never commit what a new collector may redo
        episodes = batch[1]
        entries = self.writer.write_stacked([m for m, _ in episodes],
                                            [ep.length for _, ep in episodes], stacked)
        light = [{k: e[k] for k in ("id", "length", "return")} for e in entries]
        self.results.put(("committed", self.spec.worker, light))

    def free_buffer(self) -> FrameBuffer:
        """An empty frame buffer (waits while both are being filled or written)."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                return self.free.get(timeout=0.5)
            except queue.Empty:
                continue

    def submit(self, batch: Batch) -> None:
        """Hand a full batch to the writer thread."""
        if self.error is not None:
            raise self.error
        self.jobs.put(batch)

    def close(self) -> None:
        """Write what is queued and stop; re-raise a writer error."""
        self.jobs.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

