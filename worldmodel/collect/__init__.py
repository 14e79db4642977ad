"""``worldmodel collect``: roll out a policy in parallel workers into a dataset (see ``dataset``).

The package, by concern (the names below are re-exported here; ``collect.run(cfg, out)`` is
the entry point):

* :mod:`~worldmodel.collect.policies`: the :class:`Policy` protocol, the built-in ``random``
  and ``brownian`` policies (:func:`make_builtin_policy`), :data:`MakePolicy` (``agent:PATH``)
  and :func:`episode_seeds`.
* :mod:`~worldmodel.collect.episode`: the episode loop every backend runs
  (:func:`~worldmodel.collect.episode.run_episode`, :func:`rollout`) and the reused frame
  buffers it fills.
* :mod:`~worldmodel.collect.worker`: a worker process or Ray task (:func:`collect_worker`):
  env, policy and episode loop for shard ``w{k}``; dies with its parent.
* :mod:`~worldmodel.collect.pool`: the ``envpool`` backend's worker (:func:`envpool_worker`).
* :mod:`~worldmodel.collect.writer`: the writer process a worker hands batches of episodes to
  (frames through shared memory), which compresses, writes and commits them.
* :mod:`~worldmodel.collect.coordinator`: the parent: manifest and its settings
  (:func:`settings_of`), the plan of episode ids, progress, the ``process``/``ray``/``envpool``
  backends and :func:`run`.

How a collection runs:

* Episode ``i`` gets its env seed and policy seed from ``SeedSequence(cfg.seed, spawn_key=(i,))``
  (:func:`episode_seeds`), so it is the same episode whichever worker runs it, and the dataset
  depends only on the config.
* The parent hands out episode ids through a queue; worker ``k`` owns shard ``w{k}``: it rolls
  episodes out, copying frames into shared-memory buffers, and its writer process (which holds
  the shard's lock) appends finished episodes to the shard and commits them (atomic index
  rewrite) at least every ``collect.commit_seconds``. The writer runs beside the env loop rather
  than in a thread of it, so compression and zarr writes never take the env loop's GIL.

Data flow::

    parent (coordinator)          worker k (process, Ray task     writer k (child process)
                                  or the envpool thread)
    episode ids --tasks queue-->  env loop -> frames into shared
                                  buffer A/B, other fields in
                                  lists; batch due: --socket-->   A[:n] + stacked fields ->
                                                                  zstd, zarr, fsync, commit
    progress <--results queue---  "started", "steps",   <-------  "free A" + committed entries
                                  "finished", "committed", "done"
* Re-running the same command resumes: episodes already committed are skipped, a killed
  worker's uncommitted tail is deleted. ``collect.frames`` keeps the shortest prefix of episode
  ids with at least that many frames: episodes past it (finished in parallel, committed by a
  killed run, or kept from a larger earlier target) are dropped from the index.
* Backends: ``process`` (``multiprocessing`` with the spawn start method; workers die with the
  parent, writers with their worker), ``ray`` (the same worker function as Ray tasks, e.g. on
  a cluster writing to shared storage), ``envpool`` (below).

The ``envpool`` backend (used whenever ``env.backend`` is ``envpool``, unless ``collect.backend``
is ``ray``; ``collect.backend=envpool`` needs ``env.backend=envpool``) steps ``collect.workers``
EnvPool envs from one thread of this process (EnvPool's own threads, at most one per core, run
the envs; the envs are split into two pools handled in strict alternation, so that one pool
steps while Python stores the other's frames) and writes shard ``w0`` with the same writer
process, batching and per-episode atomic commits as a worker process, so a killed run resumes the
same way. Each env ("slot") plays episode after episode; a slot takes the next episode id when
its episode ends. What is reproducible: EnvPool seeds an env only when the pool is built, so slot
``j`` is seeded with the env seed of the first episode it plays (:func:`episode_seeds`) and later
episodes continue its random stream (index entries record ``seed``, ``env_slot`` and
``slot_episode``, the slot's episode count before this one). Policies are re-seeded per episode
as in the other backends. The same config and ``collect.workers`` give the same dataset, but a
resumed run rebuilds the pool, so the episodes it adds differ from those an uninterrupted run
would have collected (they are as valid: same env, policy and settings).

Policies (``collect.policy``): ``random``, ``brownian`` (see
:mod:`~worldmodel.collect.policies`), or ``agent:PATH`` with the ``make_policy`` factory the
CLI injects.
"""

from __future__ import annotations

from worldmodel.collect.coordinator import (
    BACKENDS,
    RAY_EXTRA,
    STAGE,
    resolve_backend,
    run,
    settings_of,
)
from worldmodel.collect.episode import FrameBuffer, Steps, rollout, run_episode
from worldmodel.collect.episode import FrameBuffer as _FrameBuffer  # noqa: F401 (old name)
from worldmodel.collect.policies import (
    BrownianPolicy,
    MakePolicy,
    Policy,
    RandomPolicy,
    episode_seeds,
    make_builtin_policy,
)
from worldmodel.collect.pool import envpool_worker
from worldmodel.collect.worker import QueueLike, WorkerSpec, collect_worker

__all__ = [
    "BACKENDS",
    "RAY_EXTRA",
    "STAGE",
    "BrownianPolicy",
    "FrameBuffer",
    "MakePolicy",
    "Policy",
    "QueueLike",
    "RandomPolicy",
    "Steps",
    "WorkerSpec",
    "collect_worker",
    "envpool_worker",
    "episode_seeds",
    "make_builtin_policy",
    "resolve_backend",
    "rollout",
    "run",
    "run_episode",
    "settings_of",
]

