"""The agent run folder: which encoder it used, and how to rebuild its observation pipeline.

Training, evaluation and the collector's ``agent:PATH`` policy all build observations the same
way, from what the run folder records:

* ``config.yaml``: the resolved config (``env`` preprocessing, ``agent.obs_mode``, history...);
* ``vae.json``: the encoder of the latent modes -- the VAE run's path (absolute and relative to
  the agent run), checkpoint, weights hash, image shape, latent size and the VAE run's ``env``
  preprocessing; for ``random-encoder`` the untrained weights are in ``random_encoder.pt``.

Observation pipelines (``cfg.agent.obs_mode``):

* ``pixel``: frames, ``VecFrameStack(history)``, ``VecTransposeImage`` -> ``CnnPolicy``;
* ``latent`` / ``random-encoder``: ``VecLatentObservation(history)`` -> ``MlpPolicy``;
* ``latent-finetune``: frames as in ``pixel`` -> ``CnnPolicy`` with a ``VAEFeaturesExtractor``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from stable_baselines3.common.vec_env import (
    VecEnv,
    VecEnvWrapper,
    VecFrameStack,
    VecNormalize,
    VecTransposeImage,
)
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from agents.latent import VecLatentObservation
from worldmodel.errors import UserError
from worldmodel.io import atomic_write_json, read_json

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm

    from envs.config import EnvConfig
    from worldmodel.config import Config
    from worldmodel.vae import LoadedVAE

log = logging.getLogger("worldmodel")

VAE_RECORD = "vae.json"
RANDOM_WEIGHTS = "random_encoder.pt"
LATENT_MODES = ("latent", "random-encoder")  # a VAE wrapper in front of an MlpPolicy
PIXEL_MODES = ("pixel", "latent-finetune")  # frames reach the policy
#: Periodic and final evaluations use seeds ``seed + EVAL_SEED_OFFSET + i``, away from training's.
EVAL_SEED_OFFSET = 1000


#: An agent run's final evaluation (``worldmodel evaluate``), and the one it replaced.
EVAL_FILE, PREVIOUS_EVAL = "eval.json", "eval.previous.json"


def retire_eval(run_dir: Path) -> None:
    """Move ``eval.json`` aside as ``eval.previous.json`` (one generation is kept).

    Called before a new evaluation replaces it, and before training further makes it describe
    an older agent; ``compare`` reads only ``eval.json``.
    """
    path = run_dir / EVAL_FILE
    if path.exists():
        os.replace(path, run_dir / PREVIOUS_EVAL)
        log.info("%s: kept the previous evaluation as %s", run_dir, PREVIOUS_EVAL)


def algo_class(name: str) -> type[BaseAlgorithm]:
    """The SB3 algorithm class called ``name`` (PPO, A2C, SAC, TD3, DQN)."""
    import stable_baselines3

    cls: type[BaseAlgorithm] = getattr(stable_baselines3, name)
    return cls


def agent_device(cfg: Config) -> torch.device:
    """The agent's torch device, with ``agent.torch_threads`` intra-op CPU threads.

    Small policies run batch-1 inference at every env step; with more than one thread they are
    ~100x slower when other processes share the cores (measured: NatureCNN forward on one 36x36
    frame 0.34 ms with 1 thread, 36 ms with 2 under load).
    """
    from worldmodel.utils import resolve_device

    device = resolve_device(cfg.agent.device)
    if cfg.agent.torch_threads > 0:
        torch.set_num_threads(cfg.agent.torch_threads)
    return device


def check_vae_matches_env(vae: LoadedVAE, env_cfg: EnvConfig) -> None:
    """Raise when the VAE cannot take ``env_cfg``'s frames; warn when they look different.

    Shape and channels must match (``UserError``). Other preprocessing differences (another game,
    crop, frame skip, env kwargs) are legal -- transfer is a valid experiment -- but are logged
    as warnings because they usually are mistakes.
    """
    where = f"VAE run {vae.run_dir}" if vae.run_dir is not None else "the VAE"
    if vae.image_shape != env_cfg.obs_shape:
        h, w, c = vae.image_shape
        raise UserError(
            f"{where} takes {h}x{w}x{c} frames but env {env_cfg.id} gives "
            f"{'x'.join(map(str, env_cfg.obs_shape))} (env.image_size={env_cfg.image_size}, "
            f"env.grayscale={str(env_cfg.grayscale).lower()}); set env.image_size={h} "
            f"env.grayscale={str(c == 1).lower()} or train a VAE on these frames"
        )
    theirs = vae.config.env.preprocessing()
    ours = env_cfg.preprocessing()
    diff = sorted(k for k in ours if ours[k] != theirs.get(k))
    if diff:
        details = ", ".join(f"{k}: {theirs.get(k)!r} vs {ours[k]!r}" for k in diff)
        log.warning("%s was trained on other frames than this agent's env (%s)", where, details)


def _vae_record(vae: LoadedVAE, cfg: Config, run_dir: Path, kind: str) -> dict[str, Any]:
    path = Path(vae.run_dir).resolve() if vae.run_dir is not None else None
    record: dict[str, Any] = {
        "kind": kind,
        "obs_mode": cfg.agent.obs_mode,
        "path": str(path) if path is not None else None,
        "relpath": os.path.relpath(path, run_dir.resolve()) if path is not None else None,
        "checkpoint": cfg.agent.vae_checkpoint,
        "weights_hash": vae.weights_hash,
        "image_shape": list(vae.image_shape),
        "latent_dim": vae.latent_dim,
        "vae": vae.config.vae.model_dump(mode="json"),
        "env": vae.config.env.preprocessing(),
    }
    if path is not None and (path / "summary.json").is_file():
        record["vae_summary"] = read_json(path / "summary.json")
    return record


def prepare_encoder(
    cfg: Config, vae_path: Path | None, run_dir: Path
) -> tuple[LoadedVAE | None, dict[str, Any] | None]:
    """The encoder a fresh run uses, checked against the env; writes ``vae.json``.

    :param cfg: the run config.
    :param vae_path: the ``--vae`` run folder, or ``None``.
    :param run_dir: the agent run folder (created by the caller).
    :return: ``(encoder, record)``; both ``None`` in ``pixel`` mode.
    :raises UserError: no ``--vae`` in ``latent``/``latent-finetune``, or a VAE whose frames
        differ from the env's.
    """
    from worldmodel.vae import LoadedVAE, build_vae, load_vae, save_checkpoint

    mode = cfg.agent.obs_mode
    if mode in ("latent", "latent-finetune") and vae_path is None:
        raise UserError(
            f"agent.obs_mode={mode} needs a trained VAE: pass --vae VAE_RUN (a train-vae run "
            "folder), or use obs_mode pixel or random-encoder"
        )
    if mode == "pixel":
        if vae_path is not None:
            log.warning("obs_mode pixel: --vae %s is not used", vae_path)
        return None, None
    vae = load_vae(Path(vae_path), cfg.agent.vae_checkpoint) if vae_path is not None else None
    if vae is not None:
        check_vae_matches_env(vae, cfg.env)
    if mode != "random-encoder":
        assert vae is not None
        record = _vae_record(vae, cfg, run_dir, "vae")
    else:
        # Same architecture as the given VAE (or cfg.vae), untrained, seeded by cfg.seed.
        vae_cfg = vae.config.vae if vae is not None else cfg.vae
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = build_vae(vae_cfg, cfg.env)
        save_checkpoint(run_dir / RANDOM_WEIGHTS, {"model": model.state_dict()})
        random_vae = LoadedVAE(model, cfg.model_copy(update={"vae": vae_cfg}))
        record = _vae_record(random_vae, cfg, run_dir, "random")
        record["architecture_from"] = str(Path(vae_path).resolve()) if vae_path else None
        record["weights_file"] = RANDOM_WEIGHTS
        vae = random_vae
    atomic_write_json(run_dir / VAE_RECORD, record)
    return vae, record


def read_vae_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``vae.json``, or ``None`` when it used no encoder (``pixel``)."""
    path = Path(run_dir) / VAE_RECORD
    return read_json(path) if path.is_file() else None


