"""``worldmodel pipeline``: every stage of :data:`REGISTRY`, in order, into one folder.

Each stage writes its own sub-folder of the pipeline folder (its ``StageSpec.folder``)::

    OUT/config.yaml                  the resolved pipeline config
    OUT/data/                        collect
    OUT/vae/                         train-vae
    OUT/memory/                      train-memory, when an arm observes M (``latent-memory``...)
    OUT/agents/{obs_mode}__seed{s}/  train-agent (one run per arm and seed), then evaluate
    OUT/report/                      compare (report.md, report.json, plots)
    OUT/visualize/                   visualize (the VAE's pictures), when pipeline.visualize

The pipeline knows no stage by name: it iterates :data:`REGISTRY` and reads each
:class:`~worldmodel.stages.StageSpec` (what it reads, which stages it needs, how many runs it
has, whether they run in parallel). Adding a stage is one module with its ``STAGE``, one entry
here and one config section (``docs/architecture.md``).

Caching: a run's key (:func:`~worldmodel.stages.stage_key`) hashes the ``output`` and
``budget`` settings its stage reads and the keys of the runs it reads. A finished run gets a
stamp ``.FOLDER.STAGE.done.json`` beside its folder; re-running skips it while the key is
unchanged. When only budgets grew (more steps, more episodes) the run is resumed and extended;
any other change reruns it and, through the chained keys, every run after it (the stale output
is kept once as ``FOLDER.previous``). A run that was interrupted has only
``.FOLDER.STAGE.started.json`` and resumes from its checkpoints. Worker processes die with the
pipeline's main process (and every run folder is locked by the stage writing it), so a pipeline
killed at any moment can be started again at once with the same command.

This module sits on top with the CLI: it is the only core module that calls into ``agents``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from agents import compare, evaluate, train
from agents.modes import check_modes
from worldmodel import collect, train_memory, train_vae, visualize
from worldmodel.config import Config, validate_config
from worldmodel.errors import UserError
from worldmodel.io import atomic_write_json, read_json
from worldmodel.runfolder import RunFolder
from worldmodel.stages import StageSpec, budget_grew, config_values, settings, stage_key

log = logging.getLogger(__name__)

#: The stages of the pipeline, in the order they run (each one's ``needs`` come before it).
REGISTRY: tuple[StageSpec, ...] = (
    collect.STAGE,
    train_vae.STAGE,
    train_memory.STAGE,
    train.STAGE,
    evaluate.STAGE,
    compare.STAGE,
    visualize.STAGE,
)


def get_stage(name: str) -> StageSpec:
    """The registered stage called ``name``."""
    for spec in REGISTRY:
        if spec.name == name:
            return spec
    raise KeyError(name)


@dataclass(frozen=True)
class PlannedRun:
    """One run of one stage in a pipeline (picklable, for worker processes and Ray tasks).

    :param stage: the stage's name.
    :param folder: the run folder, relative to the pipeline folder.
    :param config: the run's config (``model_dump`` of a :class:`Config`).
    :param inputs: for each stage it needs, the run folder(s) it reads (relative).
    :param key: its cache key.
    :param budget: its ``budget`` settings (a change that only grows them resumes the run).
    :param output_key: the key without the budget settings.
    :param owner: it owns its folder (``False`` for a ``per_run`` stage writing into another's).
    """

    stage: str
    folder: str
    config: dict[str, Any]
    inputs: dict[str, list[str]]
    key: str
    budget: dict[str, Any]
    output_key: str
    owner: bool = True


def plan(cfg: Config) -> list[PlannedRun]:
    """Every run of every registered stage for ``cfg``, in order, with its inputs and key."""
    runs: dict[str, list[PlannedRun]] = {}
    on = [spec for spec in REGISTRY if _switched_on(cfg, spec)]
    for spec in on:
        if spec.on_demand and not _demanded(cfg, spec.name, on):
            continue
        runs[spec.name] = _plan_stage(cfg, spec, runs)
    return [r for stage_runs in runs.values() for r in stage_runs]


def _switched_on(cfg: Config, spec: StageSpec) -> bool:
    return spec.switch is None or bool(config_values(cfg, [spec.switch])[spec.switch])


def _demanded(cfg: Config, name: str, specs: list[StageSpec]) -> bool:
    """Whether a run of one of ``specs`` reads the stage ``name`` (for ``on_demand`` stages)."""
    for spec in specs:
        if spec.variants is not None:
            if any(name in v.needs for v in spec.variants(cfg)):
                return True
        elif name in spec.needs:
            return True
    return False


def _plan_stage(
    cfg: Config, spec: StageSpec, done: dict[str, list[PlannedRun]]
) -> list[PlannedRun]:
    if spec.per_run:  # one run per run of the first stage it needs, in that run's folder
        first = spec.needs[0]
        return [_planned(spec, r.folder, validate_config(r.config), {first: [r]}, (first,),
                         owner=False) for r in done[first]]
    if spec.variants is None:
        inputs = {n: done[n] for n in spec.needs}
        return [_planned(spec, spec.folder, cfg, inputs, spec.needs)]
    out = []
    for v in spec.variants(cfg):
        inputs = {n: done[n] for n in v.needs}
        out.append(_planned(spec, f"{spec.folder}/{v.name}", v.config, inputs, v.keyed_on,
                            extra=config_values(v.config, v.reads_from)))
    return out


def _planned(spec: StageSpec, folder: str, cfg: Config, inputs: dict[str, list[PlannedRun]],
             keyed_on: tuple[str, ...], owner: bool = True,
             extra: dict[str, Any] | None = None) -> PlannedRun:
    parents = [r.key for name in keyed_on for r in inputs.get(name, [])]
    if extra:
        parents.append(json.dumps(extra, sort_keys=True))
    output = json.dumps([spec.name, settings(cfg, spec, "output"), parents], sort_keys=True)
    return PlannedRun(
        stage=spec.name, folder=folder, config=cfg.model_dump(mode="json"),
        inputs={name: [r.folder for r in rs] for name, rs in inputs.items()},
        key=stage_key(cfg, spec, *parents), budget=settings(cfg, spec, "budget"),
        output_key=hashlib.sha256(output.encode()).hexdigest()[:16], owner=owner,
    )


# --------------------------------------------------------------------------------------------
# Stamps beside each run folder


def _stamp(root: Path, run: PlannedRun, state: str) -> Path:
    folder = root / run.folder
    return folder.with_name(f".{folder.name}.{run.stage}.{state}.json")


def _read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_done(root: Path, run: PlannedRun) -> bool:
    """Whether ``run`` finished with its current key."""
    stamp = _read_stamp(_stamp(root, run, "done"))
    return stamp is not None and stamp.get("key") == run.key


def prepare(root: Path, run: PlannedRun) -> bool:
    """Get the run's folder ready; ``True`` when the run is already done.

    Output of the same key that was interrupted is left in place to resume; so is output whose
    settings differ only by grown budgets (the run is extended). Output of other settings is
    moved aside to ``FOLDER.previous`` (replacing an older backup) when the run owns its folder.
    """
    if is_done(root, run):
        return True
    folder = root / run.folder
    before = _read_stamp(_stamp(root, run, "done")) or _read_stamp(_stamp(root, run, "started"))
    same = before is not None and (before.get("key") == run.key or (
        before.get("output_key") == run.output_key
        and budget_grew(before.get("budget", {}), run.budget)))
    if run.owner and folder.exists() and not same and any(folder.iterdir()):
        backup = folder.with_name(folder.name + ".previous")
        shutil.rmtree(backup, ignore_errors=True)
        folder.rename(backup)
        log.info("%s: settings changed, previous output moved to %s", run.folder, backup.name)
    _stamp(root, run, "done").unlink(missing_ok=True)
    atomic_write_json(_stamp(root, run, "started"), {
        "stage": run.stage, "key": run.key, "output_key": run.output_key, "budget": run.budget,
    })
    return False


def _fanned(spec: StageSpec) -> bool:
    """Whether a stage has several runs in a pipeline (its readers get a list of folders)."""
    return spec.variants is not None or spec.per_run


def execute(root: str, run: PlannedRun) -> str:
    """Run one planned run (in this process, a worker process or a Ray task) and stamp it."""
    base = Path(root)
    spec = get_stage(run.stage)
    label = run.stage if run.folder == spec.folder else f"{run.stage} {run.folder}"
    if prepare(base, run):
        log.info("[pipeline] %s: up to date, skipped", label)
        return run.folder
    log.info("[pipeline] %s: running -> %s", label, base / run.folder)
    assert spec.run is not None
    inputs: dict[str, Any] = {  # a list from a stage of several runs, else one folder
        name: [base / f for f in folders] if _fanned(get_stage(name)) else base / folders[0]
        for name, folders in run.inputs.items()
    }
    start = time.perf_counter()
    spec.run(validate_config(run.config), base / run.folder, inputs, None)
    atomic_write_json(_stamp(base, run, "done"), {
        "stage": run.stage, "key": run.key, "output_key": run.output_key, "budget": run.budget,
        "seconds": round(time.perf_counter() - start, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    _stamp(base, run, "started").unlink(missing_ok=True)
    return run.folder


# --------------------------------------------------------------------------------------------
# Parallel runs: worker processes that die with the pipeline, or Ray tasks


def _worker_init(parent_pid: int, threads: int, level: int) -> None:
    """Set up a worker: it dies with the pipeline's main process and uses its log level.

    :param threads: torch intra-op threads.
    :param level: the main process's ``worldmodel`` log level (``-q``/``-v``).
    """
    import torch

    from worldmodel.collect.worker import die_with_parent
    from worldmodel.utils import setup_logging

    die_with_parent(parent_pid)

    def watch() -> None:  # where the kernel cannot do it (not Linux), look every second
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()
    if threads > 0:
        torch.set_num_threads(threads)
    setup_logging({logging.WARNING: -1, logging.INFO: 0}.get(level, 1))


def _run_parallel(cfg: Config, root: Path, runs: list[PlannedRun]) -> None:
    pending = [r for r in runs if not is_done(root, r)]
    log.info("[pipeline] %s: %d to run, %d up to date", runs[0].stage, len(pending),
             len(runs) - len(pending))
    if not pending:
        return
    if cfg.pipeline.backend == "ray":
        _run_ray(cfg, root, pending)
        return
    parallel = max(1, min(cfg.pipeline.parallel, len(pending)))
    if parallel == 1:
        for run in pending:
            execute(str(root), run)
        return
    threads = max(1, (os.cpu_count() or 1) // parallel)
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=parallel, mp_context=ctx, initializer=_worker_init,
                             initargs=(os.getpid(), threads,
                                       logging.getLogger("worldmodel").getEffectiveLevel()),
                             ) as pool:
        futures = [pool.submit(execute, str(root), r) for r in pending]
        for future in as_completed(futures):
            log.info("[pipeline] finished: %s", future.result())


def _run_ray(cfg: Config, root: Path, runs: list[PlannedRun]) -> None:
    try:
        import ray
    except ImportError as e:
        raise UserError('pipeline.backend=ray needs Ray: pip install "worldmodel[ray]"') from e
    if not ray.is_initialized():
        ray.init(address=cfg.collect.ray_address, include_dashboard=False)
    task = ray.remote(num_cpus=1)(execute)
    for done in ray.get([task.remote(str(root), r) for r in runs]):
        log.info("[pipeline] finished: %s", done)


def run(cfg: Config, out: Path) -> Path:
    """Run (or resume) every stage of :data:`REGISTRY` into ``out``.

    :return: the path of the comparison's ``report.md``.
    :raise UserError: an unknown observation mode, ``out`` holding another kind of run, or
        another pipeline writing ``out``.
    """
    check_modes(cfg)
    out = Path(out)
    start = time.perf_counter()
    with RunFolder.open(out, "pipeline", resume=None) as folder:
        folder.save_config(cfg)
        runs = plan(cfg)
        for spec in REGISTRY:
            stage_runs = [r for r in runs if r.stage == spec.name]
            if not stage_runs:
                log.info("[pipeline] %s: off", spec.name)
            elif spec.parallel:
                _run_parallel(cfg, out, stage_runs)
            else:
                for r in stage_runs:
                    execute(str(out), r)
        folder.finish()
    log.info("[pipeline] done in %.0f s", time.perf_counter() - start)
    return out / compare.STAGE.folder / "report.md"
