"""``worldmodel collect``: roll out a policy in parallel workers into a dataset (see ``dataset``).

How a collection runs:

* Episode ``i`` gets its env seed and policy seed from ``SeedSequence(cfg.seed, spawn_key=(i,))``
  (:func:`episode_seeds`), so it is the same episode whichever worker runs it, and the dataset
  depends only on the config.
* The parent hands out episode ids through a queue; worker ``k`` owns shard ``w{k}`` (it holds
  the shard's lock), rolls episodes out, and a writer thread appends finished episodes to the
  shard and commits them (atomic index rewrite) at least every ``collect.commit_seconds``.
* Re-running the same command resumes: episodes already committed are skipped, a killed
  worker's uncommitted tail is deleted. ``collect.frames`` keeps the shortest prefix of episode
  ids with at least that many frames: episodes past it (finished in parallel, committed by a
  killed run, or kept from a larger earlier target) are dropped from the index.
* Backends: ``process`` (``multiprocessing`` with the spawn start method; workers die with the
  parent), ``ray`` (the same worker function as Ray tasks, e.g. on a cluster writing to shared
  storage), ``envpool`` (below).

The ``envpool`` backend (used whenever ``env.backend`` is ``envpool``, unless ``collect.backend``
is ``ray``; ``collect.backend=envpool`` needs ``env.backend=envpool``) steps ``collect.workers``
EnvPool envs from one thread of this process (EnvPool's own threads, at most one per core, run
the envs; the envs are split into two pools handled in strict alternation, so that one pool
steps while Python stores the other's frames) and writes shard ``w0`` with the same writer
thread, batching and per-episode atomic commits as a worker process, so a killed run resumes the
same way. Each env ("slot") plays episode after episode; a slot takes the next episode id when
its episode ends. What is reproducible: EnvPool seeds an env only when the pool is built, so slot
``j`` is seeded with the env seed of the first episode it plays (:func:`episode_seeds`) and later
episodes continue its random stream (index entries record ``seed``, ``env_slot`` and
``slot_episode``, the slot's episode count before this one). Policies are re-seeded per episode
as in the other backends. The same config and ``collect.workers`` give the same dataset, but a
resumed run rebuilds the pool, so the episodes it adds differ from those an uninterrupted run
would have collected (they are as valid: same env, policy and settings).

Policies (``collect.policy``): ``random`` samples the action space; ``brownian`` is World
Models' temporally correlated exploration (ctallec/world-models): for ``Box`` actions
``a_0 ~ U(low, high)``, ``a_{t+1} = clip(a_t + sqrt(dt) * N(0, I), low, high)``; for
``Discrete``/``MultiDiscrete`` actions (no notion of a small step) a sticky random action that
is resampled uniformly with probability ``sqrt(dt)`` per step (mean run ``1/sqrt(dt)`` ~ 7 steps
at ``dt = 1/50``). ``agent:PATH`` uses the ``make_policy`` factory the CLI injects.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from envs import EnvConfig, make_env
from worldmodel.config import flatten_dotted
from worldmodel.dataset import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    Episode,
    FileLock,
    Layout,
    Location,
    ShardWriter,
    read_manifest,
    read_shard_index,
    rewrite_shard_index,
    shard_lock,
)
from worldmodel.errors import UserError

if TYPE_CHECKING:
    import gymnasium as gym
    from gymnasium import spaces

    from worldmodel.config import Config

log = logging.getLogger("worldmodel")

RAY_EXTRA = 'pip install "worldmodel[ray]"'


@runtime_checkable
class Policy(Protocol):
    """What the collector needs from a policy.

    A policy that also has ``seed(seed: int) -> None`` is re-seeded before every episode with
    that episode's policy seed, so its episodes do not depend on which worker ran them.
    """

    def reset(self, obs: np.ndarray, info: dict[str, Any]) -> None:
        """Start an episode whose first frame is ``obs`` (``(H, W, C)`` uint8)."""

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> Any:
        """The action to take on frame ``obs`` (``(H, W, C)`` uint8)."""


#: ``make_policy(spec, env, seed, epsilon) -> Policy`` for ``agent:PATH`` (agents/policy.py).
MakePolicy = Callable[[str, "gym.Env[Any, Any]", int, float], Policy]


def episode_seeds(seed: int, episode: int) -> tuple[int, int]:
    """The env seed and the policy seed of episode ``episode`` of a collection seeded ``seed``.

    Example:
        >>> episode_seeds(0, 3) == episode_seeds(0, 3) != episode_seeds(1, 3)
        True
    """
    env_seed, policy_seed = np.random.SeedSequence(seed, spawn_key=(episode,)).generate_state(2)
    return int(env_seed), int(policy_seed)


class RandomPolicy:
    """Uniform random actions: ``action_space.sample()`` of a private, per-episode seeded copy."""

    def __init__(self, space: spaces.Space[Any]) -> None:
        self.space = copy.deepcopy(space)

    def seed(self, seed: int) -> None:
        """Seed the action sampler for the next episode."""
        self.space.seed(seed)

    def reset(self, obs: np.ndarray, info: dict[str, Any]) -> None:
        """Nothing to reset."""

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> Any:
        """A uniformly random action."""
        return self.space.sample()


class BrownianPolicy:
    """Temporally correlated random actions (World Models' CarRacing exploration).

    ``Box``: ``a_0 ~ U(low, high)`` (``space.sample()``), then
    ``a_{t+1} = clip(a_t + sqrt(dt) * N(0, I), low, high)``.
    ``Discrete`` / ``MultiDiscrete``: the previous action (per component) is kept, and resampled
    uniformly with probability ``sqrt(dt)`` per step.

    :param space: the env's action space.
    :param dt: time step of the Brownian motion (ctallec/world-models uses 1/50).

    Example:
        >>> from gymnasium.spaces import Box
        >>> p = BrownianPolicy(Box(-1.0, 1.0, (2,)), dt=0.02)
        >>> p.seed(0)
        >>> a0 = p.act(None, {}); a1 = p.act(None, {})
        >>> bool(abs(a1 - a0).max() < 1.0)  # small steps: sqrt(0.02) ~ 0.14 per unit noise
        True
    """

    def __init__(self, space: spaces.Space[Any], dt: float = 1 / 50) -> None:
        from gymnasium import spaces

        if not isinstance(space, spaces.Box | spaces.Discrete | spaces.MultiDiscrete):
            raise UserError(
                f"policy brownian supports Box, Discrete and MultiDiscrete actions, not "
                f"{type(space).__name__}; use collect.policy=random"
            )
        self.space = copy.deepcopy(space)
        self.scale = math.sqrt(dt)
        self.rng = np.random.default_rng()
        self._last: Any = None

    def seed(self, seed: int) -> None:
        """Seed for the next episode (the first action is drawn afresh)."""
        self.space.seed(seed)
        self.rng = np.random.default_rng(seed)
        self._last = None

    def reset(self, obs: np.ndarray, info: dict[str, Any]) -> None:
        """Forget the previous action: the next one is uniform."""
        self._last = None

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> Any:
        """The next action of the random walk."""
        from gymnasium import spaces

        if self._last is None:
            self._last = self.space.sample()
            return self._last
        space = self.space
        if isinstance(space, spaces.Box):
            step = self.scale * self.rng.standard_normal(space.shape)
            self._last = np.clip(self._last + step, space.low, space.high).astype(space.dtype)
        elif isinstance(space, spaces.Discrete):
            if self.rng.random() < self.scale:
                self._last = space.start + self.rng.integers(space.n)
        else:
            fresh = space.sample()
            switch = self.rng.random(np.shape(fresh)) < self.scale
            self._last = np.where(switch, fresh, self._last).astype(space.dtype)
        return self._last


def make_builtin_policy(name: str, space: spaces.Space[Any], dt: float = 1 / 50) -> Policy:
    """``random`` or ``brownian`` for an action space."""
    if name == "random":
        return RandomPolicy(space)
    if name == "brownian":
        return BrownianPolicy(space, dt=dt)
    raise UserError(f"unknown built-in policy {name!r}; use random, brownian or agent:PATH")


# --------------------------------------------------------------------------------------------
# One episode


@dataclass
class _Steps:
    """An episode as Python lists (frames may go to a :class:`_FrameBuffer` instead)."""

    obs: list[np.ndarray] = field(default_factory=list)
    action: list[Any] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)
    terminated: list[bool] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    state: list[np.ndarray] | None = None

    @property
    def length(self) -> int:
        return len(self.reward)


class _FrameBuffer:
    """A reused, growable ``(capacity, H, W, C)`` uint8 array that frames are copied into.

    Keeping every frame object alive until a commit would make each step allocate fresh memory
    (page faults, cold caches); copying into two reused buffers keeps the env loop as cheap as
    a bare loop and hands the writer one contiguous array.
    """

    def __init__(self, frame_shape: tuple[int, ...], capacity: int) -> None:
        self.data = np.empty((max(capacity, 1), *frame_shape), np.uint8)
        self.n = 0

    def append(self, frame: np.ndarray) -> None:
        if self.n == len(self.data):  # a long episode: grow (rare)
            self._grow(self.n + 1)
        self.data[self.n] = frame
        self.n += 1

    def extend(self, frames: np.ndarray) -> None:
        """Append ``(T, H, W, C)`` frames."""
        if self.n + len(frames) > len(self.data):
            self._grow(self.n + len(frames))
        self.data[self.n : self.n + len(frames)] = frames
        self.n += len(frames)

    def _grow(self, need: int) -> None:
        bigger = np.empty((max(need, 2 * len(self.data)), *self.data.shape[1:]), np.uint8)
        bigger[: self.n] = self.data[: self.n]
        self.data = bigger


def _run_episode(
    env: gym.Env[np.ndarray, Any],
    policy: Policy,
    env_seed: int,
    policy_seed: int,
    max_steps: int | None = None,
    on_steps: Callable[[int], None] | None = None,
    obs_sink: Callable[[np.ndarray], None] | None = None,
) -> _Steps:
    seed = getattr(policy, "seed", None)
    if callable(seed):
        seed(policy_seed)
    obs, info = env.reset(seed=env_seed)
    policy.reset(obs, info)
    ep = _Steps(state=[] if "state" in info else None)
    keep_obs = ep.obs.append if obs_sink is None else obs_sink
    states = ep.state
    t = 0
    while True:
        keep_obs(obs)
        if states is not None:
            states.append(info["state"])
        action = policy.act(obs, info)
        obs, reward, terminated, truncated, info = env.step(action)
        t += 1
        if max_steps is not None and t >= max_steps:
            truncated = True
        ep.action.append(action)
        ep.reward.append(float(reward))
        ep.terminated.append(bool(terminated))
        ep.truncated.append(bool(truncated))
        if terminated or truncated:
            break
        if on_steps is not None and t % 64 == 0:
            on_steps(64)
    if on_steps is not None:
        on_steps(t % 64 or 64)
    return ep


def rollout(
    env: gym.Env[np.ndarray, Any],
    policy: Policy,
    env_seed: int,
    policy_seed: int,
    max_steps: int | None = None,
) -> Episode:
    """Play one episode exactly as a collector worker does.

    :param env: a preprocessed env from ``envs.make_env``.
    :param policy: the policy; re-seeded with ``policy_seed`` when it has ``seed``.
    :param env_seed: passed to ``env.reset(seed=...)``.
    :param max_steps: truncate the episode after this many steps.
    :return: the episode; ``obs`` ``(T, H, W, C)`` uint8 holds the frames before each action.
    """
    ep = _run_episode(env, policy, env_seed, policy_seed, max_steps)
    return Episode(
        obs=np.stack(ep.obs),
        action=np.asarray(ep.action),
        reward=np.asarray(ep.reward, np.float32),
        terminated=np.asarray(ep.terminated, bool),
        truncated=np.asarray(ep.truncated, bool),
        state=None if ep.state is None else np.asarray(ep.state, np.float32),
    )


# --------------------------------------------------------------------------------------------
# Workers


@dataclass
class WorkerSpec:
    """Everything a worker needs (picklable: it travels to processes and Ray tasks)."""

    root: str
    worker: int
    env: EnvConfig
    seed: int
    policy: str
    epsilon: float
    brownian_dt: float
    max_episode_steps: int | None
    layout: Layout
    commit_seconds: float
    #: per batch; two reused frame buffers of about this size. zarr costs ~1.5 ms per array
    #: operation, 12 per batch: 64 MiB batches collected Reach 1.25x faster than 16 MiB ones.
    commit_bytes: int = 64 * 2**20
    make_policy: MakePolicy | None = None
    parent_pid: int | None = None
    envs: int = 1  # envpool backend: envs in the pool

    @property
    def shard(self) -> str:
        """The shard this worker owns."""
        return f"w{self.worker}"


class QueueLike(Protocol):
    """``multiprocessing.Queue`` and ``ray.util.queue.Queue`` both fit."""

    def put(self, item: Any) -> None:
        """Add an item."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return an item."""


def _die_with_parent(parent_pid: int) -> None:
    """Make the kernel SIGKILL this worker when its parent dies (Linux), so orphans never write."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:  # pragma: no cover - unusual libc
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


_Batch = tuple[_FrameBuffer, list[tuple[dict[str, Any], _Steps]]]


def _stack(spec: WorkerSpec, batch: _Batch) -> dict[str, np.ndarray]:
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


class _Committer:
    """The worker's writer thread: compresses, writes and commits batches of episodes.

    Two frame buffers circulate: the env loop fills one while this thread writes the other;
    :meth:`free_buffer` blocks while both are busy (back-pressure on a slow disk).
    """

    def __init__(self, spec: WorkerSpec, writer: ShardWriter, results: QueueLike) -> None:
        self.spec, self.writer, self.results = spec, writer, results
        self.jobs: queue.Queue[_Batch | None] = queue.Queue()
        self.free: queue.Queue[_FrameBuffer] = queue.Queue()
        frame_bytes = math.prod(spec.layout.frame_shape)
        for _ in range(2):
            self.free.put(_FrameBuffer(spec.layout.frame_shape,
                                       spec.commit_bytes // frame_bytes + 1024))
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

    def _write(self, batch: _Batch) -> None:
        stacked = _stack(self.spec, batch)
        if self.spec.parent_pid is not None and os.getppid() != self.spec.parent_pid:
            os._exit(1)  # orphaned: never commit what a new collector may redo
        episodes = batch[1]
        entries = self.writer.write_stacked([m for m, _ in episodes],
                                            [ep.length for _, ep in episodes], stacked)
        light = [{k: e[k] for k in ("id", "length", "return")} for e in entries]
        self.results.put(("committed", self.spec.worker, light))

    def free_buffer(self) -> _FrameBuffer:
        """An empty frame buffer (waits while both are being filled or written)."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                return self.free.get(timeout=0.5)
            except queue.Empty:
                continue

    def submit(self, batch: _Batch) -> None:
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


def _make_worker_policy(spec: WorkerSpec, env: gym.Env[np.ndarray, Any]) -> Policy:
    if spec.policy.startswith("agent:"):
        if spec.make_policy is None:
            raise UserError(f"policy {spec.policy} needs a make_policy factory (agents.policy)")
        seed = int(np.random.SeedSequence(spec.seed, spawn_key=(2**32 - 1, spec.worker))
                   .generate_state(1)[0])
        return spec.make_policy(spec.policy, env, seed, spec.epsilon)
    return make_builtin_policy(spec.policy, env.action_space, spec.brownian_dt)


def collect_worker(spec: WorkerSpec, tasks: QueueLike, results: QueueLike) -> None:
    """Roll out the episode ids read from ``tasks`` (``None`` ends) into shard ``w{worker}``.

    Messages to ``results``: ``("started", k)`` (ready, before the first episode),
    ``("steps", k, n)``, ``("finished", k, id, length, unreported_steps)``, ``("committed", k,
    [entry, ...])``, ``("done", k, {seconds, cpu_main, cpu_total})``, or ``("error", k,
    is_user_error, text)``.
    """
    k = spec.worker
    try:
        if spec.parent_pid is not None:
            _die_with_parent(spec.parent_pid)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
        _worker_loop(spec, tasks, results)
    except UserError as e:
        results.put(("error", k, True, str(e)))
        raise
    except BaseException:
        results.put(("error", k, False, traceback.format_exc()))
        raise


def _worker_loop(spec: WorkerSpec, tasks: QueueLike, results: QueueLike) -> None:
    k, loc = spec.worker, Location(spec.root)
    lock = shard_lock(loc, spec.shard)
    lock.acquire(timeout=60.0, what=f"shard {spec.shard} of {loc}")
    try:
        writer = ShardWriter(loc, spec.shard, spec.layout, worker=k)
        env = make_env(spec.env)
        policy = _make_worker_policy(spec, env)
        step_bytes = sum(math.prod(s) * np.dtype(d).itemsize
                         for s, d in spec.layout.fields().values())
        committer = _Committer(spec, writer, results)
        results.put(("started", k))
        unreported, last_report = 0, time.monotonic()

        def on_steps(n: int) -> None:
            nonlocal unreported, last_report
            unreported += n
            now = time.monotonic()
            if now - last_report >= 0.5:
                results.put(("steps", k, unreported))
                unreported, last_report = 0, now

        episodes: list[tuple[dict[str, Any], _Steps]] = []
        frames = committer.free_buffer()
        batch_bytes, batch_start = 0, 0.0
        started, cpu_main, cpu_all = time.monotonic(), time.thread_time(), time.process_time()
        while (eid := tasks.get()) is not None:
            if not episodes:  # the age of a batch counts from its first step
                batch_start = time.monotonic()
            env_seed, policy_seed = episode_seeds(spec.seed, int(eid))
            ep = _run_episode(env, policy, env_seed, policy_seed, spec.max_episode_steps,
                              on_steps, frames.append)
            results.put(("finished", k, int(eid), ep.length, unreported))
            unreported = 0
            episodes.append(({"id": int(eid), "seed": env_seed, "policy_seed": policy_seed}, ep))
            batch_bytes += ep.length * step_bytes
            if (batch_bytes >= spec.commit_bytes
                    or time.monotonic() - batch_start >= spec.commit_seconds):
                committer.submit((frames, episodes))
                episodes, batch_bytes = [], 0
                frames = committer.free_buffer()
        if episodes:
            committer.submit((frames, episodes))
        committer.close()
        env.close()
        results.put(("done", k, {"seconds": time.monotonic() - started,
                                 "cpu_main": time.thread_time() - cpu_main,
                                 "cpu_total": time.process_time() - cpu_all}))
    finally:
        lock.release()


# --------------------------------------------------------------------------------------------
# The envpool backend's worker: one thread stepping a pool of EnvPool envs


@dataclass
class _Slot:
    """One env of the pool and the episode it is playing (``eid`` None: idle)."""

    policy: Policy
    frames: _FrameBuffer
    eid: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    steps: _Steps = field(default_factory=_Steps)
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
                 committer: _Committer, stop: threading.Event) -> None:
        self.spec, self.tasks, self.results, self.committer = spec, tasks, results, committer
        self.stop = stop
        self.exhausted = False  # no more ids will come
        self.batch: list[tuple[dict[str, Any], _Steps]] = []
        self.frames = committer.free_buffer()
        self.batch_bytes, self.batch_start = 0, 0.0
        self.step_bytes = sum(math.prod(s) * np.dtype(d).itemsize
                              for s, d in spec.layout.fields().values())
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
        slot.eid, slot.obs, slot.steps = eid, obs, _Steps()
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
        if (self.batch_bytes >= self.spec.commit_bytes
                or time.monotonic() - self.batch_start >= self.spec.commit_seconds):
            self.flush()

    def flush(self) -> None:
        """Submit the batch to the writer thread."""
        if self.batch:
            self.committer.submit((self.frames, self.batch))
            self.batch, self.batch_bytes = [], 0
            self.frames = self.committer.free_buffer()


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

    loc = Location(spec.root)
    lock = shard_lock(loc, spec.shard)
    lock.acquire(timeout=60.0, what=f"shard {spec.shard} of {loc}")
    try:
        writer = ShardWriter(loc, spec.shard, spec.layout, worker=spec.worker)
        committer = _Committer(spec, writer, results)
        run = _PoolRun(spec, tasks, results, committer, stop)
        first = [eid for eid in (run.next_id() for _ in range(spec.envs)) if eid is not None]
        started, cpu_main, cpu_all = time.monotonic(), time.thread_time(), time.process_time()
        groups = _make_groups(spec, first) if first else []
        try:
            spaces_env = make_envpool_env(spec.env)  # spaces only: no env is built
            slots = [_Slot(_make_worker_policy(spec, spaces_env),
                           _FrameBuffer(spec.layout.frame_shape, 1024)) for _ in first]
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
        committer.close()
        results.put(("done", spec.worker, {"seconds": time.monotonic() - started,
                                           "cpu_main": time.thread_time() - cpu_main,
                                           "cpu_total": time.process_time() - cpu_all}))
    finally:
        lock.release()


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


