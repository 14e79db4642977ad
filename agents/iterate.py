"""``worldmodel iterate``: World Models' iterative training, for envs random data does not cover.

World Models (Ha & Schmidhuber, 2018, section 5) trains V and M on random rollouts, trains the
controller inside M's dream, and, when random play never reaches the interesting parts of the
env, repeats: collect more episodes with the current controller (plus exploration noise),
retrain M on everything collected so far, and train the controller in the new dream. Given the
first three steps (a dataset, a VAE run, a memory run and a ``dream`` agent run), each round
``k = 1 .. iterate.rounds`` of :func:`run` writes::

    OUT/round-{k}/data/     collect: iterate.episodes episodes with collect.policy=agent:<the
                            previous round's agent (round 1: --agent)> and collect.epsilon=
                            iterate.epsilon, seeded from (seed, k)
    OUT/round-{k}/memory/   train-memory on the initial dataset and every round's data so far
                            (memory settings of the config; a fresh M, not a fine-tuned one)
    OUT/round-{k}/agent/    train-agent in the dream of that M (agent.obs_mode=dream, the
                            config's agent settings), evaluated in the real env

and ``OUT/summary.json`` (rewritten atomically after every round), ``OUT/config.yaml`` and
``OUT/run.json`` (kind ``iterate``). The summary lists, per round (round 0 is the inputs):
``real_frames`` (the frames collected that round: the round dataset's), ``real_env_steps`` (the
cumulative real env steps of all the data M was trained on: initial dataset + rounds so far,
which is also the round agent's ``real_env_steps_collected``), M's held-out metrics
(``memory``), and the agent's real-env score (``agent``: its final evaluation's mean return,
its dream steps, and ``eval_env_steps``, the real env steps its evaluations played, which are
not training data). M's held-out episodes grow with the data (each dataset keeps its own split),
so its metrics of two rounds are measured on different episodes.

Rerunning the same command resumes: finished sub-runs are skipped, an interrupted one resumes
from its checkpoint (each stage's own rules), and ``--rounds`` larger than before adds rounds.
A rerun with other ``output`` settings or other inputs is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from worldmodel.config import Config, load_run_config, validate_config
from worldmodel.errors import UserError
from worldmodel.io import read_json, read_jsonl
from worldmodel.runfolder import RUN_FILE, RunFolder, check_kind, require_kind
from worldmodel.stages import StageSpec, resume_mismatches

log = logging.getLogger("worldmodel")

#: What ``iterate`` reads: everything its sub-stages read, but the ``collect`` keys each round
#: sets itself (``iterate.episodes``, ``iterate.epsilon``, the previous agent).
STAGE = StageSpec(
    "iterate", "iterate",
    reads=("seed", "env", "collect", "data", "memory", "agent", "iterate"),
    ignores=("collect.episodes", "collect.frames", "collect.policy", "collect.epsilon"),
)
#: The obs mode of every round's agent.
DREAM = "dream"


def round_seed(seed: int, k: int) -> int:
    """The collection seed of round ``k`` (a fresh stream of env and policy seeds per round).

    Example:
        >>> round_seed(0, 1) != round_seed(0, 2) and 0 <= round_seed(0, 1) < 2**31
        True
    """
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0]) >> 1


def collect_config(cfg: Config, k: int, previous_agent: Path) -> Config:
    """The config of round ``k``'s collection: the previous agent, with exploration noise."""
    data = cfg.model_dump(mode="json")
    data["seed"] = round_seed(cfg.seed, k)
    data["collect"].update(episodes=cfg.iterate.episodes, frames=None,
                           policy=f"agent:{Path(previous_agent).resolve()}",
                           epsilon=cfg.iterate.epsilon)
    return validate_config(data)


def agent_config(cfg: Config) -> Config:
    """The config of every round's agent: ``cfg`` with ``agent.obs_mode=dream``."""
    data = cfg.model_dump(mode="json")
    data["agent"]["obs_mode"] = DREAM
    return validate_config(data)


def finished(run: Path) -> bool:
    """Whether ``run`` holds a finished run (``run.json`` status ``done``)."""
    record = Path(run) / RUN_FILE
    return record.is_file() and read_json(record).get("status") == "done"


def _memory_metrics(memory: Path) -> dict[str, Any]:
    s = read_json(memory / "summary.json")
    return {"run": str(memory), "val_nll": s.get("val_nll"),
            "open_loop_mse": s.get("open_loop_mse"), "reward_r2": s.get("reward_r2"),
            "done": s.get("done"), "val_episodes": s.get("inputs", {}).get("val_episodes"),
            "steps": s.get("steps")}


def _agent_score(agent: Path) -> dict[str, Any]:
    s = read_json(agent / "summary.json")
    final = s.get("final_eval") or {}
    evaluations = read_jsonl(agent / "evaluations.jsonl")
    return {"run": str(agent), "obs_mode": s.get("obs_mode"),
            "mean_return": final.get("mean_return"), "std_return": final.get("std_return"),
            "episodes": final.get("episodes"), "timesteps": s.get("timesteps"),
            "dream_env_steps": s.get("dream_env_steps"),
            "real_env_steps_collected": s.get("real_env_steps_collected"),
            "eval_env_steps": int(sum(sum(r.get("lengths", [])) for r in evaluations))}


