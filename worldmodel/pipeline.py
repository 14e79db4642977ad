"""``worldmodel pipeline``: collect -> train-vae -> train-agent -> evaluate -> compare -> visualize.

Each stage writes its own sub-folder of the pipeline folder::

    OUT/config.yaml                  the resolved pipeline config
    OUT/data/                        collect
    OUT/vae/                         train-vae
    OUT/agents/{obs_mode}__seed{s}/  train-agent, then evaluate (eval.json)
    OUT/report/                      compare (report.md, report.json, plots)
    OUT/visualize/                   visualize (the VAE's pictures)

Caching: a stage's key hashes the config sections it reads plus the keys of the stages it reads
from. A finished stage gets a stamp ``.NAME.done.json`` beside its folder with its key;
re-running skips it when the key is unchanged. A changed key reruns that stage and, through the
chained keys, every stage after it (the stale output is kept once as ``NAME.previous``). A stage
that was interrupted has only ``.NAME.started.json`` with its key, and resumes from its
checkpoints.

This module sits on top with the CLI: it is the only core module that calls into ``agents``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from worldmodel.config import Config, ObsMode
from worldmodel.errors import UserError
from worldmodel.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

#: Modes whose agents read the trained VAE (random-encoder only borrows its architecture).
USES_VAE_WEIGHTS = ("latent", "latent-finetune")


#: Settings that change how a stage runs or logs, never what it produces: not part of stage keys.
NOT_IN_KEYS = {
    "vae": ("log_every", "image_every", "device"),
    "data": ("loader_workers",),
    "agent": ("device", "torch_threads", "checkpoint_every"),
}


def stage_key(cfg: Config, sections: tuple[str, ...], *parents: str) -> str:
    """Hash of the config sections a stage reads and the keys of the stages it reads from.

    Settings in :data:`NOT_IN_KEYS` are left out, so changing them reruns nothing.
    """
    data = cfg.model_dump(mode="json", include=set(sections))
    for section, keys in NOT_IN_KEYS.items():
        for key in keys:
            data.get(section, {}).pop(key, None)
    text = json.dumps([data, list(parents)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _stamp(folder: Path, state: str) -> Path:
    """The stamp file beside a stage folder (stages own their folders; stamps stay outside)."""
    return folder.with_name(f".{folder.name}.{state}.json")


def _stamped_key(path: Path) -> str | None:
    try:
        return str(read_json(path).get("key"))
    except (OSError, ValueError):
        return None


def is_done(folder: Path, key: str) -> bool:
    """Whether ``folder`` holds a finished stage with this key."""
    return _stamped_key(_stamp(folder, "done")) == key


def mark_done(folder: Path, key: str, stage: str, seconds: float) -> None:
    """Record that the stage in ``folder`` finished with ``key``."""
    atomic_write_json(_stamp(folder, "done"), {
        "stage": stage, "key": key, "seconds": round(seconds, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    _stamp(folder, "started").unlink(missing_ok=True)


def prepare(folder: Path, key: str) -> bool:
    """Get ``folder`` ready for a stage with ``key``; return ``True`` when it is already done.

    Output of the same key that was interrupted is left in place to resume. Output of another
    key (the config changed) is moved aside to ``NAME.previous``, replacing an older backup.
    """
    if is_done(folder, key):
        return True
    keys = {_stamped_key(_stamp(folder, "done")), _stamped_key(_stamp(folder, "started"))} - {None}
    if folder.exists() and (keys - {key} or (not keys and any(folder.iterdir()))):
        backup = folder.with_name(folder.name + ".previous")
        shutil.rmtree(backup, ignore_errors=True)
        folder.rename(backup)
        log.info("%s: settings changed, previous output moved to %s", folder.name, backup.name)
    _stamp(folder, "done").unlink(missing_ok=True)
    atomic_write_json(_stamp(folder, "started"), {"key": key})
    return False


def _run_stage(folder: Path, key: str, name: str, work: Callable[[], Any]) -> None:
    if prepare(folder, key):
        log.info("[pipeline] %s: up to date, skipped", name)
        return
    log.info("[pipeline] %s: running -> %s", name, folder)
    start = time.perf_counter()
    work()
    mark_done(folder, key, name, time.perf_counter() - start)


@dataclass(frozen=True)
class AgentJob:
    """One agent to train and evaluate (picklable, for worker processes and Ray tasks)."""

    config: dict[str, Any]
    out: str
    vae: str | None
    key: str
    eval_episodes: int
    threads: int


def agent_job(job: AgentJob) -> str:
    """Train (or resume) one agent and evaluate it; runs in a worker process or a Ray task."""
    import torch

    from agents import evaluate, train
    from worldmodel.config import validate_config
    from worldmodel.utils import setup_logging

    if job.threads > 0:
        torch.set_num_threads(job.threads)
    if not logging.getLogger().handlers:
        setup_logging(0)
    cfg = validate_config(job.config)
    folder = Path(job.out)
    if prepare(folder, job.key):
        return job.out
    start = time.perf_counter()
    vae = Path(job.vae) if job.vae else None
    train.run(cfg, folder, vae=vae, resume=(folder / "last.zip").exists())
    evaluate.run(folder, episodes=job.eval_episodes, video=False,
                 deterministic=cfg.agent.eval_deterministic, seed=None)
    mark_done(folder, job.key, "train-agent", time.perf_counter() - start)
    return job.out


def _agent_jobs(cfg: Config, out: Path, vae_dir: Path, vae_key: str) -> list[AgentJob]:
    jobs = []
    n_jobs = len(cfg.pipeline.obs_modes) * len(cfg.pipeline.seeds)
    parallel = max(1, min(cfg.pipeline.parallel, n_jobs))
    threads = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else 0
    for mode in cfg.pipeline.obs_modes:
        for seed in cfg.pipeline.seeds:
            run_cfg = agent_config(cfg, mode, seed)
            parents = [vae_key] if mode in USES_VAE_WEIGHTS else []
            sections = ("seed", "env", "agent") + (("vae",) if mode != "pixel" else ())
            key = stage_key(run_cfg, sections, *parents, str(cfg.pipeline.eval_episodes))
            jobs.append(AgentJob(
                config=run_cfg.model_dump(mode="json"),
                out=str(out / "agents" / f"{mode}__seed{seed}"),
                vae=str(vae_dir) if mode != "pixel" else None,
                key=key,
                eval_episodes=cfg.pipeline.eval_episodes,
                threads=threads,
            ))
    return jobs


def agent_config(cfg: Config, mode: ObsMode, seed: int) -> Config:
    """The config of one agent run of the pipeline: ``cfg`` with its obs mode and seed."""
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.agent.obs_mode = mode
    run_cfg.seed = seed
    return run_cfg


def _run_agents(cfg: Config, jobs: list[AgentJob]) -> None:
    pending = [j for j in jobs if not is_done(Path(j.out), j.key)]
    log.info("[pipeline] agents: %d to train, %d up to date",
             len(pending), len(jobs) - len(pending))
    if not pending:
        return
    if cfg.pipeline.backend == "ray":
        _run_agents_ray(cfg, pending)
    elif cfg.pipeline.parallel <= 1:
        for job in pending:
            agent_job(job)
    else:
        ctx = get_context("spawn")
        with ProcessPoolExecutor(max_workers=cfg.pipeline.parallel, mp_context=ctx) as pool:
            for done in pool.map(agent_job, pending):
                log.info("[pipeline] agent finished: %s", done)


def _run_agents_ray(cfg: Config, jobs: list[AgentJob]) -> None:
    try:
        import ray
    except ImportError as e:
        raise UserError('pipeline.backend=ray needs Ray: pip install "worldmodel[ray]"') from e
    if not ray.is_initialized():
        ray.init(address=cfg.collect.ray_address, include_dashboard=False)
    task = ray.remote(num_cpus=1)(agent_job)
    for done in ray.get([task.remote(job) for job in jobs]):
        log.info("[pipeline] agent finished: %s", done)


def run(cfg: Config, out: Path) -> Path:
    """Run (or resume) the whole pipeline into ``out``.

    :return: the path of the comparison's ``report.md``.
    """
    from agents import compare
    from worldmodel import collect, train_vae

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    start = time.perf_counter()

    data_dir, vae_dir = out / "data", out / "vae"
    data_key = stage_key(cfg, ("seed", "env", "collect"))
    _run_stage(data_dir, data_key, "collect", lambda: collect.run(cfg, data_dir))

    vae_key = stage_key(cfg, ("seed", "vae", "data"), data_key)
    _run_stage(vae_dir, vae_key, "train-vae", lambda: train_vae.run(
        cfg, data_dir, vae_dir, resume=(vae_dir / "last.pt").exists()))

    jobs = _agent_jobs(cfg, out, vae_dir, vae_key)
    _run_agents(cfg, jobs)

    report_dir = out / "report"
    report_key = stage_key(cfg, ("compare",), *(j.key for j in jobs))
    _run_stage(report_dir, report_key, "compare", lambda: compare.run(
        [Path(j.out) for j in jobs], report_dir, cfg.compare))

    if cfg.pipeline.visualize:
        _visualize(out, data_dir, vae_dir, vae_key)
    log.info("[pipeline] done in %.0f s", time.perf_counter() - start)
    return report_dir / "report.md"


def _visualize(out: Path, data_dir: Path, vae_dir: Path, vae_key: str) -> None:
    try:
        from worldmodel import visualize
    except ImportError:
        log.info("[pipeline] visualize: not available yet, skipped")
        return
    folder = out / "visualize"
    _run_stage(folder, vae_key, "visualize", lambda: visualize.run(vae_dir, data_dir, folder))
