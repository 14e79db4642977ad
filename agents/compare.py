"""``worldmodel compare``: pixel vs latent agents, aggregated over seeds with confidence intervals.

Agent runs are grouped by observation mode (and any other config key that differs between them,
the seed aside). Each run contributes one score, the mean return of its final evaluation; groups
are summarised with rliable (Agarwal et al., 2021): IQM, mean and median with stratified-bootstrap
confidence intervals, and the probability of improvement between groups. A random-policy baseline,
evaluated on the same env and episode seeds, is always included: its "runs" are its episodes.

Agents trained in M's dream (their mode's ``trains_in``) also get their *dream return*, the
return they reached inside the dream (SB3's ``rollout/ep_rew_mean`` in their ``progress*.csv``),
summarised like the real one, and their temperature tau, next to the real return: World Models'
dream-vs-real table.

Outputs in the report folder: ``report.md`` (a one-line verdict, tables, plots), ``report.json``
(every number), ``return_vs_steps.png``, ``return_vs_seconds.png``, ``return_vs_real_steps.png``
(sample efficiency: return against the real env steps consumed), ``final_scores.png``,
``steps_per_second.png``. Runs are named by their path relative to the report folder.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.modes import MODE_NAMES, get_mode, report_rank
from agents.train import DREAM_SETTINGS, run_spec
from agents.train import STAGE as TRAIN_STAGE
from worldmodel.collect import STAGE as COLLECT_STAGE
from worldmodel.config import CompareConfig, Config, load_run_config
from worldmodel.errors import RunNotFoundError, UserError
from worldmodel.io import atomic_write, atomic_write_json, atomic_write_text, read_json
from worldmodel.runfolder import RunFolder, check_kind, require_kind
from worldmodel.stages import StageSpec, config_values, defining_keys

log = logging.getLogger(__name__)

RANDOM = "random policy"
METRICS = ("IQM", "mean", "median")
#: SB3's mean return of the last (up to 100) training episodes, in ``progress*.csv``.
DREAM_RETURN_KEY = "rollout/ep_rew_mean"


@dataclass
class AgentRun:
    """What compare needs from one agent run folder.

    :param final_returns: ``(E,)`` float returns of the final evaluation's episodes.
    :param steps: ``(K,)`` env steps at each periodic evaluation.
    :param seconds: ``(K,)`` wall-clock seconds of training at each periodic evaluation.
    :param curve: ``(K,)`` mean return of each periodic evaluation.
    :param real_env_steps: the real env steps the agent consumed: the steps it trained on, or
        for an agent trained in M's dream the frames of M's dataset (``summary.json``).
    :param dream_return: for an agent trained in M's dream, the mean return of its last
        training episodes in the dream (:func:`read_dream_return`); ``None`` otherwise.
    """

    path: Path
    config: Config
    final_returns: np.ndarray
    steps: np.ndarray
    seconds: np.ndarray
    curve: np.ndarray
    steps_per_second: float
    eval_seed: int | None
    deterministic: bool
    vae: dict[str, Any] | None = None
    group: str = ""
    real_env_steps: int | None = None
    dream_return: float | None = None

    @property
    def score(self) -> float:
        """The run's score: the mean return of its final evaluation."""
        return float(np.mean(self.final_returns))

    @property
    def in_dream(self) -> bool:
        """The run's mode trains in M's dream (its row's ``trains_in``)."""
        return trains_in_dream(self.config)


def trains_in_dream(cfg: Config) -> bool:
    """``cfg``'s observation mode trains in M's dream (unknown modes do not)."""
    mode = cfg.agent.obs_mode
    return mode in MODE_NAMES and get_mode(mode).trains_in == "dream"


_PROGRESS = re.compile(r"progress(?:_(\d+))?\.csv")


def read_dream_return(path: Path) -> float | None:
    """The return an agent last reached in training: :data:`DREAM_RETURN_KEY` of its run.

    SB3 logs it to ``progress.csv`` (``progress_<n>.csv`` for the n-th resumed session) after
    each rollout in which episodes ended: the mean return of the last 100 of them. The last
    value of the last session that logged one is returned; ``None`` when no episode ended (or
    there is no log). Unreadable values (a torn last row) are skipped.
    """
    sessions = []
    for file in Path(path).glob("progress*.csv"):
        match = _PROGRESS.fullmatch(file.name)
        if match and file.is_file():
            sessions.append((int(match.group(1) or 0), file))
    value = None
    for _, file in sorted(sessions):
        try:
            with open(file, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise _corrupt(file, f"unreadable: {e}") from None
        for row in rows:
            try:
                number = float(row.get(DREAM_RETURN_KEY) or "nan")
            except ValueError:
                continue
            if np.isfinite(number):
                value = number
    return value


@dataclass
class Group:
    """Runs that share every setting but the seed. ``scores`` is ``(runs, 1)`` for rliable."""

    name: str
    runs: list[AgentRun] = field(default_factory=list)
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0, 1)))