def _check_rerun(out: Path, cfg: Config, inputs: dict[str, str]) -> None:
    """Refuse a rerun of ``out`` with other ``output`` settings or other inputs."""
    if (out / "config.yaml").is_file():
        changed = resume_mismatches(load_run_config(out), cfg, STAGE)
        if changed:
            raise UserError(f"cannot continue {out}: these settings differ from its "
                            f"config.yaml: {'; '.join(changed)}; restore them (--config "
                            f"{out}/config.yaml) or pick another --out")
    summary = out / "summary.json"
    old = read_json(summary).get("inputs") if summary.is_file() else None
    if old is not None and old != inputs:
        diff = "; ".join(f"--{k} {old.get(k)} -> {v}" for k, v in inputs.items()
                         if old.get(k) != v)
        raise UserError(f"cannot continue {out}: it was started on other inputs ({diff}); "
                        "pass the ones it started with, or pick another --out")


def run(cfg: Config, data: Path, vae: Path, memory: Path, agent: Path, out: Path,
        rounds: int | None = None) -> Path:
    """Run ``rounds`` rounds of collect -> train-memory -> dream agent (module docstring).

    :param cfg: the config (``iterate``, and the settings of collect, M and the agent).
    :param data: the initial dataset (e.g. random-policy episodes), M's first data.
    :param vae: the VAE run that encodes every round's data.
    :param memory: the memory run trained on ``data`` (round 0 of the summary).
    :param agent: the agent run that collects round 1's episodes (trained in ``memory``'s dream).
    :param out: the iterate folder (rerun the same command to resume it).
    :param rounds: rounds to run (``None``: ``iterate.rounds``).
    :return: ``out``.
    """
    from agents import train
    from agents.policy import make_policy
    from worldmodel import collect, train_memory
    from worldmodel.dataset import open_dataset

    data, vae, memory, agent, out = map(Path, (data, vae, memory, agent, out))
    if rounds is not None:
        if rounds < 1:
            raise UserError(f"--rounds must be >= 1, got {rounds}")
        cfg = cfg.model_copy(deep=True)
        cfg.iterate.rounds = rounds
    require_kind(vae, "vae", "--vae")
    require_kind(memory, "memory", "--memory")
    require_kind(agent, "agent", "--agent")
    if not (agent / "last.zip").is_file():
        raise UserError(f"--agent {agent} has no last.zip; pass a trained agent run")
    if not (memory / "summary.json").is_file():
        raise UserError(f"--memory {memory} has no summary.json; pass a finished memory run")
    agent_cfg = agent_config(cfg)
    if cfg.agent.obs_mode != DREAM:
        log.info("iterate: each round's agent trains in the dream (agent.obs_mode=%s, not %s)",
                 DREAM, cfg.agent.obs_mode)
    inputs = {k: str(p.resolve()) for k, p in
              (("data", data), ("vae", vae), ("memory", memory), ("agent", agent))}
    initial_frames = int(open_dataset(data).num_frames)
    trained_on = read_json(memory / "summary.json").get("inputs", {}).get("dataset")
    if trained_on and "://" not in str(trained_on) and Path(trained_on).resolve() != data.resolve():
        log.warning("iterate: --memory %s was trained on %s, not on --data %s: round 0 of the "
                    "summary counts the frames of --data", memory, trained_on, data)
    check_kind(out, STAGE.kind)
    _check_rerun(out, cfg, inputs)  # (before the folder is marked running again)
    with RunFolder.open(out, STAGE.kind) as folder:
        folder.save_config(cfg)
        rows: list[dict[str, Any]] = [{
            "round": 0, "data": inputs["data"], "real_frames": initial_frames,
            "real_env_steps": initial_frames, "memory": _memory_metrics(memory),
            "agent": _agent_score(agent),
        }]

        def save() -> None:
            folder.save_summary({
                "inputs": inputs, "rounds_requested": cfg.iterate.rounds,
                "rounds_done": len(rows) - 1, "episodes_per_round": cfg.iterate.episodes,
                "epsilon": cfg.iterate.epsilon, "real_env_steps": rows[-1]["real_env_steps"],
                "rounds": rows,
            })

        save()
        datasets, previous = [data], agent
        for k in range(1, cfg.iterate.rounds + 1):
            here = out / f"round-{k}"
            log.info("iterate: round %d of %d -> %s", k, cfg.iterate.rounds, here)
            round_data = here / "data"
            if not finished(here / "memory"):  # (M finished: its data was complete)
                collect.run(collect_config(cfg, k, previous), round_data,
                            make_policy=make_policy)
            datasets.append(round_data)
            if not finished(here / "memory"):
                train_memory.run(cfg, datasets, vae, here / "memory", resume=None)
            if not finished(here / "agent"):
                train.run(agent_cfg, here / "agent", vae=vae, memory=here / "memory",
                          resume=None)
            frames = int(open_dataset(round_data).num_frames)
            rows.append({"round": k, "data": str(round_data), "real_frames": frames,
                         "real_env_steps": rows[-1]["real_env_steps"] + frames,
                         "memory": _memory_metrics(here / "memory"),
                         "agent": _agent_score(here / "agent")})
            save()
            a = rows[-1]["agent"]
            log.info("iterate: round %d: %d real frames (%d in all), real-env mean return %s",
                     k, frames, rows[-1]["real_env_steps"], a["mean_return"])
            previous = here / "agent"
        folder.finish()
    return out
