"""The shard writer: a process of its own that compresses, writes and commits a worker's batches.

A worker (or the envpool thread) starts one writer process for its shard and talks to it
through a socket pair; frames travel through shared memory, never through the socket::

    worker: env loop                               writer process (child of the worker)
    ---------------------------------------       ------------------------------------------
    frames copied into SharedFrames A or B        holds the shard's lock, owns the ShardWriter
    action/reward/flags/state kept as lists
    episode ends, batch due: stack the small
    fields, send ("batch", A, metas, lengths,  ->  obs = A[:n] (a view, no copy), checksums,
    arrays); go on filling B                       zstd, zarr writes, fsync, index commit
    forward ("committed", ...) to the parent   <-  ("free", A, entries): A is reused

A buffer is an anonymous shared file (``memfd`` on Linux) mapped by both processes; its file
descriptor is passed over the socket (``SCM_RIGHTS``) the first time a batch uses it and again
after it grew (an episode longer than the room left). Nothing is left behind when a process is
killed: the memory goes with the last mapping. Two buffers circulate, so the env loop waits only
when the writer is a whole batch behind (back-pressure on a slow disk).

What makes it cheap for the env loop: the buffers are pre-faulted when they are made (a fresh
page costs a fault per 4 KiB of frames); the first batches are small (1/8, 1/4, ... of
``commit_bytes``) so that the writer starts at once; the writer compresses with one thread,
leaving the env loop its core; and the worker does not wait for the writer's exit. On 2 cores a
Reach worker (~13 us per bare step) needs about as much CPU in its writer as in its env loop,
so the writer keeps up only when the second core is free; slow envs (CarRacing) never wait.

The writer never outlives its worker: it asks the kernel for ``SIGKILL`` when the thread that
started it exits (``PR_SET_PDEATHSIG``), exits when its parent is already gone, and re-checks
its parent before every commit, so an orphan never commits what a new collector may redo. As
before, an episode is visible once its index line is committed, and a writer killed mid-batch
leaves an uncommitted tail that the shard's next writer deletes.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import TYPE_CHECKING, Any

import numpy as np

from worldmodel.collect.episode import FrameBuffer, Steps
from worldmodel.dataset import Layout, Location, ShardWriter, shard_lock
from worldmodel.errors import UserError

if TYPE_CHECKING:
    from worldmodel.collect.worker import QueueLike, WorkerSpec


Batch = tuple[FrameBuffer, list[tuple[dict[str, Any], Steps]]]

#: Frame buffers per writer: the env loop fills one while the writer writes the other.
BUFFERS = 2


def _shared_file(size: int) -> int:
    """A file descriptor of ``size`` bytes of memory that another process can map."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("worldmodel-collect-frames", os.MFD_CLOEXEC)
    else:  # pragma: no cover - not Linux: an unlinked temporary file
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _map(fd: int, size: int) -> mmap.mmap:
    """Map a shared file, its pages allocated and mapped up front where the OS can.

    A page first touched in the env loop would cost a page fault per 4 KiB: pre-faulting a
    buffer once (at start-up) made Reach's env loop ~1.6x cheaper on a buffer's first use.
    """
    populate = getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | populate)


class SharedFrames(FrameBuffer):
    """A :class:`FrameBuffer` in shared memory that the writer process maps too."""

    def __init__(self, frame_shape: tuple[int, ...], capacity: int) -> None:
        self.fd = -1
        self.mm: mmap.mmap | None = None
        self.announced = False  # the writer has this mapping (its file descriptor)
        self._retired: tuple[int, mmap.mmap] | None = None  # the mapping a growth replaces
        super().__init__(frame_shape, capacity)

    def _allocate(self, capacity: int) -> np.ndarray:
        size = capacity * math.prod(self.frame_shape)
        fd = _shared_file(size)
        try:
            mm = _map(fd, size)
        except BaseException:
            os.close(fd)
            raise
        if self.mm is not None:
            self._retired = (self.fd, self.mm)
        self.fd, self.mm, self.announced = fd, mm, False
        return np.ndarray((capacity, *self.frame_shape), np.uint8, buffer=mm)

    def _grow(self, need: int) -> None:
        super()._grow(need)  # copies, then drops its reference to the old array
        if self._retired is not None:
            fd, mm = self._retired
            self._retired = None
            mm.close()
            os.close(fd)

    def close(self) -> None:
        """Unmap and close (the buffer must not be used afterwards)."""
        self.data = np.empty((0, *self.frame_shape), np.uint8)
        if self.mm is not None:
            self.mm.close()
            os.close(self.fd)
            self.mm, self.fd = None, -1