def _corrupt(file: Path, what: str) -> UserError:
    return UserError(
        f"{file} is corrupt ({what}); restore it, re-run the stage that wrote it, or leave the "
        "run out"
    )


def _read_json_file(file: Path) -> dict[str, Any]:
    """A JSON object from ``file``, or a one-line :class:`UserError` naming it."""
    try:
        data = read_json(file)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _corrupt(file, f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise _corrupt(file, f"expected a JSON object, got {type(data).__name__}")
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def _returns(file: Path, value: Any, where: str = "") -> np.ndarray:
    """``returns`` of an evaluation record: a non-empty list of finite numbers."""
    if not isinstance(value, list) or not value or not all(_is_number(v) for v in value):
        raise _corrupt(file, f"{where}'returns' must be a non-empty list of numbers")
    return np.asarray(value, dtype=np.float64)


def _read_evaluations(file: Path) -> list[dict[str, Any]]:
    """The periodic evaluations of ``evaluations.jsonl``, each record checked.

    A torn last line (an interrupted write) is ignored; anything else malformed is a one-line
    :class:`UserError` naming the file and line.
    """
    try:
        text = file.read_text(encoding="utf-8") if file.is_file() else ""
    except (OSError, UnicodeDecodeError) as e:
        raise _corrupt(file, f"unreadable: {e}") from None
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]
    records = []
    for n, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise _corrupt(file, f"line {n} is not valid JSON") from None
        if not isinstance(record, dict):
            raise _corrupt(file, f"line {n} is not a JSON object")
        for key in ("timesteps", "wall_seconds", "returns"):
            if key not in record:
                raise _corrupt(file, f"line {n} has no {key!r}")
        if not _is_number(record["timesteps"]) or not _is_number(record["wall_seconds"]):
            raise _corrupt(file, f"line {n}: 'timesteps' and 'wall_seconds' must be numbers")
        _returns(file, record["returns"], f"line {n}: ")
        records.append(record)
    if tail.strip():
        try:  # a last line without its newline: complete if it parses, else a torn write
            record = json.loads(tail)
        except ValueError:
            record = None
        if isinstance(record, dict) and {"timesteps", "wall_seconds", "returns"} <= set(record):
            records.append(record)
    return records


