"""A worker process (or Ray task): rolls out the episode ids it is given into its own shard."""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from envs import EnvConfig, make_env
from worldmodel.collect.episode import Steps, run_episode
from worldmodel.collect.policies import MakePolicy, Policy, episode_seeds, make_builtin_policy
from worldmodel.collect.writer import WriterProcess
from worldmodel.dataset import Layout
from worldmodel.errors import UserError

if TYPE_CHECKING:
    import gymnasium as gym


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
    #: per batch (the first ones are smaller, see WriterProcess.due); two shared frame buffers
    #: of about this size each. Writing a batch costs ~24 ms (zarr array operations, fsyncs) on
    #: top of ~8-10 us per Reach frame: 64 MiB batches collected Reach 1.25x faster than 16 MiB
    #: ones; 128 MiB ones were no faster (the last batch, written after the env loop ends,
    #: grows with them).
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


def die_with_parent(parent_pid: int) -> None:
    """Make the kernel SIGKILL this process when its parent dies (Linux): orphans never write."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:  # pragma: no cover - unusual libc
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def make_worker_policy(spec: WorkerSpec, env: gym.Env[np.ndarray, Any]) -> Policy:
    """The worker's policy: built-in, or ``agent:PATH`` through ``spec.make_policy``."""
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
    [entry, ...])``, ``("done", k, {seconds, cpu_main, cpu_total, wait_writer})``, or ``("error", k,
    is_user_error, text)``.
    """
    k = spec.worker
    try:
        if spec.parent_pid is not None:
            die_with_parent(spec.parent_pid)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
        _worker_loop(spec, tasks, results)
    except UserError as e:
        results.put(("error", k, True, str(e)))
        raise
    except BaseException:
        results.put(("error", k, False, traceback.format_exc()))
        raise


def _worker_loop(spec: WorkerSpec, tasks: QueueLike, results: QueueLike) -> None:
    k = spec.worker
    writer = WriterProcess(spec, results)  # starts while the env is built
    try:
        env = make_env(spec.env)
        policy = make_worker_policy(spec, env)
        step_bytes = spec.layout.step_bytes
        writer.wait_ready()  # it holds the shard's lock and opened the shard
        results.put(("started", k))
        unreported, last_report = 0, time.monotonic()

        def on_steps(n: int) -> None:
            nonlocal unreported, last_report
            unreported += n
            now = time.monotonic()
            if now - last_report >= 0.5:
                results.put(("steps", k, unreported))
                unreported, last_report = 0, now

        episodes: list[tuple[dict[str, Any], Steps]] = []
        frames = writer.free_buffer()
        batch_bytes, batch_start = 0, 0.0
        started, cpu_main, cpu_all = time.monotonic(), time.thread_time(), time.process_time()
        while (eid := tasks.get()) is not None:
            if not episodes:  # the age of a batch counts from its first step
                batch_start = time.monotonic()
            env_seed, policy_seed = episode_seeds(spec.seed, int(eid))
            ep = run_episode(env, policy, env_seed, policy_seed, spec.max_episode_steps,
                             on_steps, frames.append)
            results.put(("finished", k, int(eid), ep.length, unreported))
            unreported = 0
            episodes.append(({"id": int(eid), "seed": env_seed, "policy_seed": policy_seed}, ep))
            batch_bytes += ep.length * step_bytes
            if writer.due(batch_bytes, time.monotonic() - batch_start):
                writer.submit((frames, episodes))
                episodes, batch_bytes = [], 0
                frames = writer.free_buffer()
        if episodes:
            writer.submit((frames, episodes))
        writer.close()
        env.close()
        results.put(("done", k, writer.usage(started, cpu_main, cpu_all)))
    finally:
        writer.end()