def stack_fields(layout: Layout, episodes: list[tuple[dict[str, Any], Steps]]
                 ) -> dict[str, np.ndarray]:
    """One array per stored field but ``obs``, for a batch of episodes."""
    out: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in layout.fields().items():
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


class WriterProcess:
    """The worker's side of its writer process (see the module docstring).

    Starting it starts the process, which takes the shard's lock and opens the shard while the
    worker builds its env; :meth:`wait_ready` returns once the shard is open. ``committed``
    messages for ``results`` are forwarded whenever the worker talks to the writer.

    :param spec: the worker's spec (its root, shard, worker number and layout are used).
    :param results: the worker's message queue to the parent.
    """

    def __init__(self, spec: WorkerSpec, results: QueueLike) -> None:
        self.spec, self.results = spec, results
        capacity = spec.commit_bytes // spec.layout.step_bytes + 1024
        self.buffers = [SharedFrames(spec.layout.frame_shape, capacity) for _ in range(BUFFERS)]
        self.free = list(reversed(range(BUFFERS)))
        self.cpu_seconds = 0.0  # the writer's CPU time once ready, known once it is closed
        self.waited = 0.0  # seconds the env loop waited for a free buffer (the writer behind)
        self.closed = False
        # The first batches are smaller (1/8, 1/4, ... of commit_bytes), so that the writer
        # starts early instead of idling while the env loop fills a whole first buffer.
        self.limit = max(spec.commit_bytes // 8, 1)
        ours, theirs = socket.socketpair()
        # A fresh interpreter with this process's import path (as multiprocessing's spawn
        # does), started with subprocess: a daemonic multiprocessing worker may not start
        # multiprocessing children, and the writer needs none of the __main__ module.
        code = ("import sys, json; sys.path[:] = json.loads(sys.argv[3]); "
                "from worldmodel.collect.writer import writer_main; writer_main()")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, str(theirs.fileno()), str(os.getpid()),
                 json.dumps(sys.path)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send((spec.root, spec.shard, spec.worker, spec.layout))
        self.ready = False

    def _receive(self) -> None:
        """Handle one message from the writer (waits for it)."""
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            code = self.proc.wait()
            raise RuntimeError(f"the writer process of shard {self.spec.shard} died "
                               f"(exit code {code})") from None
        kind = msg[0]
        if kind == "free":
            idx, light = msg[1], msg[2]
            self.buffers[idx].n = 0
            self.free.append(idx)
            self.results.put(("committed", self.spec.worker, light))
        elif kind == "ready":
            self.ready = True
        elif kind == "closed":
            self.cpu_seconds = msg[1]
            self.closed = True
        elif kind == "error":
            self.kill()
            if msg[1]:
                raise UserError(msg[2])
            raise RuntimeError(f"the writer of shard {self.spec.shard} failed:\n{msg[2]}")

    def wait_ready(self) -> None:
        """Wait until the writer holds the shard's lock and has opened the shard."""
        while not self.ready:
            self._receive()

    def free_buffer(self) -> FrameBuffer:
        """An empty frame buffer (waits while both are being filled or written)."""
        if not self.free:
            start = time.monotonic()
            while not self.free:
                self._receive()
            self.waited += time.monotonic() - start
        return self.buffers[self.free.pop()]

    def due(self, batch_bytes: int, age: float) -> bool:
        """Whether a batch of ``batch_bytes`` begun ``age`` seconds ago should be submitted."""
        return batch_bytes >= self.limit or age >= self.spec.commit_seconds

    def submit(self, batch: Batch) -> None:
        """Hand a full batch to the writer process."""
        frames, episodes = batch
        self.limit = min(2 * self.limit, self.spec.commit_bytes)
        idx = next(i for i, b in enumerate(self.buffers) if b is frames)
        small = stack_fields(self.spec.layout, episodes)
        buf = self.buffers[idx]
        if not buf.announced:
            self.conn.send(("buffer", idx, len(buf.data)))
            send_handle(self.conn, buf.fd, self.proc.pid)
            buf.announced = True
        lengths = [ep.length for _, ep in episodes]
        assert sum(lengths) == frames.n, "one frame per step"
        self.conn.send(("batch", idx, [m for m, _ in episodes], lengths, small))
        while self.conn.poll():  # forward what is already committed
            self._receive()

    def close(self) -> None:
        """Write what is queued and stop the writer; re-raise a writer error.

        The writer has released the shard when this returns; :meth:`join` waits for its exit.
        """
        self.conn.send(None)
        while not self.closed:
            self._receive()
        self._release()

    def join(self) -> None:
        """Wait for the writer process to exit (after :meth:`close`)."""
        self.proc.wait()

    def kill(self) -> None:
        """Stop the writer now (an error elsewhere); its uncommitted batch is dropped."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._release()

    def end(self) -> None:
        """In a worker's ``finally``: wait for a closed writer's exit, else kill it."""
        if self.closed:
            self.join()
        else:
            self.kill()

    def usage(self, started: float, cpu_main: float, cpu_all: float) -> dict[str, float]:
        """The ``done`` report of a worker whose loop began at these clock readings.

        :param started: ``time.monotonic()``; :param cpu_main: ``time.thread_time()`` of the env
            thread; :param cpu_all: ``time.process_time()`` of the worker (the writer's CPU,
            known once closed, is added).
        """
        return {"seconds": time.monotonic() - started,
                "cpu_main": time.thread_time() - cpu_main,
                "cpu_total": time.process_time() - cpu_all + self.cpu_seconds,
                "wait_writer": self.waited}

    def _release(self) -> None:
        self.conn.close()
        for b in self.buffers:
            b.close()


def writer_main() -> None:
    """The writer process: ``python -c ... FD PARENT_PID SYS_PATH`` (see :class:`WriterProcess`)."""
    import signal

    from worldmodel.collect.worker import die_with_parent

    fd, parent = int(sys.argv[1]), int(sys.argv[2])
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the collector handles Ctrl-C
    conn = Connection(fd)
    try:
        _write_batches(conn, parent)
        os._exit(0)  # done and committed: skip the interpreter's teardown (zarr's threads...)
    except (EOFError, BrokenPipeError):  # the worker is gone: so are we
        os._exit(1)
    except BaseException as e:
        text = str(e) if isinstance(e, UserError) else traceback.format_exc()
        try:
            conn.send(("error", isinstance(e, UserError), text))
        finally:
            os._exit(1)


def _write_batches(conn: Connection, parent: int) -> None:
    import zarr

    # One thread compresses (zarr's default pool has one per core, plus 4): the env loop keeps
    # its core, and the writer still keeps up (Reach, 2 cores: 0.69 of the bare speed vs 0.56).
    zarr.config.set({"threading.max_workers": 1})
    root, shard, worker, layout = conn.recv()
    loc = Location(root)
    lock = shard_lock(loc, shard)
    lock.acquire(timeout=60.0, what=f"shard {shard} of {loc}")
    try:
        writer = ShardWriter(loc, shard, layout, worker=worker)
        conn.send(("ready",))
        cpu_ready = time.process_time()  # start-up (imports, opening the shard) is not counted
        maps: dict[int, mmap.mmap] = {}
        while (msg := conn.recv()) is not None:
            if msg[0] == "buffer":
                _, idx, capacity = msg
                fd = recv_handle(conn)
                try:
                    old = maps.pop(idx, None)
                    if old is not None:
                        old.close()
                    maps[idx] = _map(fd, capacity * math.prod(layout.frame_shape))
                finally:
                    os.close(fd)
                continue
            _, idx, metas, lengths, small = msg
            frames = np.ndarray((sum(lengths), *layout.frame_shape), np.uint8, buffer=maps[idx])
            if os.getppid() != parent:
                os._exit(1)  # orphaned: never commit what a new collector may redo
            entries = writer.write_stacked(metas, lengths, {"obs": frames, **small})
            del frames
            light = [{k: e[k] for k in ("id", "length", "return")} for e in entries]
            conn.send(("free", idx, light))
        cpu = time.process_time() - cpu_ready
    finally:
        lock.release()
    conn.send(("closed", cpu))
