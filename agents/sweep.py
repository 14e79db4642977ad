"""``worldmodel sweep-temperature``: agents trained in M's dream at several temperatures.

World Models' Doom table (Ha & Schmidhuber, 2018): an agent trained only inside M's dream at
temperature tau reaches one return in the dream and another in the real game; a cold dream is
easy to exploit (high dream return, low real return), a warmer one is harder to cheat in and
transfers better. For every ``(tau, seed)``, :func:`run`:

1. trains one ``dream`` agent in ``OUT/tau-{tau}/seed-{seed}`` with ``train-agent``'s entry point
   (:func:`agents.train.run`: ``agent.obs_mode=dream``, ``memory.temperature=tau``, ``seed``);
2. evaluates it in the real env as the pipeline does (:func:`agents.evaluate.run`,
   ``pipeline.eval_episodes`` episodes);

then writes a ``compare`` report in ``OUT/report`` (:mod:`agents.compare`): one group per tau
with its dream return and its real return, each with confidence intervals over the seeds.

Re-running the same command goes on where it stopped: finished runs (and their evaluations)
are skipped, interrupted ones resume from their checkpoint, a run whose budget
(``agent.timesteps``) grew is extended; a run made with other settings or inputs is refused.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents import compare, evaluate, train
from worldmodel.config import MAX_SEED, load_run_config
from worldmodel.errors import UserError
from worldmodel.io import read_json
from worldmodel.runfolder import read_kind, require_kind
from worldmodel.stages import resume_mismatches

if TYPE_CHECKING:
    from worldmodel.config import Config

log = logging.getLogger("worldmodel")

#: The observation mode every run of the sweep trains with.
MODE = "dream"


def run_dir(out: Path, tau: float, seed: int) -> Path:
    """The agent run of ``(tau, seed)``: ``OUT/tau-{tau}/seed-{seed}`` (e.g. ``tau-1.0``)."""
    return Path(out) / f"tau-{float(tau)}" / f"seed-{seed}"


def sweep_config(cfg: Config, tau: float, seed: int) -> Config:
    """``cfg`` for the run of ``(tau, seed)``: the ``dream`` mode at temperature ``tau``."""
    run_cfg = train.agent_config(cfg, MODE, seed)
    run_cfg.memory.temperature = float(tau)
    return run_cfg


def _check_taus(taus: Sequence[float]) -> list[float]:
    values = [float(t) for t in taus]
    if not values:
        raise UserError("--taus needs at least one temperature")
    bad = [t for t in values if not (math.isfinite(t) and t > 0)]
    if bad:
        raise UserError(f"--taus: temperatures must be > 0, got {bad[0]:g}")
    twice = sorted({t for t in values if values.count(t) > 1})
    if twice:
        raise UserError(f"--taus lists {twice[0]:g} twice")
    return values


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    values = list(seeds)
    if not values:
        raise UserError("--seeds needs at least one seed")
    bad = [s for s in values if isinstance(s, bool) or not isinstance(s, int)
           or not 0 <= s <= MAX_SEED]
    if bad:
        raise UserError(f"--seeds must be integers between 0 and {MAX_SEED}, got {bad[0]!r}")
    twice = sorted({s for s in values if values.count(s) > 1})
    if twice:
        raise UserError(f"--seeds lists {twice[0]} twice")
    return values


def _finished(path: Path, cfg: Config) -> bool:
    """The run is done and trained its whole budget (``agent.timesteps``)."""
    record, summary = path / "run.json", path / "summary.json"
    if not (record.is_file() and summary.is_file()):
        return False
    if read_json(record).get("status") != "done":
        return False
    return int(read_json(summary).get("timesteps", 0)) >= cfg.agent.timesteps


def _evaluated(path: Path, cfg: Config) -> bool:
    """``eval.json`` scores the trained agent with the episodes the sweep asks for."""
    file = path / evaluate.EVAL_FILE
    if not file.is_file():
        return False
    result, summary = read_json(file), read_json(path / "summary.json")
    return (result.get("timesteps") == summary.get("timesteps")
            and result.get("episodes") == cfg.pipeline.eval_episodes
            and result.get("deterministic") == cfg.agent.eval_deterministic)


def _refuse_other_runs(path: Path, cfg: Config, inputs: dict[str, Path]) -> None:
    """Refuse (one line) a run of ``path`` made with other output settings or input runs."""
    if not (path / "config.yaml").is_file():
        return
    changed = resume_mismatches(load_run_config(path), cfg, train.run_spec(cfg))
    for name, given in inputs.items():
        file = path / f"{name}.json"
        recorded = read_json(file).get("path") if file.is_file() else None
        if recorded and recorded != str(given.resolve()):
            changed.append(f"--{name}: {recorded} -> {given.resolve()}")
    if changed:
        raise UserError(f"{path} was made with other settings ({'; '.join(changed)}): pick "
                        "another -o, or delete it")


def run(cfg: Config, vae: Path, memory: Path, taus: Sequence[float], out: Path,
        seeds: Sequence[int] | None = None) -> Path:
    """Train, evaluate and compare one ``dream`` agent per temperature and seed.

    :param cfg: the resolved config (its ``agent.obs_mode``, ``memory.temperature`` and
        ``seed`` are set per run; ``pipeline.eval_episodes`` episodes score each agent).
    :param vae: the VAE run M was trained with (``--vae``).
    :param memory: the memory run M whose dream the agents train in (``--memory``).
    :param taus: the dream temperatures, each > 0.
    :param out: the sweep folder: ``tau-{tau}/seed-{seed}`` agent runs and ``report``.
    :param seeds: the seeds of each temperature (default ``pipeline.seeds``).
    :return: the report folder ``out/report`` (``report.md``, ``report.json``, plots).
    :raises UserError: a temperature <= 0, a bad seed, a wrong ``--vae``/``--memory``, an
        ``out`` that is a file or a run folder, or a run in it made with other settings;
        each before anything is written.
    """
    taus = _check_taus(taus)
    seeds = _check_seeds(cfg.pipeline.seeds if seeds is None else seeds)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out} is a file; pass a folder for the sweep")
    kind = read_kind(out)
    if kind is not None:
        article = "an" if kind[:1] in "aeiou" else "a"
        raise UserError(f"-o {out} holds {article} {kind} run; pick another folder for the sweep")
    inputs = {"vae": require_kind(Path(vae), "vae", "--vae"),
              "memory": require_kind(Path(memory), "memory", "--memory")}
    runs = [(run_dir(out, tau, seed), sweep_config(cfg, tau, seed))
            for tau in taus for seed in seeds]
    for path, run_cfg in runs:
        _refuse_other_runs(path, run_cfg, inputs)
    for k, (path, run_cfg) in enumerate(runs, start=1):
        what = (f"[{k}/{len(runs)}] tau {run_cfg.memory.temperature:g}, seed {run_cfg.seed}: "
                f"{path}")
        if _finished(path, run_cfg):
            log.info("%s: trained, skipped", what)
        else:
            log.info("%s: training in the dream", what)
            train.run(run_cfg, path, vae=inputs["vae"], memory=inputs["memory"], resume=None)
        if _evaluated(path, run_cfg):
            log.info("%s: evaluated, skipped", what)
        else:
            evaluate.run(path, episodes=run_cfg.pipeline.eval_episodes,
                         deterministic=run_cfg.agent.eval_deterministic)
    report = compare.run([path for path, _ in runs], out / "report", cfg.compare)
    for line in table(read_json(report / "report.json")):
        log.info("%s", line)
    return report


def _ci(values: Sequence[float]) -> str:
    return "{:.3f} [{:.3f}, {:.3f}]".format(*values)


def table(report: dict[str, Any]) -> list[str]:
    """The sweep's lines of a compare ``report.json``: per tau, dream and real return (IQM)."""
    lines = []
    for info in sorted(report["groups"].values(), key=lambda g: g.get("tau") or 0.0):
        if info.get("tau") is None:
            continue
        dream = info.get("dream_return")
        dream_text = _ci(dream["IQM"]) if dream else "?"
        lines.append(f"tau {info['tau']:g}: dream return {dream_text}, real return "
                     f"{_ci(info['IQM'])} (IQM [CI] over {len(info['runs'])} seeds)")
    return lines