def locate_vae_run(record: dict[str, Any], run_dir: Path) -> Path | None:
    """The recorded VAE run folder: relative to the agent run first, then the absolute path."""
    for candidate in (
        Path(run_dir) / record["relpath"] if record.get("relpath") else None,
        Path(record["path"]) if record.get("path") else None,
    ):
        if candidate is not None and (candidate / "config.yaml").is_file():
            return candidate
    return None


def load_encoder(run_dir: Path, cfg: Config) -> LoadedVAE | None:
    """Rebuild the frozen encoder of a ``latent``/``random-encoder`` run from its ``vae.json``.

    ``None`` for the modes whose policy sees frames (``pixel``, ``latent-finetune``).

    :raises UserError: when the VAE run is gone or its weights changed since (hash mismatch).
    """
    from worldmodel.vae import LoadedVAE, build_vae, load_checkpoint, load_vae

    run_dir = Path(run_dir)
    record = read_vae_record(run_dir)
    if cfg.agent.obs_mode not in LATENT_MODES:  # finetune: the policy holds its own encoder
        return None
    if record is None:
        raise UserError(f"{run_dir} has no {VAE_RECORD}: it is not a complete agent run")
    if record["kind"] == "random":
        vae_cfg = model_cfg(record)
        model = build_vae(vae_cfg, cfg.env)
        model.load_state_dict(load_checkpoint(run_dir / record["weights_file"])["model"])
        vae = LoadedVAE(model, cfg.model_copy(update={"vae": vae_cfg}))
    else:
        path = locate_vae_run(record, run_dir)
        if path is None:
            raise UserError(
                f"{run_dir} was trained on the VAE run {record['path']}, which is gone; "
                "restore it there (or next to the agent run as recorded in vae.json)"
            )
        vae = load_vae(path, record["checkpoint"])
    if vae.weights_hash != record["weights_hash"]:
        raise UserError(
            f"the VAE weights of {record.get('path') or run_dir} changed since {run_dir} was "
            f"trained (hash {vae.weights_hash[:12]} != recorded {record['weights_hash'][:12]}); "
            "restore the original VAE run"
        )
    return vae


