"""The parent of a collection: manifest, plan, progress, the backends, and :func:`run`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from envs import make_env
from worldmodel.collect.policies import MakePolicy, episode_seeds
from worldmodel.collect.pool import envpool_worker
from worldmodel.collect.worker import QueueLike, WorkerSpec, collect_worker
from worldmodel.config import flatten_dotted
from worldmodel.dataset import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    Layout,
    Location,
    read_manifest,
    read_shard_index,
    rewrite_shard_index,
    shard_lock,
)
from worldmodel.errors import UserError
from worldmodel.runfolder import FolderLock, check_kind
from worldmodel.stages import StageSpec
from worldmodel.stages import settings as stage_settings

if TYPE_CHECKING:
    from gymnasium import spaces

    from worldmodel.config import Config

log = logging.getLogger("worldmodel")

RAY_EXTRA = 'pip install "worldmodel[ray]"'


def describe_space(space: spaces.Space[Any]) -> dict[str, Any]:
    """A manifest's ``action_space`` entry: the space as plain JSON (type, shape, bounds)."""
    from gymnasium import spaces

    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.Box):
        return {"type": "Box", "shape": list(space.shape), "dtype": str(space.dtype),
                "low": space.low.tolist(), "high": space.high.tolist()}
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist()}
    return {"type": type(space).__name__, "repr": repr(space)}


def settings_of(cfg: Config) -> dict[str, Any]:
    """The settings that decide what the episodes contain: a resumed run must match them.

    The ``output`` keys :data:`STAGE` reads (:func:`worldmodel.stages.settings`), as dotted keys.
    """
    return json.loads(json.dumps(stage_settings(cfg, STAGE, "output")))


def library_versions() -> dict[str, str]:
    """The versions a dataset records of the libraries that wrote it."""
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
        return layout, describe_space(env.action_space)
    finally:
        env.close()


def _prepare_manifest(cfg: Config, loc: Location, workers: int) -> dict[str, Any]:
    """Create the manifest, or check that an existing dataset was collected the same way."""
    settings = settings_of(cfg)
    target = {"episodes": cfg.collect.episodes, "frames": cfg.collect.frames}
    if loc.exists(MANIFEST):
        manifest = read_manifest(loc)
        old, new = flatten_dotted(manifest.get("settings", {})), flatten_dotted(settings)
        # (datasets of older versions recorded fewer settings: those are compared)
        diff = [k for k in sorted(set(old) & set(new)) if old.get(k) != new.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} in the dataset, {new.get(k)!r} now"
                              for k in diff[:4])
            raise UserError(
                f"{loc} was collected with different settings ({shown}); collect into a new "
                "--out folder or restore the dataset's settings (see its config.yaml)"
            )
        _check_target(cfg, loc, manifest)
    else:
        if not loc.remote and any(p.name != LOCK_NAME for p in Path(loc.url).iterdir()):
            raise UserError(f"{loc} exists and is not a dataset; choose an empty or new --out")
        layout, action_space = _probe(cfg)
        manifest = new_manifest(cfg, layout, action_space, policy=cfg.collect.policy,
                                seed=cfg.seed)
    manifest["target"] = target
    manifest["shards"] = sorted(set(manifest.get("shards", [])) | {f"w{k}" for k in range(workers)},
                                key=lambda s: int(s[1:]))
    loc.write_json(manifest, MANIFEST)
    return manifest


def new_manifest(cfg: Config, layout: Layout, action_space: dict[str, Any], *, policy: str,
                 seed: int | None, shards: list[str] | None = None) -> dict[str, Any]:
    """A new dataset's ``manifest.json`` record (the collector's, and Minari imports').

    :param action_space: :func:`describe_space` of the env's action space.
    """
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "env_id": cfg.env.id,
        "preprocessing": cfg.env.preprocessing(),
        "policy": policy,
        "seed": seed,
        "settings": settings_of(cfg),
        "frame_shape": list(layout.frame_shape),
        "action_space": action_space,
        "has_state": layout.state_shape is not None,
        "layout": layout.to_json(),
        "compressor": "zstd level 3 with frame checksums, per chunk",
        "shards": shards or [],
        "config": cfg.model_dump(mode="json"),
        "versions": library_versions(),
        "runs": [],
    }


def _check_target(cfg: Config, loc: Location, manifest: dict[str, Any]) -> None:
    """Refuse an episode target below what the dataset already holds (nothing is deleted)."""
    want = cfg.collect.episodes
    if want is None:
        return  # frames mode keeps the shortest prefix of episodes that holds the frames
    held = sum(len(read_shard_index(loc, shard)) for shard in manifest.get("shards", []))
    if held > want:
        raise UserError(
            f"{loc} already holds {held} committed episodes, more than collect.episodes={want}; "
            f"set collect.episodes >= {held} to use it (nothing is deleted), or collect into a "
            "new --out folder"
        )


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
    """The progress (tqdm on a terminal, else a line now and then) and the summary's counters."""

    def __init__(self, cfg: Config, committed: dict[int, int]) -> None:
        from worldmodel.utils import progress

        self.by_frames = cfg.collect.frames is not None
        total = cfg.collect.frames if self.by_frames else cfg.collect.episodes
        initial = sum(committed.values()) if self.by_frames else len(committed)
        self.bar = progress(total, min(initial, total or 0), "collect",
                            unit="frame" if self.by_frames else "ep")
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
    if loc.remote:  # no lock on remote storage: one writer is the user's responsibility
        return _run_locked(cfg, loc, make_policy)
    folder = Path(loc.url)
    check_kind(folder, STAGE.kind)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the dataset folder {loc} ({e.strerror})") from e
    lock = FolderLock(folder / LOCK_NAME)  # removed again on release
    try:
        lock.acquire(f"dataset {loc}")
        return _run_locked(cfg, loc, make_policy)
    finally:
        lock.release()
        if created and not loc.exists(MANIFEST):  # refused before any data: leave nothing
            with contextlib.suppress(OSError):
                for leftover in folder.iterdir():
                    if leftover.is_file():
                        leftover.unlink()
                folder.rmdir()


def _run_stage(cfg: Config, out: Path, inputs: Mapping[str, Any], resume: bool | None) -> Path:
    return run(cfg, out)


#: The lock a collection holds on its dataset folder (removed when it ends).
LOCK_NAME = ".collect.lock"

#: ``collect`` reads ``seed``, ``env`` (not the agent's training envs) and ``collect``.
STAGE = StageSpec(
    "collect", "dataset",
    reads=("seed", "env", "collect"),
    ignores=("env.n_envs", "env.vec_env"),
    run=_run_stage,
    folder="data",
)


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
        # CPU seconds of the workers' env threads and of whole workers (env + writer processes)
        "cpu_main_seconds": round(sum(u["cpu_main"] for u in job.usage.values()), 3),
        "cpu_total_seconds": round(sum(u["cpu_total"] for u in job.usage.values()), 3),
        # time the env loops waited for their writer (non-zero: writing limited the speed)
        "writer_wait_seconds": round(sum(u.get("wait_writer", 0.0)
                                         for u in job.usage.values()), 3),
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
