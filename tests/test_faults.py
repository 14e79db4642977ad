"""Faults injected: ``kill -9`` a stage at seeded random moments, then run the same command again.

Each test draws its kill moments from ``random.Random(SEED + k)``: a delay after the start, or a
point of progress the run folder shows (episodes committed, records in ``metrics.jsonl`` or
``evaluations.jsonl``, a pipeline stage's folder) plus a small random delay. Every assertion
message lists the drawn moments and what each session did (killed when, showing what), so that
a failure can be replayed.

What is asserted is the exact outcome the run-folder contract (docs/architecture.md) promises:

* ``collect``: exactly the requested episodes, ``data verify`` passes, and each episode equals
  the one an uninterrupted collection with the same config stores (frames, actions, rewards...).
* ``train-vae``: the final step count, each logged step once per key in ``metrics.jsonl`` and
  in TensorBoard, and the weights of an uninterrupted run (exact resume).
* ``train-agent``: the final step count, each evaluation once in ``evaluations.jsonl`` and in
  TensorBoard (the same steps), status ``done``.
* ``pipeline``: the report, every agent's ``eval.json``, the done stamps, and no process of a
  killed session left behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc"),
]

#: The seed of the kill moments (``WORLDMODEL_FAULTS_SEED`` replays or explores other ones).
SEED = int(os.environ.get("WORLDMODEL_FAULTS_SEED", "20261201"))
ENV = {**os.environ, "SDL_VIDEODRIVER": "dummy"}
#: Seconds a killed session's processes may take to die.
ORPHAN_GRACE = 15.0


# --------------------------------------------------------------------------------------------
# Processes


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, start time, state) of every process (from /proc/*/stat)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[19]), fields[0])
        except (OSError, IndexError, ValueError):
            continue
    return table


def _descendants(pid: int) -> set[tuple[int, int]]:
    """(pid, start time) of every process below ``pid``."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for p, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(p)
    out, todo = set(), list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.add((p, table[p][1]))
        todo += children.get(p, [])
    return out


def _alive(procs: set[tuple[int, int]]) -> list[int]:
    """The pids of ``procs`` still running (the same process: same start time; not a zombie)."""
    table = _proc_table()
    return sorted(p for p, start in procs
                  if p in table and table[p][1] == start and table[p][2] != "Z")


# --------------------------------------------------------------------------------------------
# Kill moments and sessions


@dataclass
class Moment:
    """When to kill: once the condition holds, after ``delay`` more seconds.

    ``arm()`` is called as the session starts and returns the condition, so that a condition
    can count what this session adds (:func:`new_lines`), not what an earlier one left.
    """

    what: str
    arm: Callable[[], Callable[[], bool]]
    delay: float

    def __str__(self) -> str:
        return f"{self.what} +{self.delay:.3f}s"


def always() -> Callable[[], bool]:
    return lambda: True


def when(condition: Callable[[], bool]) -> Callable[[], Callable[[], bool]]:
    return lambda: condition


def _line_set(folder: Path, pattern: str) -> set[str]:
    lines: set[str] = set()
    for f in folder.glob(pattern):
        try:
            lines |= {line for line in f.read_text().splitlines() if line.strip()}
        except OSError:
            continue
    return lines


def new_lines(folder: Path, pattern: str, n: int) -> Callable[[], Callable[[], bool]]:
    """Armed: ``n`` lines that were not there when the session started (in files ``pattern``).

    Every line is unique (an episode id, a time stamp), so a line rewritten by a resume (the
    index or log trimmed to the checkpoint) is not counted again.
    """

    def arm() -> Callable[[], bool]:
        before = _line_set(folder, pattern)
        return lambda: len(_line_set(folder, pattern) - before) >= n

    return arm