# --------------------------------------------------------------------------------------------
# The parent: manifest, plan, backends, progress


def _describe_space(space: spaces.Space[Any]) -> dict[str, Any]:
    from gymnasium import spaces

    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.Box):
        return {"type": "Box", "shape": list(space.shape), "dtype": str(space.dtype),
                "low": space.low.tolist(), "high": space.high.tolist()}
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist()}
    return {"type": type(space).__name__, "repr": repr(space)}


def _settings(cfg: Config) -> dict[str, Any]:
    """The settings that decide what the episodes contain: a resumed run must match them."""
    c = cfg.collect
    out: dict[str, Any] = {
        "env": {**cfg.env.preprocessing(), "backend": cfg.env.backend,
                "max_episode_steps": cfg.env.max_episode_steps},
        "seed": cfg.seed,
        "policy": c.policy,
        "max_episode_steps": c.max_episode_steps,
    }
    if c.policy.startswith("agent:"):
        out["epsilon"] = c.epsilon
    if c.policy == "brownian":
        out["brownian_dt"] = c.brownian_dt
    return json.loads(json.dumps(out))


def _versions() -> dict[str, str]:
    import gymnasium
    import numcodecs
    import zarr

    import worldmodel

    return {"worldmodel": worldmodel.__version__, "gymnasium": gymnasium.__version__,
            "zarr": zarr.__version__, "numcodecs": numcodecs.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0]}


