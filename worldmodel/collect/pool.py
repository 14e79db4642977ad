"""The ``envpool`` backend's worker: one thread stepping a pool of EnvPool envs into shard ``w0``.

See :mod:`worldmodel.collect` for what is reproducible with EnvPool.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worldmodel.collect.episode import FrameBuffer, Steps
from worldmodel.collect.policies import Policy, episode_seeds
from worldmodel.collect.worker import QueueLike, WorkerSpec, make_worker_policy
from worldmodel.collect.writer import WriterProcess
from worldmodel.errors import UserError


@dataclass
class _Slot:
    """One env of the pool and the episode it is playing (``eid`` None: idle)."""

    policy: Policy
    frames: FrameBuffer
    eid: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    steps: Steps = field(default_factory=Steps)
    obs: np.ndarray | None = None
    played: int = 0  # episodes finished since the pool was built


def envpool_worker(spec: WorkerSpec, tasks: QueueLike, results: QueueLike,
                   stop: threading.Event, enough: Callable[[], bool]) -> None:
    """Roll out the ids from ``tasks`` in a pool of ``spec.envs`` EnvPool envs into ``w0``.

    The messages to ``results`` are those of :func:`collect_worker`. ``stop`` ends the loop
    early; so does ``enough()`` (frames mode: the dataset is complete), dropping the episodes
    still running (their ids are past the dataset's end).
    """
    from gymnasium.error import Error as GymError

    try:
        _envpool_loop(spec, tasks, results, stop, enough)
    except (UserError, GymError) as e:
        results.put(("error", spec.worker, True, f"collect (envpool): {e}"))
    except BaseException:
        results.put(("error", spec.worker, False, traceback.format_exc()))


class _PoolRun:
    """The state of :func:`envpool_worker`: episode ids, the batch being filled, progress."""

    def __init__(self, spec: WorkerSpec, tasks: QueueLike, results: QueueLike,
                 writer: WriterProcess, stop: threading.Event) -> None:
        self.spec, self.tasks, self.results, self.writer = spec, tasks, results, writer
        self.stop = stop
        self.exhausted = False  # no more ids will come
        self.batch: list[tuple[dict[str, Any], Steps]] = []
        self.frames = writer.free_buffer()
        self.batch_bytes, self.batch_start = 0, 0.0
        self.step_bytes = spec.layout.step_bytes
        self.unreported, self.last_report = 0, time.monotonic()

    def next_id(self) -> int | None:
        """The next episode id, or None when there are no more."""
        while not self.exhausted:
            try:
                eid = self.tasks.get(timeout=0.2)
            except queue.Empty:
                self.exhausted = self.stop.is_set()
                continue
            self.exhausted = eid is None
            return None if eid is None else int(eid)
        return None

    def start(self, slot: _Slot, eid: int, env_seed: int, obs: np.ndarray, index: int) -> None:
        """Begin episode ``eid`` in ``slot`` (env ``index`` of the pool) on frame ``obs``."""
        policy_seed = episode_seeds(self.spec.seed, eid)[1]
        seed = getattr(slot.policy, "seed", None)
        if callable(seed):
            seed(policy_seed)
        slot.policy.reset(obs, {})
        slot.eid, slot.obs, slot.steps = eid, obs, Steps()
        slot.frames.n = 0
        slot.meta = {"id": eid, "seed": env_seed, "policy_seed": policy_seed,
                     "env_slot": index, "slot_episode": slot.played}

    def counted(self, n: int) -> None:
        """``n`` more frames stepped (reported about twice a second)."""
        self.unreported += n
        now = time.monotonic()
        if now - self.last_report >= 0.5:
            self.results.put(("steps", self.spec.worker, self.unreported))
            self.unreported, self.last_report = 0, now

    def finish(self, slot: _Slot) -> None:
        """Hand ``slot``'s finished episode to the batch; commit the batch when due."""
        assert slot.eid is not None
        ep = slot.steps
        self.results.put(("finished", self.spec.worker, slot.eid, ep.length, self.unreported))
        self.unreported = 0
        if not self.batch:  # the age of a batch counts from its first episode
            self.batch_start = time.monotonic()
        self.frames.extend(slot.frames.data[: slot.frames.n])
        self.batch.append((slot.meta, ep))
        self.batch_bytes += ep.length * self.step_bytes
        slot.played += 1
        if self.writer.due(self.batch_bytes, time.monotonic() - self.batch_start):
            self.flush()

    def flush(self) -> None:
        """Submit the batch to the writer process."""
        if self.batch:
            self.writer.submit((self.frames, self.batch))
            self.batch, self.batch_bytes = [], 0
            self.frames = self.writer.free_buffer()


@dataclass
class _Group:
    """One of the (at most two) pools and its slots; ``sent``: local ids of the pending step."""

    pool: Any  # envs.envpool.EnvPoolBatch
    slots: list[int]  # global slot index of each env of the pool
    sent: list[int] | None = None
    actions: list[Any] = field(default_factory=list)


def _make_groups(spec: WorkerSpec, first: list[int]) -> list[_Group]:
    """Split the slots over two pools (one for a single env), threads split between them.

    While Python handles one pool's step (frames, policies, storage) the other pool's envs step
    in EnvPool's threads. The two are handled in a fixed alternation, so the order of events,
    and therefore the dataset, does not depend on timing.
    """
    from envs.envpool import EnvPoolBatch, default_threads

    n = len(first)
    parts = [list(range(n))] if n == 1 else [list(range((n + 1) // 2)),
                                             list(range((n + 1) // 2, n))]
    groups: list[_Group] = []
    try:
        for part in parts:
            seeds = [episode_seeds(spec.seed, first[j])[0] for j in part]
            # each pool may use every core: while one waits for Python, the other's run
            threads = default_threads(len(part))
            groups.append(_Group(EnvPoolBatch(spec.env, seeds, num_threads=threads), part))
    except BaseException:
        for g in groups:
            g.pool.close()
        raise
    return groups


def _envpool_loop(spec: WorkerSpec, tasks: QueueLike, results: QueueLike,
                  stop: threading.Event, enough: Callable[[], bool]) -> None:
    from envs.envpool import make_envpool_env

    writer = WriterProcess(spec, results)  # starts while the pools are built
    try:
        run = _PoolRun(spec, tasks, results, writer, stop)
        first = [eid for eid in (run.next_id() for _ in range(spec.envs)) if eid is not None]
        started, cpu_main, cpu_all = time.monotonic(), time.thread_time(), time.process_time()
        groups = _make_groups(spec, first) if first else []
        try:
            spaces_env = make_envpool_env(spec.env)  # spaces only: no env is built
            slots = [_Slot(make_worker_policy(spec, spaces_env),
                           FrameBuffer(spec.layout.frame_shape, 1024)) for _ in first]
            writer.wait_ready()  # it holds the shard's lock and opened the shard
            results.put(("started", spec.worker))
            for g in groups:
                obs, _ = g.pool.reset()
                for i, j in enumerate(g.slots):
                    run.start(slots[j], first[j], g.pool.seeds[i], obs[i], j)
            _step_pools(run, groups, slots, stop, enough)
        finally:
            for g in groups:
                g.pool.close()
        run.flush()
        writer.close()
        results.put(("done", spec.worker, writer.usage(started, cpu_main, cpu_all)))
    finally:
        writer.end()


def _step_pools(run: _PoolRun, groups: list[_Group], slots: list[_Slot], stop: threading.Event,
                enough: Callable[[], bool]) -> None:
    """Step the busy slots until all are idle (or ``stop``, or ``enough()`` in frames mode)."""
    for g in groups:
        _send(g, slots)
    while not stop.is_set() and not enough():
        pending = [g for g in groups if g.sent is not None]
        if not pending:
            return
        for g in pending:
            _receive(run, g, slots)
            _send(g, slots)


def _send(g: _Group, slots: list[_Slot]) -> None:
    """Store the current frames of ``g``'s busy slots and send their policies' actions."""
    g.sent = [i for i, j in enumerate(g.slots) if slots[j].eid is not None] or None
    if g.sent is None:
        return
    g.actions = []
    for i in g.sent:
        slot = slots[g.slots[i]]
        assert slot.obs is not None
        slot.frames.append(slot.obs)
        g.actions.append(slot.policy.act(slot.obs, {}))
    g.pool.send(np.asarray(g.actions), g.sent)


def _receive(run: _PoolRun, g: _Group, slots: list[_Slot]) -> None:
    """Record ``g``'s pending step; finish ended episodes and start the next ones."""
    assert g.sent is not None
    obs, reward, terminated, truncated, _ = g.pool.recv()
    cap = run.spec.max_episode_steps
    ended = []
    for row, i in enumerate(g.sent):
        slot = slots[g.slots[i]]
        steps = slot.steps
        steps.action.append(g.actions[row])
        steps.reward.append(float(reward[row]))
        steps.terminated.append(bool(terminated[row]))
        cut = bool(truncated[row]) or (cap is not None and steps.length >= cap)
        steps.truncated.append(cut)
        slot.obs = obs[row]
        if cut or terminated[row]:
            ended.append(i)
    run.counted(len(g.sent))
    g.sent = None
    again: list[tuple[int, int]] = []
    for i in ended:
        slot = slots[g.slots[i]]
        run.finish(slot)
        slot.eid = None
        eid = run.next_id()
        if eid is not None:
            again.append((i, eid))
    if again:
        obs, _ = g.pool.reset([i for i, _ in again])
        for row, (i, eid) in enumerate(again):
            run.start(slots[g.slots[i]], eid, g.pool.seeds[i], obs[row], g.slots[i])