def model_cfg(record: dict[str, Any]) -> Any:
    """The ``VAEConfig`` recorded in ``vae.json``."""
    from worldmodel.config import VAEConfig

    return VAEConfig.model_validate(record["vae"])


def wrap_observations(venv: VecEnv, cfg: Config, encoder: LoadedVAE | None) -> VecEnv:
    """Raw frames -> what the policy observes, for ``cfg.agent.obs_mode``."""
    history = cfg.agent.history
    if cfg.agent.obs_mode in LATENT_MODES:
        assert encoder is not None
        return VecLatentObservation(venv, encoder, history=history, latent=cfg.agent.latent)
    if history > 1:
        venv = VecFrameStack(venv, history, channels_order="last")
    return VecTransposeImage(venv)


class VecFrameRecorder(VecEnvWrapper):
    """Keep env 0's raw frames ``uint8 (H, W, C)`` of its first episode, for a video.

    ``frames[t]`` is the frame the agent saw before its ``t``-th action, so there are as many
    frames as steps; ``episode`` holds Monitor's ``{"r": return, "l": length}`` once it ends.
    """

    def __init__(self, venv: VecEnv) -> None:
        super().__init__(venv)
        self.frames: list[np.ndarray] = []
        self.episode: dict[str, float] | None = None

    def reset(self) -> np.ndarray:
        """Reset; record env 0's first frame."""
        obs = self.venv.reset()
        assert isinstance(obs, np.ndarray)
        if self.episode is None and not self.frames:
            self.frames.append(obs[0].copy())
        return obs

    def step_wait(self) -> VecEnvStepReturn:
        """Step; record env 0's next frame until its first episode ends."""
        obs, rewards, dones, infos = self.venv.step_wait()
        assert isinstance(obs, np.ndarray)
        if self.episode is None:
            if dones[0]:
                self.episode = dict(infos[0].get("episode", {"r": np.nan, "l": len(self.frames)}))
            else:
                self.frames.append(obs[0].copy())
        return obs, rewards, dones, infos