@dataclass
class Session:
    """One run of a command: killed at its moment, or finished before it."""

    moment: str
    killed: bool = False
    rc: int | None = None
    at: float = 0.0  # seconds after the start
    state: str = ""  # what the folder showed when the kill came
    tree: set[tuple[int, int]] = field(default_factory=set)  # processes below it, ever seen
    stderr: str = ""
    survivors: list[int] = field(default_factory=list)  # set by watch_orphans

    def __str__(self) -> str:
        if self.killed:
            return f"[{self.moment}: killed at {self.at:.2f}s, {self.state}]"
        return f"[{self.moment}: finished (rc {self.rc}) at {self.at:.2f}s before the kill]"


def _stage_cmd(stage: str, sets: Sequence[str], *args: str) -> list[str]:
    cmd = [sys.executable, "-m", "worldmodel", stage, *args]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def run_until(cmd: list[str], moment: Moment, log: Path, state: Callable[[], str],
              timeout: float = 240) -> Session:
    """Start ``cmd``; ``kill -9`` its main process at ``moment`` (unless it finished first)."""
    session = Session(str(moment))
    ready = moment.arm()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        start = time.monotonic()
        try:
            polls = 0
            while not ready() and proc.poll() is None:
                assert time.monotonic() - start < timeout, f"{moment}: never came in {timeout}s"
                if polls % 5 == 0:
                    session.tree |= _descendants(proc.pid)
                polls += 1
                time.sleep(0.01)
            end = time.monotonic() + moment.delay
            while time.monotonic() < end and proc.poll() is None:
                session.tree |= _descendants(proc.pid)
                time.sleep(min(0.01, max(0.0, end - time.monotonic())))
            if proc.poll() is None:
                session.tree |= _descendants(proc.pid)
                proc.send_signal(signal.SIGKILL)
                session.killed = True
                session.state = state()
            session.at = time.monotonic() - start
            session.rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    session.stderr = log.read_text()[-2000:]
    return session


