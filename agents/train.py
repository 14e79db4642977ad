"""``worldmodel train-agent``: an SB3 agent on pixels or VAE latents, with nothing else changed.

Top to bottom, :func:`run`:

1. checks the run folder (a fresh run refuses a folder with checkpoints; ``--resume`` needs
   ``last.zip`` and the same settings), the algorithm against the action space, and the
   hyperparameters (:mod:`agents.hyperparams`);
2. builds the encoder (:func:`agents.encoders.prepare_encoder`: the ``--vae`` run, checked
   against the env's frames, or an untrained one for ``random-encoder``) and records it in
   ``vae.json``;
3. builds ``env.n_envs`` training envs and ``agent.eval_envs`` evaluation envs (seeds
   ``seed + 1000 + i``) with the same observation pipeline (:mod:`agents.wrapping`); a mode
   that trains in the dream (its row's ``trains_in``) trains in ``env.n_envs`` dreams of its
   M instead (:func:`make_dream_agent_env`) and is evaluated in the real env;
4. trains with SB3's logger (``progress*.csv``, TensorBoard; on a terminal also stdout and its
   progress bar, else one log line per evaluation), a periodic evaluation
   (:class:`PeriodicEval`) and checkpoints (:class:`Checkpoint`);
5. evaluates once more at the end, writes ``summary.json`` and TensorBoard hparams
   (:func:`write_hparams`: the arm's settings and seed, ``hparam/final_mean_return``).

Run folder: ``config.yaml``, ``vae.json`` (latent modes), ``memory.json`` (and
``random_memory.pt`` for the untrained control: the memory modes, :mod:`agents.memory_obs`),
``features.json`` (the per-dimension statistics the latent modes standardise their features
with, :mod:`agents.features`),
``evaluations.jsonl`` (one record per
evaluation: ``timesteps``, ``wall_seconds``, ``elapsed_seconds``, ``returns``, ``lengths``,
``mean_return``, ``std_return``), ``best_model.zip``, ``last.zip`` (+ ``replay_buffer.npz`` for
off-policy algorithms when small enough, ``vecnormalize.json`` with reward normalisation; no
file of a run folder is ever unpickled),
``train_state.json``, ``summary.json`` (with ``real_env_steps``, the real env steps trained on,
and ``dream_env_steps``; a dream run adds ``real_env_steps_collected``, the frames of M's
datasets, and ``dream_tau``), TensorBoard ``events.*`` and ``progress.csv``
(``progress_<n>.csv`` for the n-th resumed session).

``wall_seconds`` is training wall-clock time, periodic evaluations and checkpointing excluded,
summed over resumed sessions: the x axis of return-vs-compute curves. ``elapsed_seconds``
includes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import Logger, TensorBoardOutputFormat, make_output_format
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.vec_env import VecEnv, sync_envs_normalization

from agents.encoders import load_encoder, prepare_encoder, read_vae_record
from agents.evaluate import retire_eval
from agents.features import (
    FEATURES_RECORD,
    FeatureStats,
    VecStandardize,
    load_features,
    prepare_features,
)
from agents.hyperparams import parse_hyperparams
from agents.memory_obs import load_agent_memory, prepare_memory, read_memory_record
from agents.models import (
    LEGACY_REPLAY_FILE,
    REPLAY_FILE,
    agent_device,
    algo_class,
    full_policy_kwargs,
    load_model,
    load_replay_buffer,
    save_replay_buffer,
)
from agents.modes import get_mode
from agents.wrapping import (
    EVAL_SEED_OFFSET,
    LEGACY_NORMALIZE_FILE,
    NORMALIZE_FILE,
    make_agent_env,
    save_normalization,
)
from worldmodel.errors import UserError
from worldmodel.io import (
    append_jsonl,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_jsonl,
)
from worldmodel.runfolder import RunFolder, require_kind
from worldmodel.stages import StageSpec, Variant
from worldmodel.utils import progress_enabled, seed_everything

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm

    from worldmodel.config import Config
    from worldmodel.memory import LoadedMemory

log = logging.getLogger("worldmodel")

class Clock:
    """Training wall-clock time with pauses (evaluations, checkpoints), across sessions.

    :param seconds: training seconds of earlier sessions.
    :param elapsed: elapsed seconds (pauses included) of earlier sessions.
    """

    def __init__(self, seconds: float = 0.0, elapsed: float = 0.0) -> None:
        self._before, self._elapsed_before = seconds, elapsed
        self._start = time.perf_counter()
        self._paused = 0.0  # finished pauses
        self._pause_start: float | None = None  # start of the current (outermost) pause

    @property
    def elapsed(self) -> float:
        """Seconds since the first session started, pauses included."""
        return self._elapsed_before + time.perf_counter() - self._start

    @property
    def seconds(self) -> float:
        """Training seconds, pauses (including the current one) excluded."""
        now = time.perf_counter()
        current = now - self._pause_start if self._pause_start is not None else 0.0
        return self._before + now - self._start - self._paused - current

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside this block does not count as training time (nesting is fine)."""
        if self._pause_start is not None:
            yield
            return
        self._pause_start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - self._pause_start
            self._pause_start = None