def _probe(cfg: Config) -> tuple[Layout, dict[str, Any]]:
    """Build one env to learn frame, action and state shapes (and fail early on env errors)."""
    env = make_env(cfg.env)
    try:
        obs, info = env.reset(seed=episode_seeds(cfg.seed, 0)[0])
        action = np.asarray(env.action_space.sample())
        state = info.get("state")
        h, w, c = (int(v) for v in obs.shape)
        layout = Layout(
            frame_shape=(h, w, c),
            action_shape=tuple(action.shape),
            action_dtype=str(action.dtype),
            state_shape=None if state is None else tuple(np.asarray(state).shape),
            chunk_frames=cfg.collect.chunk_frames,
        )
        return layout, _describe_space(env.action_space)
    finally:
        env.close()


def _prepare_manifest(cfg: Config, loc: Location, workers: int) -> dict[str, Any]:
    """Create the manifest, or check that an existing dataset was collected the same way."""
    settings = _settings(cfg)
    target = {"episodes": cfg.collect.episodes, "frames": cfg.collect.frames}
    if loc.exists(MANIFEST):
        manifest = read_manifest(loc)
        old, new = flatten_dotted(manifest.get("settings", {})), flatten_dotted(settings)
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} in the dataset, {new.get(k)!r} now"
                              for k in diff[:4])
            raise UserError(
                f"{loc} was collected with different settings ({shown}); collect into a new "
                "--out folder or restore the dataset's settings (see its config.yaml)"
            )
    else:
        if not loc.remote and any(p.name != ".collect.lock" for p in Path(loc.url).iterdir()):
            raise UserError(f"{loc} exists and is not a dataset; choose an empty or new --out")
        layout, action_space = _probe(cfg)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "env_id": cfg.env.id,
            "preprocessing": cfg.env.preprocessing(),
            "policy": cfg.collect.policy,
            "seed": cfg.seed,
            "settings": settings,
            "frame_shape": list(layout.frame_shape),
            "action_space": action_space,
            "has_state": layout.state_shape is not None,
            "layout": layout.to_json(),
            "compressor": "zstd level 3 with frame checksums, per chunk",
            "shards": [],
            "config": cfg.model_dump(mode="json"),
            "versions": _versions(),
            "runs": [],
        }
    manifest["target"] = target
    manifest["shards"] = sorted(set(manifest.get("shards", [])) | {f"w{k}" for k in range(workers)},
                                key=lambda s: int(s[1:]))
    loc.write_json(manifest, MANIFEST)
    return manifest