def load_agent_run(path: Path) -> AgentRun:
    """Read an agent run folder: ``config.yaml``, ``evaluations.jsonl``, ``eval.json``.

    The final score comes from ``eval.json`` (written by ``worldmodel evaluate``); without it, from
    the last periodic evaluation in ``evaluations.jsonl``.

    :raises RunNotFoundError: when the run folder does not exist.
    :raises UserError: when the run is unfinished (no ``summary.json``), one of its files is
        corrupt (invalid JSON, missing keys, wrong types; the message names the file), or its
        ``eval.json`` scored an older model than the one training ended with.
    """
    path = Path(path)
    if not path.is_dir():
        raise RunNotFoundError(f"agent run {str(path)!r} not found")
    config = load_run_config(path)
    records = _read_evaluations(path / "evaluations.jsonl")
    if not records:
        raise UserError(
            f"{path} has no evaluations.jsonl: train it with `worldmodel train-agent` "
            "(periodic evaluations are logged there) before comparing"
        )
    steps = np.array([r["timesteps"] for r in records], dtype=np.int64)
    seconds = np.array([r["wall_seconds"] for r in records], dtype=np.float64)
    curve = np.array([np.mean(r["returns"]) for r in records], dtype=np.float64)
    summary_file = path / "summary.json"
    if not summary_file.is_file():
        raise UserError(
            f"{path} has not finished training (no summary.json): finish it with "
            f"`worldmodel train-agent --resume --out {path}` or leave it out"
        )
    summary = _read_json_file(summary_file)
    sps = summary.get("steps_per_second")
    if sps is not None and not _is_number(sps):
        raise _corrupt(summary_file, f"'steps_per_second' must be a number, got {sps!r}")
    eval_file = path / "eval.json"
    eval_seed = None
    deterministic = config.agent.eval_deterministic
    if eval_file.is_file():
        final = _read_json_file(eval_file)
        if "returns" not in final:
            raise _corrupt(eval_file, "no 'returns'")
        returns = _returns(eval_file, final["returns"])
        timesteps, eval_seed = final.get("timesteps"), final.get("seed")
        if timesteps is not None and not _is_number(timesteps):
            raise _corrupt(eval_file, f"'timesteps' must be a number, got {timesteps!r}")
        if eval_seed is not None and not (isinstance(eval_seed, int)
                                          and not isinstance(eval_seed, bool)):
            raise _corrupt(eval_file, f"'seed' must be an integer, got {eval_seed!r}")
        if not isinstance(final.get("deterministic", deterministic), bool):
            raise _corrupt(eval_file, "'deterministic' must be true or false")
        if timesteps is not None and int(timesteps) != int(steps[-1]):
            raise UserError(
                f"{eval_file} scored the model at {timesteps} steps but training ended "
                f"at {steps[-1]}: re-run `worldmodel evaluate {path}`"
            )
        deterministic = bool(final.get("deterministic", deterministic))
    else:
        log.warning("%s: no eval.json, using its last periodic evaluation", path)
        returns = np.asarray(records[-1]["returns"], dtype=np.float64)
    sps = sps or float(steps[-1] / max(seconds[-1], 1e-9))
    vae_file = path / "vae.json"
    vae = _read_json_file(vae_file) if vae_file.is_file() else None
    real = summary.get("real_env_steps_collected", summary.get("real_env_steps", int(steps[-1])))
    real = int(real) if _is_number(real) else None
    dream = read_dream_return(path) if trains_in_dream(config) else None
    return AgentRun(path, config, returns, steps, seconds, curve, float(sps), eval_seed,
                    deterministic, vae, real_env_steps=real, dream_return=dream)


def _fingerprint(run: AgentRun) -> str:
    """What makes a run itself: its config (seed included) and every return it logged."""
    digest = hashlib.sha256(run.config.to_yaml().encode())
    for array in (run.final_returns, run.steps, run.curve):
        digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    return digest.hexdigest()


def check_distinct(runs: Sequence[AgentRun]) -> None:
    """Refuse a run given twice, by path or as a copy (same config, identical evaluations).

    Each run counts as one seed of its group, so a duplicate would shrink the CIs it is in.
    """
    seen: dict[Any, AgentRun] = {}
    for run in runs:
        for key, how in ((run.path.resolve(), "the same folder"),
                         (_fingerprint(run), "copies (same config.yaml and identical "
                                             "evaluations)")):
            other = seen.setdefault(key, run)
            if other is not run:
                raise UserError(
                    f"{other.path} and {run.path} are {how} of one run, which would count as "
                    "two seeds: pass each run once"
                )


def _run_settings(run: AgentRun) -> dict[str, Any]:
    """The run's settings as ``{dotted.key: repr(value)}``, plus ``vae`` for a trained encoder."""
    # what a run of its mode reads (a dream also reads its temperature: agents.train.run_spec)
    spec = run_spec(run.config) if run.config.agent.obs_mode in MODE_NAMES else TRAIN_STAGE
    keys = defining_keys(spec)
    settings = {key: repr(value) for key, value in config_values(run.config, keys).items()}
    if run.vae and run.vae.get("kind") == "vae" and run.vae.get("weights_hash"):
        settings["vae"] = str(run.vae["weights_hash"])[:12]
    memory_file = run.path / "memory.json"  # agents on a trained M: never pooled across Ms
    memory = _read_json_file(memory_file) if memory_file.is_file() else None
    if memory and memory.get("kind") == "memory" and memory.get("weights_hash"):
        settings["memory"] = str(memory["weights_hash"])[:12]
    return settings