def watch_orphans(session: Session) -> threading.Thread:
    """In the background: wait up to :data:`ORPHAN_GRACE` s for the session's processes to die."""

    def watch() -> None:
        deadline = time.monotonic() + ORPHAN_GRACE
        while (alive := _alive(session.tree)) and time.monotonic() < deadline:
            time.sleep(0.1)
        session.survivors = alive

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def _lines(*files: Path) -> int:
    total = 0
    for f in files:
        try:
            total += sum(1 for line in f.read_text().splitlines() if line.strip())
        except OSError:
            continue
    return total


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tb_steps(folder: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return []
    return [e.step for e in events.Scalars(tag)]


def _history(moments: Sequence[object], sessions: Sequence[Session]) -> str:
    return (f"seed {SEED}; drawn kill moments: {[str(m) for m in moments]}; sessions: "
            + " ".join(str(s) for s in sessions))


# --------------------------------------------------------------------------------------------
# collect

COLLECT = ["collect.episodes=12", "env.max_episode_steps=40", "collect.workers=2",
           "collect.commit_seconds=0", "env.image_size=16"]


def _committed(data: Path) -> int:
    return _lines(*(data / "shards").glob("*.episodes.jsonl"))


def test_collect_killed_at_random_moments_resumes_to_the_same_dataset(tmp_path: Path) -> None:
    from worldmodel.dataset import open_dataset

    rng = random.Random(SEED + 1)
    data = tmp_path / "data"
    cmd = _stage_cmd("collect", COLLECT, "--out", str(data))
    # a delay after the start (start-up or the first episodes), then twice: k episodes
    # committed by the session (k in 1..4), plus a delay
    moments = [Moment("the start", always, rng.uniform(0.3, 1.6))]
    for _ in range(2):
        k = rng.randint(1, 4)
        moments.append(Moment(f"{k} new episodes committed",
                              new_lines(data / "shards", "*.episodes.jsonl", k),
                              rng.uniform(0.0, 0.05)))

    def state() -> str:
        return f"{_committed(data)} episodes committed"

    sessions: list[Session] = []
    for i, moment in enumerate(moments):
        session = run_until(cmd, moment, tmp_path / f"collect{i}.log", state)
        sessions.append(session)
        watch_orphans(session).join()
        history = _history(moments, sessions)
        assert not session.survivors, f"processes {session.survivors} outlived the kill; {history}"
        if not session.killed:
            assert session.rc == 0, f"{history}\n{session.stderr}"
            break
    history = _history(moments, sessions)
    print(history)
    final = run(cmd, timeout=180)
    assert final.returncode == 0, f"{history}\n{final.stderr[-3000:]}"

    verify = run([sys.executable, "-m", "worldmodel", "data", "verify", str(data)], timeout=120)
    assert verify.returncode == 0, f"{history}\n{verify.stdout[-2000:]}{verify.stderr[-2000:]}"
    reader = open_dataset(data)
    assert reader.episode_ids == list(range(12)), f"episodes {reader.episode_ids}; {history}"

    ref_path = tmp_path / "reference"
    ref = run(_stage_cmd("collect", COLLECT, "--out", str(ref_path)), timeout=180)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = open_dataset(ref_path)
    assert reference.episode_ids == list(range(12))
    for i in range(12):
        ours, theirs = reader.episode(i).arrays(), reference.episode(i).arrays()
        assert set(ours) == set(theirs), f"episode {i}: fields differ; {history}"
        for name in ours:
            assert ours[name].dtype == theirs[name].dtype and (
                ours[name].tobytes() == theirs[name].tobytes()
            ), f"episode {i}: {name} differs from an uninterrupted collection; {history}"


# --------------------------------------------------------------------------------------------
# train-vae

VAE = ["env.image_size=16", "vae.widths=[8, 16]", "vae.latent_dim=4", "vae.steps=40",
       "vae.val_every=10", "vae.log_every=5", "vae.val_frames=64", "vae.probe_frames=64"]
TRAIN_STEPS = list(range(5, 41, 5))  # vae/loss: every log_every steps
VAL_STEPS = [10, 20, 30, 40]  # val/loss: every val_every steps
RECORDS = len(TRAIN_STEPS) + len(VAL_STEPS)  # lines of a complete metrics.jsonl


def _vae_state(out: Path) -> Callable[[], str]:
    def state() -> str:
        records = _jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
        last = None
        if (out / "last.pt").exists():
            from worldmodel.vae import load_checkpoint

            try:
                last = load_checkpoint(out / "last.pt")["step"]
            except Exception as e:  # shown in the message only
                last = f"unreadable ({type(e).__name__})"
        steps = [r["step"] for r in records]
        return (f"metrics.jsonl steps {steps}, last.pt step {last}, "
                f"summary.json {(out / 'summary.json').exists()}")
    return state


def _per_key_steps(records: list[dict[str, Any]]) -> dict[str, list[int]]:
    steps: dict[str, list[int]] = {}
    for record in records:
        for key in record:
            if key not in ("step", "time"):
                steps.setdefault(key, []).append(record["step"])
    return steps


def test_train_vae_killed_at_random_moments_resumes_exactly(
    tmp_path: Path, reach16: Path
) -> None:
    import torch

    from worldmodel.vae import load_checkpoint

    rng = random.Random(SEED + 2)
    out = tmp_path / "vae"
    cmd = _stage_cmd("train-vae", VAE, "--out", str(out), "--data", str(reach16))
    # k records logged by the session (k in 1..5 of the RECORDS of a run: a training log line
    # every 5 steps, a validation every 10, then last.pt, summary.json, run.json), plus a delay
    moments = []
    for _ in range(4):
        k = rng.randint(1, 5)
        moments.append(Moment(f"{k} new metrics.jsonl records",
                              new_lines(out, "metrics.jsonl", k), rng.uniform(0.0, 0.04)))
    sessions: list[Session] = []
    for i, moment in enumerate(moments):
        session = run_until(cmd, moment, tmp_path / f"vae{i}.log", _vae_state(out))
        sessions.append(session)
        if not session.killed:
            assert session.rc == 0, f"{_history(moments, sessions)}\n{session.stderr}"
            break
    history = _history(moments, sessions)
    print(history)
    # the last session with --resume (the same command continues too: sessions 2 and 3)
    final = run([*cmd, "--resume"], timeout=180)
    assert final.returncode == 0, f"{history}\n{final.stderr[-3000:]}"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40, f"summary steps {summary['steps']}; {history}"
    assert json.loads((out / "run.json").read_text())["status"] == "done", history
    per_key = _per_key_steps(_jsonl(out / "metrics.jsonl"))
    twice = {k: v for k, v in per_key.items() if len(v) != len(set(v))}
    assert not twice, f"metrics.jsonl has steps twice: {twice}; {history}"
    assert per_key["vae/loss"] == TRAIN_STEPS, f"vae/loss steps {per_key['vae/loss']}; {history}"
    assert per_key["val/loss"] == VAL_STEPS, f"val/loss steps {per_key['val/loss']}; {history}"
    tb = {tag: _tb_steps(out, tag) for tag in ("vae/loss", "val/loss")}
    assert tb == {"vae/loss": TRAIN_STEPS, "val/loss": VAL_STEPS}, (
        f"TensorBoard steps {tb}, want each of {TRAIN_STEPS} / {VAL_STEPS} once; {history}")

    ref = tmp_path / "reference"
    done = run(_stage_cmd("train-vae", VAE, "--out", str(ref), "--data", str(reach16)))
    assert done.returncode == 0, done.stderr[-3000:]
    ours, theirs = load_checkpoint(out / "last.pt"), load_checkpoint(ref / "last.pt")
    assert ours["step"] == theirs["step"] == 40
    differ = [k for k in theirs["model"] if not torch.equal(ours["model"][k], theirs["model"][k])]
    assert not differ, f"weights {differ} differ from an uninterrupted run's; {history}"
    losses, ref_losses = ({r["step"]: r["vae/loss"] for r in _jsonl(folder / "metrics.jsonl")
                           if "vae/loss" in r} for folder in (out, ref))
    assert losses == ref_losses, f"training losses differ from an uninterrupted run's; {history}"


# --------------------------------------------------------------------------------------------
# train-agent

AGENT = ["env.image_size=36", "agent.obs_mode=pixel", "agent.timesteps=768",
         "agent.eval_every=128", "agent.eval_episodes=1", "env.max_episode_steps=20",
         "env.n_envs=2", "agent.hyperparams={n_steps: 64, batch_size: 64, n_epochs: 1}",
         "agent.checkpoint_every=256"]
EVAL_STEPS = list(range(128, 769, 128))


def test_train_agent_killed_at_random_moments_restarts_with_the_same_command(
    tmp_path: Path
) -> None:
    rng = random.Random(SEED + 3)
    out = tmp_path / "agent"
    cmd = _stage_cmd("train-agent", AGENT, "--out", str(out))
    evals = out / "evaluations.jsonl"
    # k evaluations written by the session (every 128 steps; last.zip every 256), plus a delay
    # that spreads the kill over the writes after it (best_model.zip, last.zip, train_state.json)
    moments = []
    for _ in range(4):
        k = rng.randint(1, 3)
        moments.append(Moment(f"{k} new evaluations", new_lines(out, "evaluations.jsonl", k),
                              rng.uniform(0.0, 0.06)))

    def state() -> str:
        steps = [r["timesteps"] for r in _jsonl(evals)] if evals.exists() else []
        ckpt = None
        if (out / "train_state.json").exists():
            ckpt = json.loads((out / "train_state.json").read_text())["timesteps"]
        return (f"evaluations {steps}, last.zip {(out / 'last.zip').exists()}, "
                f"train_state.json timesteps {ckpt}")

    sessions: list[Session] = []
    for i, moment in enumerate(moments):
        session = run_until(cmd, moment, tmp_path / f"agent{i}.log", state)
        sessions.append(session)
        if not session.killed:
            assert session.rc == 0, f"{_history(moments, sessions)}\n{session.stderr}"
            break
    history = _history(moments, sessions)
    print(history)
    if sessions[-1].killed:
        final = run(cmd)
        assert final.returncode == 0, f"{history}\n{final.stderr[-3000:]}"

    assert json.loads((out / "summary.json").read_text())["timesteps"] == 768, history
    assert json.loads((out / "run.json").read_text())["status"] == "done", history
    records = _jsonl(evals)
    steps = [r["timesteps"] for r in records]
    assert steps == EVAL_STEPS, f"evaluations.jsonl steps {steps}; {history}"
    tb = _tb_steps(out, "eval/mean_reward")
    assert tb == steps, f"TensorBoard eval/mean_reward steps {tb} != {steps}; {history}"


# --------------------------------------------------------------------------------------------
# pipeline


def test_pipeline_killed_in_each_stage_leaves_no_process_and_finishes(tmp_path: Path) -> None:
    from test_pipeline import SLOW_VAE, TINY

    rng = random.Random(SEED + 4)
    out = tmp_path / "pipe"
    sets = [*TINY, *SLOW_VAE, "pipeline.parallel=2"]
    cmd = _stage_cmd("pipeline", sets, "--out", str(out))
    vae_records = rng.randint(1, 8)  # of 6 train + 6 validation records (SLOW_VAE)
    moments = [
        Moment("collect under way (data/shards exists)",
               when(lambda: (out / "data" / "shards").is_dir()), rng.uniform(0.0, 0.6)),
        Moment(f"train-vae: {vae_records} new metrics.jsonl records",
               new_lines(out / "vae", "metrics.jsonl", vae_records), rng.uniform(0.0, 0.1)),
        Moment("agents training (an evaluations.jsonl exists)",
               when(lambda: any((out / "agents").glob("*/evaluations.jsonl"))),
               rng.uniform(0.0, 0.4)),
    ]

    def state() -> str:
        stamps = sorted(p.name for p in [*out.glob(".*.done.json"),
                                         *out.glob("agents/.*.done.json")])
        return f"stamps {stamps}"

    sessions: list[Session] = []
    watchers = []
    for i, moment in enumerate(moments):
        # started right after the previous kill, while its processes may still be dying
        session = run_until(cmd, moment, tmp_path / f"pipeline{i}.log", state, timeout=300)
        sessions.append(session)
        if not session.killed:
            assert session.rc == 0, f"{_history(moments, sessions)}\n{session.stderr}"
            break
        watchers.append(watch_orphans(session))
    history = _history(moments, sessions)
    print(history)
    if sessions[-1].killed:
        final = run(cmd, timeout=400)
        assert final.returncode == 0, f"{history}\n{final.stderr[-3000:]}"
    for watcher in watchers:
        watcher.join()
    left = {i: s.survivors for i, s in enumerate(sessions) if s.survivors}
    assert not left, f"processes of killed sessions left (session: pids): {left}; {history}"
    assert any(s.tree for s in sessions if s.killed), f"no worker process seen; {history}"

    assert (out / "report" / "report.md").is_file(), history
    agents = sorted(p.name for p in (out / "agents").iterdir() if p.is_dir())
    assert agents == ["latent__seed0", "latent__seed1", "pixel__seed0", "pixel__seed1"], history
    for agent in agents:
        episodes = json.loads((out / "agents" / agent / "eval.json").read_text())["episodes"]
        assert episodes == 2, f"{agent}: eval.json has {episodes} episodes; {history}"
        for stage in ("train-agent", "evaluate"):
            assert (out / "agents" / f".{agent}.{stage}.done.json").is_file(), (
                f"{agent}: no {stage} stamp; {history}")
    for name, stage in (("data", "collect"), ("vae", "train-vae"), ("report", "compare"),
                        ("visualize", "visualize")):
        assert (out / f".{name}.{stage}.done.json").is_file(), f"no {name} stamp; {history}"