def _committed(loc: Location, shards: list[str]) -> dict[int, int]:
    """Episode id -> length of every committed episode (after orphaned writers are gone)."""
    out: dict[int, int] = {}
    for shard in shards:
        lock = shard_lock(loc, shard)
        lock.acquire(timeout=60.0, what=f"shard {shard} of {loc}")  # waits for dying orphans
        lock.release()
        for entry in read_shard_index(loc, shard):
            out[int(entry["id"])] = int(entry["length"])
    return out


class _Plan:
    """Which episode ids to hand out, and when the collection is complete."""

    def __init__(self, cfg: Config, committed: dict[int, int], workers: int) -> None:
        self.episodes, self.frames = cfg.collect.episodes, cfg.collect.frames
        self.lengths = dict(committed)  # id -> length of committed and finished episodes
        self.workers = workers
        self.final_n: int | None = None  # frames mode: the dataset is ids < final_n
        self._prefix_n = self._prefix_sum = 0
        if self.episodes is not None:
            self.todo: Iterator[int] = iter([i for i in range(self.episodes) if i not in committed])
            self.remaining = sum(1 for i in range(self.episodes) if i not in committed)
        else:
            self.todo = (i for i in range(2**62) if i not in committed)
            self.remaining = -1
            self._advance()

    def _advance(self) -> None:
        assert self.frames is not None
        while self.final_n is None and self._prefix_n in self.lengths:
            self._prefix_sum += self.lengths[self._prefix_n]
            self._prefix_n += 1
            if self._prefix_sum >= self.frames:
                self.final_n = self._prefix_n

    @property
    def complete(self) -> bool:
        """Nothing left to collect."""
        return self.remaining == 0 if self.episodes is not None else self.final_n is not None

    def initial(self) -> list[int]:
        """Ids to queue at the start (all of them for ``episodes``)."""
        if self.episodes is not None:
            return list(self.todo)
        return [next(self.todo) for _ in range(self.workers + 1)]

    def finished(self, eid: int, length: int) -> list[int]:
        """Record a finished episode; returns the ids to queue next (frames mode)."""
        self.lengths[eid] = length
        if self.frames is None:
            return []
        self._advance()
        if self.final_n is not None:
            return []
        return [next(self.todo)]