def group_runs(runs: Sequence[AgentRun]) -> list[Group]:
    """Group runs by ``agent.obs_mode`` plus every other differing setting (not the seed).

    Settings are the run's config and, for agents on a trained VAE, that VAE's weights (``vae``:
    the start of their hash), so agents on different VAEs are never pooled; likewise for agents
    on a trained memory model M (``memory``, from ``memory.json``), and for agents trained in
    M's dream on its temperature (``memory.temperature``).

    :raises UserError: when the runs are not from the same env and preprocessing, or were scored
        differently (greedy vs sampled actions).
    """
    # the env settings that define the game and its frames: the output keys collect reads
    game = [k for k in COLLECT_STAGE.keys() if k.startswith("env.")]
    envs = {json.dumps(config_values(r.config, game), sort_keys=True) for r in runs}
    if len(envs) > 1:
        ids = sorted({f"{r.config.env.id} ({r.path})" for r in runs})
        raise UserError(f"runs come from different envs or preprocessing: {', '.join(ids)}")
    if len({r.deterministic for r in runs}) > 1:
        greedy = [str(r.path) for r in runs if r.deterministic]
        raise UserError(
            "runs were scored with greedy and with sampled actions (greedy: "
            f"{', '.join(greedy)}): re-run `worldmodel evaluate` on them with the same flag"
        )
    flat = [_run_settings(r) for r in runs]
    defining = [*defining_keys(TRAIN_STAGE), *DREAM_SETTINGS, "vae", "memory"]
    differing = [
        k for k in defining
        if len({f[k] for f in flat if k in f}) > 1 and k != "agent.obs_mode"
    ]
    groups: dict[str, Group] = {}
    for run, f in zip(runs, flat, strict=True):
        extra = ", ".join(f"{k}={f[k]}" for k in differing if k in f)
        run.group = run.config.agent.obs_mode + (f" ({extra})" if extra else "")
        groups.setdefault(run.group, Group(run.group)).runs.append(run)
    for group in groups.values():
        group.scores = np.array([[r.score] for r in group.runs])
    return sorted(groups.values(),
                  key=lambda g: (report_rank(g.runs[0].config.agent.obs_mode), g.name))


class _RandomModel:
    """A stand-in for an SB3 model that acts uniformly at random (for ``evaluate_policy``)."""

    def __init__(self, space: Any, n_envs: int, seed: int) -> None:
        self.space, self.n_envs = space, n_envs
        self.space.seed(seed)

    def predict(self, *_: Any, **__: Any) -> tuple[np.ndarray, None]:
        return np.stack([self.space.sample() for _ in range(self.n_envs)]), None