def make_agent_env(
    cfg: Config,
    encoder: LoadedVAE | None,
    *,
    n_envs: int,
    seed: int,
    training: bool = True,
    gamma: float = 0.99,
    normalize_from: Path | None = None,
    recorder: bool = False,
) -> VecEnv:
    """Build the VecEnv an agent trains or is evaluated on.

    :param cfg: the run config (``env`` and ``agent`` sections).
    :param encoder: the VAE of the latent modes.
    :param n_envs: parallel envs.
    :param seed: env ``i`` is seeded ``seed + i``.
    :param training: ``False`` for evaluation envs (reward normalisation frozen and off).
    :param gamma: discount of the reward normalisation.
    :param normalize_from: a saved ``VecNormalize`` (``vecnormalize.pkl``) to restore.
    :param recorder: insert a :class:`VecFrameRecorder` above the raw frames.
    """
    from envs import make_vec_env

    venv = make_vec_env(cfg.env, n_envs=n_envs, seed=seed)
    if recorder:
        venv = VecFrameRecorder(venv)
    venv = wrap_observations(venv, cfg, encoder)
    if cfg.agent.normalize_reward:
        if normalize_from is not None and normalize_from.is_file():
            venv = VecNormalize.load(str(normalize_from), venv)
            venv.training, venv.norm_reward = training, training
        else:
            venv = VecNormalize(
                venv, training=training, norm_obs=False, norm_reward=training, gamma=gamma
            )
    return venv


def find_wrapper(venv: VecEnv, cls: type[VecEnvWrapper]) -> Any:
    """The first wrapper of type ``cls`` in a VecEnv stack, or ``None``."""
    env: Any = venv
    while isinstance(env, VecEnvWrapper):
        if isinstance(env, cls):
            return env
        env = env.venv
    return None


def policy_and_kwargs(
    cfg: Config, record: dict[str, Any] | None, *, for_loading: bool = False
) -> tuple[str, dict[str, Any]]:
    """The SB3 policy name and the policy_kwargs our obs mode adds to the user's.

    :param for_loading: build the finetune extractor without reading the VAE run (a saved
        policy brings its own weights).
    """
    from agents.extractor import VAEFeaturesExtractor

    mode = cfg.agent.obs_mode
    name = cfg.agent.policy or ("CnnPolicy" if mode in PIXEL_MODES else "MlpPolicy")
    if mode != "latent-finetune":
        return name, {}
    assert record is not None
    kwargs: dict[str, Any] = {
        "vae_run": None if for_loading else record["path"],
        "checkpoint": record["checkpoint"],
        "latent_dim": record["latent_dim"],
        "widths": list(record["vae"]["widths"]),
        "channels": record["image_shape"][2],
        "latent": cfg.agent.latent,
    }
    return name, {
        "features_extractor_class": VAEFeaturesExtractor,
        "features_extractor_kwargs": kwargs,
    }


def full_policy_kwargs(
    cfg: Config, record: dict[str, Any] | None, user: dict[str, Any], *, for_loading: bool = False
) -> tuple[str, dict[str, Any]]:
    """Policy name and policy_kwargs: the user's (parsed) ones plus those of the obs mode."""
    name, extra = policy_and_kwargs(cfg, record, for_loading=for_loading)
    if "features_extractor_class" in extra and "features_extractor_class" in user:
        log.warning("obs_mode latent-finetune: ignoring policy_kwargs.features_extractor_class")
    return name, {**user, **extra}


def load_model(
    run_dir: Path,
    cfg: Config,
    checkpoint: Path,
    *,
    env: VecEnv | None = None,
    device: str | torch.device = "cpu",
) -> BaseAlgorithm:
    """Load a saved agent (``last.zip``/``best_model.zip``) without needing its VAE run.

    :raises UserError: when the file is missing or unreadable.
    """
    from agents.hyperparams import parse_hyperparams

    if not checkpoint.is_file():
        raise UserError(f"{checkpoint} not found; train the agent first (worldmodel train-agent)")
    algo = algo_class(cfg.agent.algo)
    custom: dict[str, Any] = {}
    if cfg.agent.obs_mode == "latent-finetune":
        user = parse_hyperparams(cfg.agent.hyperparams, algo).get("policy_kwargs", {})
        _, kwargs = full_policy_kwargs(cfg, read_vae_record(run_dir), user, for_loading=True)
        custom["policy_kwargs"] = kwargs
    try:
        return algo.load(checkpoint, env=env, device=device, custom_objects=custom)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{checkpoint}: cannot load the agent ({type(e).__name__}: {e})") from e