class _Progress:
    """The tqdm bar and the counters behind the summary."""

    def __init__(self, cfg: Config, committed: dict[int, int]) -> None:
        from tqdm.auto import tqdm

        from worldmodel.utils import progress_enabled

        self.by_frames = cfg.collect.frames is not None
        total = cfg.collect.frames if self.by_frames else cfg.collect.episodes
        initial = sum(committed.values()) if self.by_frames else len(committed)
        self.bar = tqdm(total=total, initial=min(initial, total or 0), desc="collect",
                        unit="frame" if self.by_frames else "ep", dynamic_ncols=True,
                        disable=not progress_enabled())
        self.frames = self.episodes = self.committed = 0
        self.start = time.monotonic()

    def steps(self, n: int) -> None:
        self.frames += n
        if self.by_frames:
            self.bar.update(n)
        self._postfix()

    def finished(self) -> None:
        self.episodes += 1
        if not self.by_frames:
            self.bar.update(1)
        self._postfix()

    def _postfix(self) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix(fps=f"{self.frames / elapsed:.0f}", eps=self.episodes,
                             committed=self.committed, refresh=False)

    def close(self) -> None:
        self.bar.close()


@dataclass
class _Job:
    """A collection in progress: what the backends run and the coordinator tracks."""

    cfg: Config
    loc: Location
    specs: list[WorkerSpec]
    plan: _Plan
    progress: _Progress
    started: dict[int, float] = field(default_factory=dict)  # worker -> time it was ready
    done: dict[int, float] = field(default_factory=dict)  # worker -> time it finished
    usage: dict[int, dict[str, float]] = field(default_factory=dict)  # worker -> busy/CPU s
    stopped: bool = False
    backend: str = "process"  # the backend that runs (see resolve_backend)