def random_baseline(cfg: Config, episodes: int, seed: int) -> np.ndarray:
    """Returns ``(episodes,)`` of a uniform random policy, on the envs ``evaluate`` builds.

    Like ``worldmodel evaluate``, it plays ``episodes`` on ``agent.eval_envs`` envs seeded
    ``seed + i``, so the random policy meets the same episodes as the agents' final evaluation.
    """
    from stable_baselines3.common.evaluation import evaluate_policy

    from envs import make_vec_env

    n_envs = min(episodes, cfg.agent.eval_envs)
    venv = make_vec_env(cfg.env, n_envs=n_envs, seed=seed)
    try:
        returns, _ = evaluate_policy(
            _RandomModel(venv.action_space, n_envs, seed),
            venv, n_eval_episodes=episodes, return_episode_rewards=True, warn=False,
        )
    finally:
        venv.close()
    return np.asarray(returns, dtype=np.float64)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _bootstrap(
    score_dict: dict[str, Any], func: Callable[..., np.ndarray], cfg: CompareConfig, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    from rliable import library as rly

    # rliable passes arch a RandomState, which arch deprecates; it also logs each group at INFO
    # on the root logger. Its bootstraps draw their resamples from the *global* NumPy RNG
    # (rliable 1.2.0 `update_indices` calls np.random.choice, ignoring random_state), so the
    # global RNG is seeded for the call, and restored after, to make the CIs reproducible.
    with warnings.catch_warnings(), _quiet_root_logger(), _global_numpy_seed(seed):
        warnings.simplefilter("ignore", FutureWarning)
        return rly.get_interval_estimates(
            score_dict,
            func,
            reps=cfg.bootstrap_reps,
            confidence_interval_size=cfg.confidence,
            random_state=np.random.RandomState(seed),
        )


@contextlib.contextmanager
def _global_numpy_seed(seed: int) -> Iterator[None]:
    """Seed NumPy's global RNG inside the block; the caller's RNG state is restored after."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def aggregate(groups: dict[str, np.ndarray], cfg: CompareConfig, seed: int = 0) -> dict[str, Any]:
    """IQM, mean and median with stratified-bootstrap CIs for each ``(runs, tasks)`` score matrix.

    :return: ``{group: {"IQM": [point, low, high], "mean": [...], "median": [...]}}``.
    """
    from rliable import metrics

    def func(scores: np.ndarray) -> np.ndarray:
        # rliable's aggregate_median is the median over tasks of per-task means (for one task,
        # the mean); with one game we want the median over runs.
        return np.array([
            metrics.aggregate_iqm(scores),
            metrics.aggregate_mean(scores),
            np.median(scores),
        ])

    points, intervals = _bootstrap(groups, func, cfg, seed)
    return {
        name: {m: [float(points[name][i]), *map(float, intervals[name][:, i])]
               for i, m in enumerate(METRICS)}
        for name in groups
    }


def probabilities_of_improvement(
    groups: dict[str, np.ndarray], cfg: CompareConfig, seed: int = 0
) -> dict[str, list[float]]:
    """P(X > Y) with CIs for every ordered pair of groups: ``{"X vs Y": [point, low, high]}``."""
    from rliable import metrics

    names = list(groups)
    pairs = {f"{x} vs {y}": (groups[x], groups[y]) for i, x in enumerate(names)
             for y in names[i + 1:]}
    if not pairs:
        return {}
    points, intervals = _bootstrap(pairs, metrics.probability_of_improvement, cfg, seed)
    return {k: [float(points[k]), *map(float, intervals[k][:, 0])] for k in pairs}


def _common_curve(group: Group) -> tuple[np.ndarray, np.ndarray]:
    """Env steps ``(K,)`` and returns ``(runs, 1, K)`` over the evaluations all runs share."""
    length = min(len(r.steps) for r in group.runs)
    steps = group.runs[0].steps[:length]
    return steps, np.stack([r.curve[:length] for r in group.runs])[:, None, :]


def _time_curve(group: Group, points: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Seconds ``(P,)`` and returns ``(runs, 1, P)`` interpolated onto a shared time grid."""
    start = max(float(r.seconds[0]) for r in group.runs)
    stop = min(float(r.seconds[-1]) for r in group.runs)
    grid = np.linspace(start, max(stop, start), points)
    curves = np.stack([np.interp(grid, r.seconds, r.curve) for r in group.runs])
    return grid, curves[:, None, :]


def _curve_estimates(
    curves: dict[str, np.ndarray], cfg: CompareConfig
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    from rliable import metrics

    def iqm(scores: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_iqm(scores[..., k]) for k in range(scores.shape[-1])])

    return _bootstrap(curves, iqm, cfg, seed=1)


def _plot_curves(
    groups: list[Group], x_of: Callable[[Group], tuple[np.ndarray, np.ndarray]],
    xlabel: str, out: Path, cfg: CompareConfig, baseline: float,
    marks: Mapping[str, tuple[float, Sequence[float]]] | None = None,
) -> None:
    """IQM return curves of ``groups`` (x and returns from ``x_of``) with their CI bands.

    :param marks: more groups, each drawn as one point ``(x, [IQM, low, high])`` with its CI
        as an error bar (an arm whose x does not move, e.g. the real steps of a dream agent).
    """
    import matplotlib.pyplot as plt

    xs, curves = {}, {}
    for g in groups:
        xs[g.name], curves[g.name] = x_of(g)
    points, intervals = _curve_estimates(curves, cfg) if curves else ({}, {})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in groups:
        (line,) = ax.plot(xs[g.name], points[g.name], label=g.name, linewidth=2)
        ax.fill_between(xs[g.name], intervals[g.name][0], intervals[g.name][1],
                        color=line.get_color(), alpha=0.2)
    for name, (x, (point, low, high)) in (marks or {}).items():
        ax.errorbar([x], [point], yerr=[[point - low], [high - point]], fmt="o", capsize=5,
                    markersize=7, label=name)
    ax.axhline(baseline, color="grey", linestyle="--", label=RANDOM)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"IQM return ({cfg.confidence:.0%} CI)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_figure(fig, out)


def _save_figure(fig: Any, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def _plot_final(stats: dict[str, Any], out: Path, cfg: CompareConfig) -> None:
    import matplotlib.pyplot as plt

    names = list(stats)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.6 * len(METRICS), 0.6 * len(names) + 1.4),
                             sharey=True)
    for ax, metric in zip(axes, METRICS, strict=True):
        for y, name in enumerate(names):
            point, low, high = stats[name][metric]
            ax.plot([low, high], [y, y], linewidth=6, alpha=0.5, color=f"C{y}")
            ax.plot([point], [y], "k|", markersize=14)
        ax.set_title(metric)
        ax.set_yticks(range(len(names)), names)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Final return, {cfg.confidence:.0%} stratified bootstrap CIs")
    _save_figure(fig, out)