def save_model(model: BaseAlgorithm, path: Path) -> None:
    """``model.save`` to ``path`` atomically."""
    atomic_write(path, lambda f: model.save(f))  # type: ignore[arg-type]


class PeriodicEval(EvalCallback):
    """Evaluate every ``every`` env steps; log env steps AND wall-clock seconds per evaluation.

    Each evaluation appends ``{timesteps, wall_seconds, elapsed_seconds, returns, lengths,
    mean_return, std_return}`` to ``RUN/evaluations.jsonl``, records ``eval/*`` in SB3's logger
    and saves ``best_model.zip`` (atomically) on a new best mean return.
    """

    def __init__(
        self,
        eval_env: VecEnv,
        run_dir: Path,
        clock: Clock,
        every: int,
        episodes: int,
        deterministic: bool,
        best_mean_reward: float = -np.inf,
    ) -> None:
        super().__init__(
            eval_env, n_eval_episodes=episodes, eval_freq=1, deterministic=deterministic,
            verbose=0, warn=False,
        )
        self.run_dir = run_dir
        self.clock = clock
        self.every = every
        self.best_mean_reward = best_mean_reward
        self.next_eval = every
        self.last_record: dict[str, Any] | None = None

    def _init_callback(self) -> None:
        with warnings.catch_warnings():  # a dream-trained agent is evaluated in the real env
            warnings.filterwarnings("ignore", "Training and eval env are not of the same type")
            super()._init_callback()
        self.next_eval = (self.model.num_timesteps // self.every + 1) * self.every

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.next_eval:
            self.next_eval = (self.num_timesteps // self.every + 1) * self.every
            self.evaluate()
        return True

    def evaluate(self) -> dict[str, Any]:
        """Run one evaluation now and record it."""
        model = self.model
        with self.clock.paused():
            if model.get_vec_normalize_env() is not None:
                sync_envs_normalization(model.get_env(), self.eval_env)  # type: ignore[arg-type]
            returns, lengths = evaluate_policy(
                model, self.eval_env, n_eval_episodes=self.n_eval_episodes,
                deterministic=self.deterministic, return_episode_rewards=True, warn=False,
            )
            assert isinstance(returns, list) and isinstance(lengths, list)
            mean = float(np.mean(returns))
            record: dict[str, Any] = {
                "timesteps": int(model.num_timesteps),
                "wall_seconds": round(self.clock.seconds, 3),
                "elapsed_seconds": round(self.clock.elapsed, 3),
                "returns": [float(r) for r in returns],
                "lengths": [int(n) for n in lengths],
                "mean_return": mean,
                "std_return": float(np.std(returns)),
            }
            append_jsonl(self.run_dir / "evaluations.jsonl", record)
            if not progress_enabled():  # no bar and no SB3 stdout table: one line instead
                log.info("eval at %d env steps: mean return %.2f (std %.2f over %d episodes), "
                         "%.1f s of training", record["timesteps"], mean, record["std_return"],
                         len(returns), record["wall_seconds"])
            self.last_mean_reward = mean
            self.last_record = record
            model.logger.record("eval/mean_reward", record["mean_return"])
            model.logger.record("eval/std_reward", record["std_return"])
            model.logger.record("eval/mean_ep_length", float(np.mean(lengths)))
            model.logger.record("eval/wall_seconds", record["wall_seconds"])
            model.logger.dump(model.num_timesteps)
            if mean > self.best_mean_reward:
                self.best_mean_reward = mean
                save_model(model, self.run_dir / "best_model.zip")
        return record


class Checkpoint(BaseCallback):
    """Save ``last.zip`` (and what resuming needs) every ``every`` env steps.

    On-policy algorithms (PPO, A2C) save when a rollout starts, just after the update on the
    previous one: a save in the middle of a rollout would count steps that a resumed run never
    trains on (the rollout buffer is not saved). Off-policy algorithms save after any step:
    their transitions are in the saved replay buffer.

    :param save: the function that writes the checkpoint (see :func:`save_checkpoint`).
    """

    def __init__(self, every: int, save: Callable[[], None]) -> None:
        super().__init__()
        self.every = every
        self.save = save
        self.next_save = every
        self.on_policy = False
        self.trained_timesteps = 0  # on-policy: env steps of the rollouts already trained on

    def _init_callback(self) -> None:
        self.on_policy = isinstance(self.model, OnPolicyAlgorithm)
        self.trained_timesteps = self.model.num_timesteps
        self.next_save = (self.model.num_timesteps // self.every + 1) * self.every

    def _save_if_due(self) -> None:
        if self.model.num_timesteps >= self.next_save:
            self.next_save = (self.model.num_timesteps // self.every + 1) * self.every
            self.save()

    def _on_rollout_start(self) -> None:
        if self.on_policy:
            self.trained_timesteps = self.model.num_timesteps
            self._save_if_due()

    def _on_step(self) -> bool:
        if not self.on_policy:
            self._save_if_due()
        return True

    def resumable_timesteps(self) -> int:
        """The step count a save right now must record (on-policy: the steps trained on)."""
        return self.trained_timesteps if self.on_policy else self.model.num_timesteps


def _replay_buffer_mb(model: BaseAlgorithm) -> float:
    buffer = getattr(model, "replay_buffer", None)
    arrays = [v for v in vars(buffer).values() if isinstance(v, np.ndarray)] if buffer else []
    return sum(a.nbytes for a in arrays) / 2**20


def save_checkpoint(
    model: BaseAlgorithm,
    run_dir: Path,
    cfg: Config,
    clock: Clock,
    evaluator: PeriodicEval,
    timesteps: int | None = None,
) -> None:
    """Write ``last.zip``, ``train_state.json`` and, when useful, replay buffer and VecNormalize.

    :param timesteps: the step count to record instead of ``model.num_timesteps`` (an
        interrupted on-policy rollout: its steps were never trained on).
    """
    if timesteps is not None and timesteps != model.num_timesteps:
        current, model.num_timesteps = model.num_timesteps, timesteps
        try:
            save_checkpoint(model, run_dir, cfg, clock, evaluator)
        finally:
            model.num_timesteps = current
        return
    with clock.paused():
        if isinstance(model, OffPolicyAlgorithm) and cfg.agent.replay_buffer_max_mb > 0:
            size = _replay_buffer_mb(model)
            if size <= cfg.agent.replay_buffer_max_mb:
                atomic_write(run_dir / REPLAY_FILE, lambda f: save_replay_buffer(model, f))
            else:
                log.info("replay buffer not saved: %.0f MB > agent.replay_buffer_max_mb", size)
        normalize = model.get_vec_normalize_env()
        if normalize is not None:
            save_normalization(normalize, run_dir / NORMALIZE_FILE)
        save_model(model, run_dir / "last.zip")
        atomic_write_json(run_dir / "train_state.json", {
            "timesteps": int(model.num_timesteps),
            "wall_seconds": clock.seconds,
            "elapsed_seconds": clock.elapsed,
            "best_mean_reward": evaluator.best_mean_reward,
        })


def check_action_space(algo: str, space: spaces.Space[Any], env_id: str) -> None:
    """SAC/TD3 need continuous actions, DQN discrete ones: a clear error otherwise."""
    if algo in ("SAC", "TD3") and not isinstance(space, spaces.Box):
        raise UserError(
            f"{algo} needs continuous (Box) actions but {env_id} has {space}; use PPO, A2C or "
            "DQN, or continuous actions (Reach: --set env.kwargs.continuous=true; CarRacing: "
            "the default)"
        )
    if algo == "DQN" and not isinstance(space, spaces.Discrete):
        raise UserError(
            f"DQN needs discrete actions but {env_id} has {space}; use PPO, A2C, SAC or TD3, or "
            "discrete actions (CarRacing: --set env.kwargs.continuous=false)"
        )


#: Files of an attempt killed before its first ``last.zip``, removed when the run starts over.
STALE_FILES = (
    "evaluations.jsonl", "train_state.json", "summary.json", "eval.json", "best_model.zip",
    NORMALIZE_FILE, LEGACY_NORMALIZE_FILE, REPLAY_FILE, LEGACY_REPLAY_FILE, "vae.json",
    "random_encoder.pt", "memory.json", "random_memory.pt", FEATURES_RECORD, "progress*.csv",
    "events.*",
)


def open_run(cfg: Config, out: Path, resume: bool | None) -> RunFolder:
    """Open the agent run folder (a :class:`~worldmodel.runfolder.RunFolder` on ``last.zip``).

    A resumed run refuses other ``output`` settings than the ones it was started with, among
    those its mode reads (:func:`run_spec`); budgets and runtime settings may change.
    """
    folder = RunFolder.open(out, STAGE.kind, resume=resume, checkpoint="last.zip",
                            stale=STALE_FILES)
    try:
        folder.refuse_changed_settings(cfg, run_spec(cfg))
    except BaseException:
        folder.close()
        raise
    return folder


def run_spec(cfg: Config) -> StageSpec:
    """:data:`STAGE` with what a run of ``cfg``'s mode also reads.

    A mode that trains in the dream also reads :data:`DREAM_SETTINGS`.
    """
    if get_mode(cfg.agent.obs_mode).trains_in != "dream":
        return STAGE
    return dataclasses.replace(STAGE, reads=(*STAGE.reads, *DREAM_SETTINGS))


class _TensorBoard(TensorBoardOutputFormat):
    """SB3's TensorBoard output, hiding the steps >= ``purge_step`` an interrupted session wrote."""

    def __init__(self, folder: str, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=folder, purge_step=purge_step)
        self._is_closed = False


def _logger(out: Path, session: int, purge_step: int | None) -> Logger:
    """SB3's logger: ``progress[_n].csv``, TensorBoard (from ``purge_step`` on), stdout."""
    formats = ["csv"] + (["stdout"] if progress_enabled() else [])
    suffix = "" if session == 0 else f"_{session}"
    outputs = [make_output_format(f, str(out), suffix) for f in formats]
    return Logger(str(out), [*outputs, _TensorBoard(str(out), purge_step)])


def _build_model(
    cfg: Config, out: Path, env: VecEnv, record: dict[str, Any] | None, resume: bool, device: Any
) -> BaseAlgorithm:
    algo = algo_class(cfg.agent.algo)
    hyper = parse_hyperparams(cfg.agent.hyperparams, algo, env.action_space)
    if resume:
        model = load_model(out, cfg, out / "last.zip", env=env, device=device)
        buffer = out / REPLAY_FILE
        if isinstance(model, OffPolicyAlgorithm):
            if buffer.is_file():
                load_replay_buffer(model, buffer)
            elif (out / LEGACY_REPLAY_FILE).is_file():
                log.warning("%s (a pickle of an older version) is not loaded: unpickling can run "
                            "code; resuming %s with an empty replay buffer",
                            out / LEGACY_REPLAY_FILE, cfg.agent.algo)
            else:
                log.warning("resuming %s with an empty replay buffer", cfg.agent.algo)
        return model
    policy, policy_kwargs = full_policy_kwargs(cfg, record, hyper.pop("policy_kwargs", {}))
    try:
        return algo(
            policy, env, seed=cfg.seed, device=device, policy_kwargs=policy_kwargs, verbose=0,
            **hyper,
        )
    except (TypeError, ValueError, AssertionError) as e:
        raise UserError(f"agent: SB3 {cfg.agent.algo} rejected the settings: {e}") from e
    except RuntimeError as e:  # torch: a CNN whose kernels do not fit the frames
        if "size" not in str(e):
            raise
        size = cfg.env.image_size
        raise UserError(
            f"agent: the policy network cannot read {size}x{size} frames ({e}); raise "
            "env.image_size to >= 36 (NatureCNN's minimum) or set a features_extractor_class "
            "in agent.hyperparams.policy_kwargs"
        ) from e


def _trim_evaluations(out: Path, timesteps: int) -> None:
    """Drop evaluation records newer than the checkpoint we resume from (a lost session)."""
    path = out / "evaluations.jsonl"
    records = read_jsonl(path)
    keep = [r for r in records if r["timesteps"] <= timesteps]
    if len(keep) != len(records):
        import json

        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def _read_state(out: Path) -> dict[str, Any]:
    """``train_state.json``, or ``{}`` (clock from 0) when a crash came before its first write."""
    path = out / "train_state.json"
    if not path.is_file():
        log.warning("%s is missing: wall-clock time starts again from 0", path)
        return {}
    state: dict[str, Any] = read_json(path)
    return state


def run(cfg: Config, out: Path, vae: Path | None = None, memory: Path | None = None,
        resume: bool | None = False, data: Path | None = None) -> Path:
    """Train an agent as ``cfg.agent`` says; see the module docstring for the run folder.

    :param cfg: the resolved config.
    :param out: the run folder.
    :param vae: the VAE run (``latent``, ``latent-finetune``; optional for ``random-encoder``,
        where it only decides the architecture).
    :param memory: the memory run (``latent-memory``; ``latent-memory-untrained`` borrows its
        architecture), recorded in ``memory.json`` (:mod:`agents.memory_obs`).
    :param resume: continue from ``out/last.zip`` (the step count goes on; a session that
        trains further moves ``eval.json``, which described the agent before it, to
        ``eval.previous.json``). ``False`` starts a run, but resumes one that was interrupted
        after its first checkpoint; ``None`` resumes whenever there is a checkpoint.
    :param data: the dataset whose statistics standardise the latent modes' features
        (:mod:`agents.features`); ``None``: the one the memory run (memory modes) or the VAE run
        recorded.
    :return: ``out``.
    """
    out = Path(out)
    algo = algo_class(cfg.agent.algo)
    parse_hyperparams(cfg.agent.hyperparams, algo)  # fail fast, before envs are built
    if vae is not None:
        require_kind(Path(vae), "vae", "--vae")
    if memory is not None:
        require_kind(Path(memory), "memory", "--memory")
    with open_run(cfg, out, resume) as folder:
        _run(cfg, out, vae, folder, memory, data)
    return out


def _run(cfg: Config, out: Path, vae: Path | None, folder: RunFolder,
         memory_run: Path | None = None, data: Path | None = None) -> None:
    resume = folder.resume
    seed_everything(cfg.seed)
    device = agent_device(cfg)
    if resume:
        encoder, record = load_encoder(out, cfg), read_vae_record(out)
        if vae is not None and record and record.get("path") != str(Path(vae).resolve()):
            log.warning("--resume uses the recorded VAE %s, not --vae %s", record["path"], vae)
    else:
        encoder, record = prepare_encoder(cfg, vae, out)
    if resume:
        memory, memory_record = load_agent_memory(out, cfg), read_memory_record(out)
    else:
        memory, memory_record = prepare_memory(cfg, memory_run, encoder, out)
    if resume:  # a run started without features.json (older versions) goes on without
        features = load_features(out, encoder, memory)
    else:
        features = prepare_features(cfg, encoder, memory, out, vae, memory_run, data)
    folder.save_config(cfg)
    gamma = float(cfg.agent.hyperparams.get("gamma", 0.99))
    in_dream = get_mode(cfg.agent.obs_mode).trains_in == "dream"
    if in_dream:
        assert memory is not None  # prepare_memory / load_agent_memory gave the trained M
        steps = int(_read_state(out).get("timesteps", 0)) if resume else 0
        env = make_dream_agent_env(cfg, memory, steps, gamma,
                                   out / NORMALIZE_FILE if resume else None, features)
    else:
        env = make_agent_env(cfg, encoder, n_envs=cfg.env.n_envs, seed=cfg.seed, gamma=gamma,
                             normalize_from=out / NORMALIZE_FILE if resume else None,
                             memory=memory, features=features)
    eval_env = None
    try:
        check_action_space(cfg.agent.algo, env.action_space, cfg.env.id)
        eval_env = make_agent_env(cfg, encoder, n_envs=cfg.agent.eval_envs,
                                  seed=cfg.seed + EVAL_SEED_OFFSET, training=False, gamma=gamma,
                                  memory=memory, features=features)
        if in_dream:
            check_dream_spaces(env, eval_env, cfg)
        model = _build_model(cfg, out, env, record, resume, device)
        summary = _train(cfg, out, model, eval_env, record, resume)
        if summary is not None:
            if memory_record is not None:
                summary["memory"] = {k: memory_record.get(k) for k in
                                     ("kind", "path", "checkpoint", "weights_hash")}
            summary["standardized"] = features is not None
            steps = summary["timesteps"]
            summary["real_env_steps"] = 0 if in_dream else steps
            summary["dream_env_steps"] = steps if in_dream else 0
            if in_dream:
                assert memory is not None
                summary["real_env_steps_collected"] = collected_frames(memory.run_dir)
                summary["dream_tau"] = cfg.memory.temperature
            folder.save_summary(summary)
        folder.finish()
    finally:
        env.close()
        if eval_env is not None:
            eval_env.close()


def dream_seed(seed: int, steps: int) -> int:
    """The dream's seed for a session starting at ``steps``: a fresh stream on each resume."""
    return int(np.random.SeedSequence([seed, steps]).generate_state(1)[0])


def make_dream_agent_env(cfg: Config, memory: LoadedMemory, steps: int, gamma: float,
                         normalize_from: Path | None,
                         features: FeatureStats | None = None) -> VecEnv:
    """The training env of a mode that trains in the dream: ``env.n_envs`` dreams of M.

    M's run folder gives the dataset (its first frames start the episodes, its manifest the
    action space and the episode cap); the temperature is ``memory.temperature``; the dream is
    seeded from ``seed`` and ``steps`` (the step count a session starts from). Its ``[z, h]``
    are standardised with the run's ``features`` (:class:`agents.features.VecStandardize`), as
    the real env's are. Reward normalisation is as in the real env's
    (:func:`agents.wrapping.make_agent_env`).
    """
    from stable_baselines3.common.vec_env import VecNormalize

    from agents.memory_obs import MEMORY_CHECKPOINT
    from agents.wrapping import load_normalization
    from worldmodel.dream import make_dream_env

    if memory.run_dir is None:
        raise UserError(f"agent.obs_mode={cfg.agent.obs_mode} trains in the dream of a memory "
                        "run folder: pass --memory MEMORY_RUN")
    venv: VecEnv = make_dream_env(memory.run_dir, n_envs=cfg.env.n_envs,
                                  tau=cfg.memory.temperature, seed=dream_seed(cfg.seed, steps),
                                  checkpoint=MEMORY_CHECKPOINT)
    if features is not None:
        venv = VecStandardize(venv, features)
    if cfg.agent.normalize_reward:
        venv = VecNormalize(venv, training=True, norm_obs=False, norm_reward=True, gamma=gamma)
        if normalize_from is not None:
            load_normalization(normalize_from, venv)
    return venv


def check_dream_spaces(dream: VecEnv, real: VecEnv, cfg: Config) -> None:
    """Refuse (one line) a dream whose observations or actions are not the real env's."""
    for what, a, b in (("observations", dream.observation_space, real.observation_space),
                       ("actions", dream.action_space, real.action_space)):
        if a != b:
            hint = (" (agent.history > 1 stacks the real env's [z, h] but not the dream's; "
                    "use agent.history=1)" if cfg.agent.history > 1 and what == "observations"
                    else "; use a memory run trained on this env")
            raise UserError(f"agent.obs_mode={cfg.agent.obs_mode}: the dream's {what} {a} are "
                            f"not the real env's {b}{hint}")


def collected_frames(memory_run: Path | None) -> int | None:
    """The frames of the dataset(s) a memory run was trained on: the real env steps it consumed.

    The total its ``summary.json`` records (``inputs.real_env_steps_collected``), else the frames
    of its datasets (``inputs.datasets``, or the one ``inputs.dataset`` of older runs).
    """
    from worldmodel.dataset import open_dataset

    if memory_run is None:
        return None
    summary = Path(memory_run) / "summary.json"
    inputs = read_json(summary).get("inputs", {}) if summary.is_file() else {}
    if inputs.get("real_env_steps_collected") is not None:
        return int(inputs["real_env_steps_collected"])
    datas = inputs.get("datasets") or ([inputs["dataset"]] if inputs.get("dataset") else [])
    if not datas:
        return None
    try:
        return sum(int(open_dataset(Path(d)).num_frames) for d in datas)
    except (OSError, UserError) as e:
        log.warning("cannot count the frames of %s (%s): real_env_steps_collected unknown",
                    ", ".join(datas), e)
        return None


def _train(
    cfg: Config,
    out: Path,
    model: BaseAlgorithm,
    eval_env: VecEnv,
    record: dict[str, Any] | None,
    resume: bool,
) -> dict[str, Any] | None:
    """Train to ``agent.timesteps``, evaluate, checkpoint; the summary (``None``: nothing to do)."""
    state = _read_state(out) if resume else {}
    session = len(list(out.glob("progress*.csv"))) if resume else 0
    # last.zip and train_state.json are two writes: a crash can leave the state older. The
    # evaluations after the state's step go (their wall clock is past the resumed clock's), and
    # TensorBoard hides the same steps, so the two logs keep the same evaluations.
    kept = min(state.get("timesteps", 0), model.num_timesteps) if resume else None
    model.set_logger(_logger(out, session, None if kept is None else kept + 1))
    if kept is not None:
        _trim_evaluations(out, kept)
    clock = Clock(state.get("wall_seconds", 0.0), state.get("elapsed_seconds", 0.0))
    evaluator = PeriodicEval(
        eval_env, out, clock, cfg.agent.eval_every, cfg.agent.eval_episodes,
        cfg.agent.eval_deterministic, state.get("best_mean_reward", -np.inf),
    )

    def save() -> None:
        save_checkpoint(model, out, cfg, clock, evaluator)

    start_steps = model.num_timesteps
    remaining = cfg.agent.timesteps - model.num_timesteps
    if remaining > 0:
        retire_eval(out)  # eval.json described the agent before this session
        checkpoint = Checkpoint(cfg.agent.checkpoint_every, save)
        try:
            model.learn(
                remaining,
                callback=CallbackList([evaluator, checkpoint]),
                reset_num_timesteps=not resume,
                progress_bar=progress_enabled(),
            )
        except KeyboardInterrupt:
            save_checkpoint(model, out, cfg, clock, evaluator, checkpoint.resumable_timesteps())
            raise
    if remaining <= 0 and (out / "summary.json").is_file():
        log.info("%s already trained %d env steps; nothing to do", out, model.num_timesteps)
        return None
    if remaining <= 0:
        evaluator.init_callback(model)
    last = evaluator.last_record
    final = last if last and last["timesteps"] == model.num_timesteps else evaluator.evaluate()
    save()
    write_hparams(out, cfg, final["mean_return"], model.num_timesteps)
    log.info("trained %d env steps (%d this session) in %.0f s",
             model.num_timesteps, model.num_timesteps - start_steps, clock.seconds)
    summary = {
        "algo": cfg.agent.algo,
        "obs_mode": cfg.agent.obs_mode,
        "env": cfg.env.id,
        "seed": cfg.seed,
        "history": cfg.agent.history,
        "timesteps": int(model.num_timesteps),
        "wall_seconds": round(clock.seconds, 3),
        "elapsed_seconds": round(clock.elapsed, 3),
        "steps_per_second": model.num_timesteps / max(clock.seconds, 1e-9),
        "final_eval": {k: final[k] for k in ("timesteps", "mean_return", "std_return")}
        | {"episodes": len(final["returns"]), "mean_length": float(np.mean(final["lengths"]))},
        "best_mean_return": evaluator.best_mean_reward
        if math.isfinite(evaluator.best_mean_reward) else None,
        "vae": None if record is None else {
            k: record.get(k) for k in ("kind", "path", "checkpoint", "weights_hash")
        },
    }
    return summary


def hparams(cfg: Config) -> dict[str, Any]:
    """The run's hyperparameters for TensorBoard's HParams view: what defines its arm, and seed.

    ``obs_mode``, ``algo``, ``seed``, ``history``, ``timesteps``, then every other key of
    :func:`worldmodel.stages.defining_keys` (dotted); values that are not numbers, strings or
    booleans (lists, mappings, ``None``) are written as JSON text.
    """
    import json

    from worldmodel.stages import defining_keys, settings

    values = settings(cfg, STAGE, "output", "budget")
    out: dict[str, Any] = {
        "obs_mode": cfg.agent.obs_mode, "algo": cfg.agent.algo, "seed": cfg.seed,
        "history": cfg.agent.history, "timesteps": cfg.agent.timesteps,
    }
    for key in defining_keys(STAGE):
        if key.removeprefix("agent.") in out:
            continue
        value = values.get(key)
        ok = isinstance(value, (bool, int, float, str))
        out[key] = value if ok else json.dumps(value, sort_keys=True)
    return out


def write_hparams(out: Path, cfg: Config, final_mean_return: float, step: int) -> None:
    """Write :func:`hparams` with ``hparam/final_mean_return`` into the run's TensorBoard logs.

    They go into the run folder itself (what ``SummaryWriter.add_hparams(..., run_name=".")``
    does, in one events file instead of two), so TensorBoard's HParams view shows one row per
    run and compares arms and seeds.
    """
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    metrics = {"hparam/final_mean_return": float(final_mean_return)}
    with SummaryWriter(log_dir=str(out)) as writer:
        for summary in hparams_summaries(hparams(cfg), metrics):
            writer.file_writer.add_summary(summary)
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)


def _run_stage(cfg: Config, out: Path, inputs: Mapping[str, Any], resume: bool | None) -> Path:
    return run(cfg, out, vae=inputs.get("train-vae"), memory=inputs.get("train-memory"),
               resume=resume)


def agent_config(cfg: Config, mode: str, seed: int) -> Config:
    """The config of one agent run of the pipeline: ``cfg`` with its obs mode and seed."""
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.agent.obs_mode = mode
    run_cfg.seed = seed
    return run_cfg


#: The ``vae`` settings that ``build_vae`` reads: what an untrained encoder borrows of a VAE run.
VAE_ARCHITECTURE = ("vae.latent_dim", "vae.widths", "vae.decoder", "vae.broadcast_size")
#: The ``memory`` settings that ``build_memory`` reads: what an untrained M borrows of a memory run.
MEMORY_ARCHITECTURE = ("memory.hidden_size", "memory.mixtures")
#: The settings of the dream a mode that trains in it reads (not ``train-memory``'s key).
DREAM_SETTINGS = ("memory.temperature",)


def arms(cfg: Config) -> list[Variant]:
    """The pipeline's agent runs: one per ``pipeline.obs_modes`` x ``pipeline.seeds``.

    What each run reads follows its mode's row (:mod:`agents.modes`): modes with an encoder
    get the VAE run; only those that use its trained weights depend on its key, the others on
    its architecture (:data:`VAE_ARCHITECTURE`). Modes with M get the memory run too, keyed
    on it when they use its weights, else on its architecture (:data:`MEMORY_ARCHITECTURE`).
    Modes that train in the dream also read its temperature (:data:`DREAM_SETTINGS`).
    """
    out = []
    for name in cfg.pipeline.obs_modes:
        mode = get_mode(name, "pipeline.obs_modes")
        needs: tuple[str, ...] = ("train-vae",) if mode.needs_vae_run else ()
        keyed: tuple[str, ...] = needs if mode.uses_vae_weights else ()
        reads: tuple[str, ...] = (
            VAE_ARCHITECTURE if mode.needs_vae_run and not mode.uses_vae_weights else ())
        if mode.needs_memory_run:
            needs += ("train-memory",)
            if mode.uses_memory_weights:
                keyed += ("train-memory",)
            else:
                reads += MEMORY_ARCHITECTURE
        if mode.trains_in == "dream":
            reads += DREAM_SETTINGS
        for seed in cfg.pipeline.seeds:
            out.append(Variant(f"{name}__seed{seed}", agent_config(cfg, name, seed), needs,
                               keyed, reads))
    return out


#: ``train-agent`` reads ``seed``, ``env`` and ``agent``; the VAE run (for the modes that
#: have an encoder) and the memory run (modes with M) are inputs whose keys the pipeline adds
#: (see ``agents.modes``).
STAGE = StageSpec(
    "train-agent", "agent",
    reads=("seed", "env", "agent"),
    needs=("train-vae", "train-memory"),
    run=_run_stage,
    folder="agents",
    parallel=True,
    variants=arms,
)