def _handle(job: _Job, msg: tuple[Any, ...], tasks: QueueLike) -> None:
    kind, k = msg[0], msg[1]
    if kind == "started":
        job.started[k] = time.monotonic()
    elif kind == "steps":
        job.progress.steps(msg[2])
    elif kind == "finished":
        job.progress.steps(msg[4])
        job.progress.finished()
        for eid in job.plan.finished(msg[2], msg[3]):
            tasks.put(eid)
        if job.plan.frames is not None and job.plan.final_n is not None and not job.stopped:
            job.stopped = True  # enough frames: one end marker per worker
            for _ in job.specs:
                tasks.put(None)
    elif kind == "committed":
        job.progress.committed += len(msg[2])
    elif kind == "done":
        job.done[k] = time.monotonic()
        job.usage[k] = dict(msg[2])
    elif kind == "error":
        if msg[2]:
            raise UserError(msg[3])
        raise RuntimeError(f"collect worker {k} failed:\n{msg[3]}")


def _coordinate(job: _Job, tasks: QueueLike, poll: Callable[[float], Any],
                check: Callable[[], None]) -> None:
    """Feed ids and follow the workers until all of them are done."""
    for eid in job.plan.initial():
        tasks.put(eid)
    if job.plan.episodes is not None:
        for _ in job.specs:
            tasks.put(None)
    while len(job.done) < len(job.specs):
        msg = poll(0.2)
        if msg is None:
            check()
            continue
        _handle(job, msg, tasks)