def _plot_speed(groups: list[Group], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.6 * len(groups) + 1.4))
    for y, g in enumerate(groups):
        sps = [r.steps_per_second for r in g.runs]
        ax.barh(y, np.mean(sps), xerr=np.std(sps) if len(sps) > 1 else None, alpha=0.7)
    ax.set_yticks(range(len(groups)), [g.name for g in groups])
    ax.set_xlabel("training env steps / s (mean ± sd over seeds)")
    ax.grid(axis="x", alpha=0.3)
    _save_figure(fig, out)


def _vae_summary(runs: Sequence[AgentRun]) -> dict[str, Any] | None:
    """The VAE the latent runs used, with its probe metrics when its summary has them."""
    for run in runs:
        if run.vae and run.vae.get("path"):
            info = dict(run.vae)
            summary = Path(info["path"]) / "summary.json"
            if summary.is_file():
                info["summary"] = read_json(summary)
            return info
    return None


def _fmt(values: list[float]) -> str:
    point, low, high = values
    return f"{point:.3f} [{low:.3f}, {high:.3f}]"


def _probe_r2(vae: dict[str, Any] | None) -> float | None:
    """Mean linear-probe R^2 from the VAE run's ``summary.json`` (``representation.probe_r2``)."""
    try:
        return float(vae["summary"]["representation"]["probe_r2"]["mean"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None


def _verdicts(stats: dict[str, Any]) -> list[str]:
    """Say, per group, whether its IQM beats the random baseline with the CIs apart."""
    _, _, random_high = stats[RANDOM]["IQM"]
    lines = []
    for name, values in stats.items():
        if name == RANDOM:
            continue
        point, low, _ = values["IQM"]
        apart = low > random_high
        lines.append(
            f"- **{name}**: IQM {point:.3f}; "
            + ("above the random baseline with the CIs apart." if apart
               else "not separated from the random baseline at this confidence.")
        )
    return lines


def headline(stats: dict[str, Any], ci: str = "CI") -> str:
    """One line: the best arm by IQM and whether its CI is apart from the next arm's."""
    arms = sorted((name for name in stats if name != RANDOM),
                  key=lambda name: stats[name]["IQM"][0], reverse=True)
    if not arms:
        return "No arm to compare."
    best, (point, low, high) = arms[0], stats[arms[0]]["IQM"]
    text = f"Best arm: **{best}**, IQM {point:.3f} [{low:.3f}, {high:.3f}]"
    if len(arms) == 1:
        _, _, random_high = stats[RANDOM]["IQM"]
        return text + (" (the only arm); its " + ci + " is above the random baseline's."
                       if low > random_high else
                       f" (the only arm); its {ci} is not apart from the random baseline's.")
    runner, (r_point, r_low, r_high) = arms[1], stats[arms[1]]["IQM"]
    other = f"the next arm, **{runner}** (IQM {r_point:.3f} [{r_low:.3f}, {r_high:.3f}])"
    if low > r_high:
        return f"{text}; its {ci} is apart from {other}: a clear winner."
    return f"{text}; its {ci} overlaps {other}: no clear winner at this confidence."


def write_report(
    out: Path, groups: list[Group], baseline: np.ndarray, cfg: CompareConfig
) -> dict[str, Any]:
    """Compute every statistic and plot, and write ``report.md`` and ``report.json``."""
    score_dict = {g.name: g.scores for g in groups}
    score_dict[RANDOM] = baseline[:, None]
    stats = aggregate(score_dict, cfg)
    improvement = probabilities_of_improvement({g.name: g.scores for g in groups}, cfg)
    base_mean = float(baseline.mean())
    _plot_curves(groups, _common_curve, "env steps", out / "return_vs_steps.png", cfg, base_mean)
    _plot_curves(groups, _time_curve, "wall-clock seconds of training",
                 out / "return_vs_seconds.png", cfg, base_mean)
    # sample efficiency: real-env arms along the env steps they trained on; arms trained in the
    # dream as their final score at the real frames M's dataset cost
    dream_marks = {}
    for g in (g for g in groups if _in_dream(g)):
        steps = _real_steps(g)
        if steps is not None:
            dream_marks[g.name] = (float(steps), stats[g.name]["IQM"])
    _plot_curves([g for g in groups if not _in_dream(g)], _common_curve,
                 "real env steps consumed", out / "return_vs_real_steps.png", cfg, base_mean,
                 marks=dream_marks)
    _plot_final(stats, out / "final_scores.png", cfg)
    _plot_speed(groups, out / "steps_per_second.png")
    dream_scores = {g.name: _dream_scores(g) for g in groups if _in_dream(g)}
    dream_scores = {name: scores for name, scores in dream_scores.items() if len(scores)}
    dream_stats = aggregate(dream_scores, cfg) if dream_scores else {}
    runs = [r for g in groups for r in g.runs]
    vae = _vae_summary(runs)
    if vae is not None:  # named relative to the report, as the runs are
        for key in ("path", "architecture_from"):
            if vae.get(key):
                vae[key] = relative_path(vae[key], out)
        dataset = vae.get("summary", {}).get("dataset") if isinstance(
            vae.get("summary"), dict) else None
        if isinstance(dataset, dict) and os.path.isabs(str(dataset.get("path", ""))):
            dataset["path"] = relative_path(dataset["path"], out)
    first = runs[0].config
    report = {
        "env": first.env.id,
        "confidence": cfg.confidence,
        "bootstrap_reps": cfg.bootstrap_reps,
        "groups": {
            g.name: {
                "runs": [relative_path(r.path, out) for r in g.runs],
                "seeds": [r.config.seed for r in g.runs],
                "scores": g.scores[:, 0].tolist(),
                "timesteps": int(max(r.steps[-1] for r in g.runs)),
                "real_env_steps": _real_steps(g),
                "trains_in": "dream" if _in_dream(g) else "real",
                "tau": g.runs[0].config.memory.temperature if _in_dream(g) else None,
                "dream_returns": [r.dream_return for r in g.runs] if _in_dream(g) else None,
                "dream_return": dream_stats.get(g.name),
                "steps_per_second": float(np.mean([r.steps_per_second for r in g.runs])),
                "train_seconds": float(np.mean([r.seconds[-1] for r in g.runs])),
                **stats[g.name],
            }
            for g in groups
        },
        "random_baseline": {"episodes": len(baseline), "returns": baseline.tolist(),
                            **stats[RANDOM]},
        "probability_of_improvement": improvement,
        "vae": vae,
    }
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", _markdown(report, stats, improvement, groups, cfg))
    return report


def relative_path(path: str | os.PathLike[str], out: Path) -> str:
    """``path`` as the report folder ``out`` names it: relative to ``out`` when possible.

    A relative ``path`` is taken from the working directory, as the command line gives it;
    where no relative path exists (another drive on Windows) it stays absolute.
    """
    target = Path(path).resolve()
    try:
        return os.path.relpath(target, Path(out).resolve())
    except ValueError:
        return str(target)


def _in_dream(group: Group) -> bool:
    """The group's runs trained in M's dream (a group has one observation mode)."""
    return group.runs[0].in_dream


def _dream_scores(group: Group) -> np.ndarray:
    """``(runs, 1)`` dream returns of the group's runs that logged one (``(0, 1)``: none)."""
    values = [r.dream_return for r in group.runs if r.in_dream and r.dream_return is not None]
    return np.array(values, dtype=np.float64).reshape(-1, 1)


def _real_steps(group: Group) -> int | None:
    """The most real env steps a run of the group consumed (``None`` when one is unknown)."""
    values = [r.real_env_steps for r in group.runs]
    return None if any(v is None for v in values) else max(v for v in values if v is not None)


def _markdown(
    report: dict[str, Any], stats: dict[str, Any], improvement: dict[str, list[float]],
    groups: list[Group], cfg: CompareConfig,
) -> str:
    ci = f"{cfg.confidence:.0%} CI"
    lines = [
        f"# Pixel vs latent agents on {report['env']}",
        "",
        headline(stats, ci),
        "",
        f"Scores are each run's mean return over its final evaluation episodes; groups are "
        f"aggregated over seeds with rliable ({ci}, stratified bootstrap, "
        f"{cfg.bootstrap_reps} resamples). The random policy's runs are its "
        f"{report['random_baseline']['episodes']} episodes on the same env and episode seeds.",
    ]
    dream = any(_in_dream(g) for g in groups)  # the tau and dream-return columns
    if dream:
        lines += [
            "",
            "Arms trained in M's dream at temperature tau are scored in the real env like the "
            "others; their dream return is the mean return of their last training episodes "
            f"inside the dream (SB3's `{DREAM_RETURN_KEY}`), aggregated over seeds the same way.",
        ]
    columns = ["group", "runs", *(["tau"] if dream else []), "env steps", "real env steps",
               *([f"dream return IQM [{ci}]"] if dream else []), f"IQM [{ci}]", f"mean [{ci}]",
               f"median [{ci}]", "train env steps/s", "train s"]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for g in groups:
        info = report["groups"][g.name]
        tau, dream_return = info["tau"], info["dream_return"]
        real = info["real_env_steps"]
        lines.append("| " + " | ".join([
            g.name, f"{len(g.runs)} (seeds {', '.join(map(str, info['seeds']))})",
            *([f"{tau:g}" if tau is not None else ""] if dream else []),
            f"{info['timesteps']:,}", "?" if real is None else f"{real:,}",
            *([_fmt(dream_return["IQM"]) if dream_return else "?" if _in_dream(g) else ""]
              if dream else []),
            _fmt(stats[g.name]["IQM"]), _fmt(stats[g.name]["mean"]),
            _fmt(stats[g.name]["median"]),
            f"{info['steps_per_second']:.0f}", f"{info['train_seconds']:.0f}",
        ]) + " |")
    lines.append("| " + " | ".join([
        RANDOM, f"{report['random_baseline']['episodes']} episodes",
        *(["-"] if dream else []), "-", "-", *(["-"] if dream else []),
        _fmt(stats[RANDOM]["IQM"]), _fmt(stats[RANDOM]["mean"]), _fmt(stats[RANDOM]["median"]),
        "-", "-",
    ]) + " |")
    lines += ["", "## Verdict", "", *_verdicts(stats)]
    if improvement:
        lines += ["", "## Probability of improvement", "", f"| pair | P(X > Y) [{ci}] |",
                  "|---|---|"]
        lines += [f"| {pair} | {_fmt(v)} |" for pair, v in improvement.items()]
    r2 = _probe_r2(report["vae"])
    if report["vae"]:
        lines += ["", "## VAE", "", f"- run: `{report['vae'].get('path')}`",
                  f"- weights sha256: `{report['vae'].get('weights_hash', '?')}`"]
        if r2 is not None:
            lines.append(f"- linear-probe R^2 of the true state (held-out episodes): {r2:.3f}")
    lines += ["", "## Runs", "", "Run folders, relative to this report's folder.", ""]
    lines += [f"- **{name}**: " + ", ".join(f"`{run}`" for run in info["runs"])
              for name, info in report["groups"].items()]
    lines += [
        "", "## Plots", "",
        "![return vs env steps](return_vs_steps.png)", "",
        "![return vs wall-clock](return_vs_seconds.png)", "",
        "![return vs real env steps](return_vs_real_steps.png)", "",
        "![final scores](final_scores.png)", "",
        "![env steps per second](steps_per_second.png)", "",
    ]
    return "\n".join(lines)


def run(runs: Sequence[Path], out: Path, cfg: CompareConfig) -> Path:
    """Compare agent runs and write the report folder.

    :param runs: agent run folders (from ``worldmodel train-agent``; ``evaluate`` optional).
    :param out: report folder.
    :param cfg: the ``compare`` config section.
    :return: ``out``.
    """
    if not runs:
        raise UserError("give at least one agent run folder to compare")
    check_kind(Path(out), STAGE.kind)  # a file or another kind of run: refused before any work
    for p in runs:
        if not Path(p).is_dir():
            raise RunNotFoundError(f"agent run {str(p)!r} not found; pass an agent run folder")
    agent_runs = [load_agent_run(require_kind(Path(p), "agent", "agent run")) for p in runs]
    check_distinct(agent_runs)
    groups = group_runs(agent_runs)
    first = agent_runs[0]
    seed = first.eval_seed if first.eval_seed is not None else first.config.seed + 1000
    with RunFolder.open(Path(out), STAGE.kind) as folder:
        log.info("random baseline: %d episodes on %s", cfg.random_episodes, first.config.env.id)
        baseline = random_baseline(first.config, cfg.random_episodes, seed)
        write_report(out, groups, baseline, cfg)
        folder.finish()
    log.info("report: %s", out / "report.md")
    return out


def _run_stage(cfg: Config, out: Path, inputs: Mapping[str, Any], resume: bool | None) -> Path:
    return run(list(inputs["evaluate"]), out, cfg.compare)


#: ``compare`` reads ``compare`` and every evaluated agent run.
STAGE = StageSpec(
    "compare", "report",
    reads=("compare",),
    needs=("evaluate",),
    run=_run_stage,
    folder="report",
)