def _poll_queue(q: Any, timeout: float, empty: tuple[type[BaseException], ...]) -> Any:
    try:
        return q.get(timeout=timeout)
    except empty:
        return None


def _run_process(job: _Job) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    tasks: Any = ctx.Queue()
    results: Any = ctx.Queue()
    procs = [ctx.Process(target=collect_worker, args=(spec, tasks, results), daemon=True,
                         name=f"collect-{spec.shard}") for spec in job.specs]
    for p in procs:
        p.start()

    def check() -> None:
        for spec, p in zip(job.specs, procs, strict=True):
            if p.exitcode not in (None, 0) and spec.worker not in job.done:
                msg = _poll_queue(results, 1.0, (queue.Empty,))  # its error message, if any
                if msg is not None:
                    _handle(job, msg, tasks)
                raise RuntimeError(f"collect worker {spec.worker} died (exit code {p.exitcode})")

    try:
        _coordinate(job, tasks, lambda t: _poll_queue(results, t, (queue.Empty,)), check)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
        tasks.cancel_join_thread()
        results.cancel_join_thread()


def _run_ray(job: _Job) -> None:
    try:
        import ray
        from ray.util.queue import Empty, Queue
    except ImportError as e:
        raise UserError(f"collect.backend=ray needs Ray: run `{RAY_EXTRA}`") from e
    started_here = not ray.is_initialized()
    if started_here:
        address = job.cfg.collect.ray_address
        if address is None:
            ray.init(include_dashboard=False)
        else:
            ray.init(address=address)
    tasks = Queue(actor_options={"num_cpus": 0})
    results = Queue(actor_options={"num_cpus": 0})
    remote = ray.remote(num_cpus=1, max_retries=0)(collect_worker)
    refs = [remote.remote(spec, tasks, results) for spec in job.specs]

    def check() -> None:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as e:
                msg = _poll_queue(results, 1.0, (Empty,))
                if msg is not None:
                    _handle(job, msg, tasks)
                raise RuntimeError(f"a Ray collect task failed: {e}") from e

    try:
        _coordinate(job, tasks, lambda t: _poll_queue(results, t, (Empty,)), check)
        ray.get(refs)
    finally:
        for ref in refs:
            ray.cancel(ref, force=True)
        for q in (tasks, results):
            q.shutdown(force=True)
        if started_here:
            ray.shutdown()


def _run_envpool(job: _Job) -> None:
    """One pool of EnvPool envs, stepped by a thread of this process (see the module docstring)."""
    (spec,) = job.specs
    tasks: queue.Queue[int | None] = queue.Queue()
    results: queue.Queue[tuple[Any, ...]] = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(
        target=envpool_worker, name="collect-envpool", daemon=True,
        args=(spec, tasks, results, stop, lambda: job.plan.final_n is not None),
    )
    thread.start()

    def check() -> None:
        if not thread.is_alive() and spec.worker not in job.done:
            msg = _poll_queue(results, 0.1, (queue.Empty,))
            if msg is not None:
                _handle(job, msg, tasks)
            raise RuntimeError("the envpool collector thread stopped without finishing")

    try:
        _coordinate(job, tasks, lambda t: _poll_queue(results, t, (queue.Empty,)), check)
    finally:
        stop.set()
        thread.join(timeout=60)


BACKENDS: dict[str, Callable[[_Job], None]] = {
    "process": _run_process,
    "ray": _run_ray,
    "envpool": _run_envpool,
}


def _drop_extra(loc: Location, plan: _Plan, shards: list[str]) -> None:
    """Frames mode: forget every episode past the shortest prefix of ids that has the frames.

    That includes episodes committed by an earlier, killed run of the same dataset, and those
    of a previous run with a larger target. Only index lines go: the frames stay in the shard
    (unread; a shard's tail is deleted by its next writer).
    """
    if plan.final_n is None:
        return
    dropped = 0
    for shard in shards:
        entries = read_shard_index(loc, shard)
        keep = [e for e in entries if int(e["id"]) < plan.final_n]
        if len(keep) != len(entries):
            with shard_lock(loc, shard):
                rewrite_shard_index(loc, shard, keep)
            dropped += len(entries) - len(keep)
    if dropped:
        log.info("collect: dropped %d episode(s) past the first %d, which hold the %d frames "
                 "requested", dropped, plan.final_n, plan.frames)


def run(cfg: Config, out: Path, make_policy: MakePolicy | None = None) -> Path:
    """Collect ``cfg.collect.episodes`` episodes (or ``frames`` frames) into the dataset ``out``.

    Re-running the same command resumes; a dataset collected with other env, preprocessing,
    seed or policy settings is refused.

    :param cfg: the run config (sections ``seed``, ``env``, ``collect``).
    :param out: the dataset folder (created when missing).
    :param make_policy: factory for ``agent:PATH`` policies (see :data:`MakePolicy`).
    :return: ``out``.
    """
    c = cfg.collect
    if c.policy.startswith("agent:") and make_policy is None:
        raise UserError(f"collect.policy={c.policy} needs an agent policy factory; run it "
                        "through `worldmodel collect`, which provides agents.policy.make_policy")
    if c.backend not in BACKENDS:  # pragma: no cover - the config validates it
        raise UserError(f"unknown collect.backend {c.backend!r}")
    resolve_backend(cfg)  # fail before creating anything
    loc = Location(out)
    if not loc.remote:
        try:
            Path(loc.url).mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise UserError(f"--out {loc} is a file; pass a folder for the dataset") from None
        except OSError as e:
            raise UserError(f"cannot create the dataset folder {loc} ({e.strerror})") from e
    lock = FileLock(None if loc.remote else loc.path(".collect.lock"))
    lock.acquire(timeout=0.0, what=str(loc))
    try:
        return _run_locked(cfg, loc, make_policy)
    finally:
        lock.release()


def resolve_backend(cfg: Config) -> str:
    """The backend that runs: ``envpool`` whenever ``env.backend`` is (unless ``ray``)."""
    backend = cfg.collect.backend
    if cfg.env.backend == "envpool" and backend == "process":
        return "envpool"
    if backend == "envpool" and cfg.env.backend != "envpool":
        raise UserError("collect.backend=envpool steps EnvPool's envs: set env.backend=envpool "
                        "too (EnvPool runs CarRacing-v3 and ALE/<Game>-v5), or use "
                        "collect.backend=process")
    return backend


def _run_locked(cfg: Config, loc: Location, make_policy: MakePolicy | None) -> Path:
    c = cfg.collect
    backend = resolve_backend(cfg)
    pooled = backend == "envpool"  # one thread stepping a pool of c.workers envs, shard w0
    manifest = _prepare_manifest(cfg, loc, 1 if pooled else c.workers)
    committed = _committed(loc, manifest["shards"])
    plan = _Plan(cfg, committed, c.workers)
    loc.write_text(cfg.to_yaml(), "config.yaml")
    if plan.complete:
        _drop_extra(loc, plan, manifest["shards"])
        kept = [n for i, n in committed.items() if plan.final_n is None or i < plan.final_n]
        log.info("collect: %s already holds the requested data (%d episodes, %d frames)",
                 loc, len(kept), sum(kept))
        return Path(loc.url)
    workers = c.workers if plan.episodes is None else min(c.workers, plan.remaining)
    layout = Layout.from_json(manifest["layout"])
    specs = [
        WorkerSpec(
            root=loc.url, worker=k, env=cfg.env, seed=cfg.seed, policy=c.policy,
            epsilon=c.epsilon, brownian_dt=c.brownian_dt, max_episode_steps=c.max_episode_steps,
            layout=layout, commit_seconds=c.commit_seconds, make_policy=make_policy,
            parent_pid=os.getpid() if backend == "process" else None,
            envs=workers if pooled else 1,
        )
        for k in range(1 if pooled else workers)
    ]
    progress = _Progress(cfg, committed)
    job = _Job(cfg=cfg, loc=loc, specs=specs, plan=plan, progress=progress, backend=backend)
    log.info("collect: %s, policy %s, %d %s (%s) -> %s", cfg.env.id, c.policy, workers,
             "envs in one pool" if pooled else "worker(s)", backend, loc)
    try:
        BACKENDS[backend](job)
    finally:
        progress.close()
    _drop_extra(loc, plan, manifest["shards"])
    return _finish(job, manifest, committed)


def _finish(job: _Job, manifest: dict[str, Any], before: dict[int, int]) -> Path:
    """Log the summary and record this run in the manifest."""
    loc, progress = job.loc, job.progress
    now = _committed(loc, manifest["shards"])
    wall = time.monotonic() - progress.start
    first = min(job.started.values(), default=progress.start)
    active = max(max(job.done.values(), default=first) - first, 1e-9)
    frames = sum(now.values()) - sum(before.values())
    run_info = {
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backend": job.backend,
        "workers": len(job.specs),
        "envs": sum(s.envs for s in job.specs),
        "episodes": len(now) - len(before),
        "frames": frames,
        "frames_stepped": progress.frames,
        "seconds": round(wall, 3),
        "startup_seconds": round(first - progress.start, 3),
        "active_seconds": round(active, 3),
        "fps": round(progress.frames / active, 1),
        # CPU seconds of the workers' env threads and of whole worker processes (env + writer)
        "cpu_main_seconds": round(sum(u["cpu_main"] for u in job.usage.values()), 3),
        "cpu_total_seconds": round(sum(u["cpu_total"] for u in job.usage.values()), 3),
    }
    manifest = read_manifest(loc)
    manifest["runs"] = [*manifest.get("runs", []), run_info]
    loc.write_json(manifest, MANIFEST)
    log.info(
        "collect: +%d episodes, +%d frames in %.1f s (%.1f s start-up; collect/fps %.0f with %d "
        "worker(s)); dataset: %d episodes, %d frames -> %s",
        run_info["episodes"], frames, wall, first - progress.start, run_info["fps"],
        len(job.specs), len(now), sum(now.values()), loc,
    )
    return Path(loc.url)
