"""``worldmodel evaluate RUN``: returns and episode lengths of a trained agent, and a video.

``RUN/eval.json`` holds every episode's return and length plus their mean, std, min and max.
With ``video=True``, ``RUN/video.mp4`` (``video.gif`` without ffmpeg) shows the first episode of
env 0, upscaled with nearest neighbours (64x64 frames become 256x256); for the encoder modes it
shows, side by side, the frame
and the VAE's reconstruction of the latent the agent observes (for ``latent-finetune``: the
fine-tuned encoder's ``mu`` through the original VAE decoder; for ``random-encoder`` the
"reconstruction" is noise, which is the point of that control).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from stable_baselines3.common.evaluation import evaluate_policy

from agents.encoders import load_encoder, locate_recorded_run, read_vae_record
from agents.features import load_features
from agents.memory_obs import load_agent_memory
from agents.models import agent_device, load_model
from agents.modes import get_mode
from agents.wrapping import EVAL_SEED_OFFSET, VecFrameRecorder, find_wrapper, make_agent_env
from worldmodel.errors import UserError
from worldmodel.io import atomic_write_json
from worldmodel.media import write_video
from worldmodel.runfolder import LOCK_FILE, FolderLock, require_kind
from worldmodel.stages import StageSpec

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm

    from worldmodel.config import Config
    from worldmodel.vae import LoadedVAE

log = logging.getLogger("worldmodel")

#: Videos are upscaled (nearest neighbour) to at least this many pixels high.
VIDEO_HEIGHT = 256

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


def _stats(values: Sequence[float], name: str) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        f"mean_{name}": float(a.mean()),
        f"std_{name}": float(a.std()),
        f"min_{name}": float(a.min()),
        f"max_{name}": float(a.max()),
    }


def _rgb(frames: np.ndarray) -> np.ndarray:
    """``(T, H, W, C)`` uint8 with C in {1, 3} -> ``(T, H, W, 3)``."""
    return np.repeat(frames, 3, axis=-1) if frames.shape[-1] == 1 else frames


def compose_video(frames: np.ndarray, recon: np.ndarray | None = None) -> np.ndarray:
    """Video frames: the env frames (and reconstructions to their right), upscaled.

    :param frames: ``(T, H, W, C)`` uint8.
    :param recon: ``(T, H, W, C)`` uint8 or ``None``.
    :return: ``(T, s*H, s*W or 2*s*W, 3)`` uint8 with ``s = ceil(256 / H)``.
    """
    video = _rgb(frames)
    if recon is not None:
        video = np.concatenate([video, _rgb(recon)], axis=2)
    scale = max(1, -(-VIDEO_HEIGHT // frames.shape[1]))
    return np.repeat(np.repeat(video, scale, axis=1), scale, axis=2)


def _finetune_recon(
    model: BaseAlgorithm, run: Path, frames: np.ndarray
) -> np.ndarray | None:
    """The fine-tuned encoder's ``mu`` decoded by the original VAE's decoder."""
    from agents.extractor import vae_extractors
    from worldmodel.vae import frames_to_tensor, load_vae

    record = read_vae_record(run)
    path = locate_recorded_run(record, run) if record else None
    extractors = vae_extractors(model.policy)
    if path is None or not extractors or record is None:
        log.warning("no reconstruction in the video: the VAE run of %s is not available", run)
        return None
    vae = load_vae(path, record["checkpoint"])
    with torch.no_grad():
        z = extractors[0].encode_frames(frames_to_tensor(frames, model.device))
    return vae.decode(z.cpu())


def _recon(
    cfg: Config, encoder: LoadedVAE | None, model: BaseAlgorithm, run: Path, frames: np.ndarray
) -> np.ndarray | None:
    if get_mode(cfg.agent.obs_mode).encoder_in_policy:
        return _finetune_recon(model, run, frames)
    if encoder is None:
        return None
    return encoder.decode(encoder.encode(frames, mode=cfg.agent.latent))


def run(
    run: Path,
    episodes: int = 10,
    video: bool = False,
    deterministic: bool | None = None,
    seed: int | None = None,
    checkpoint: Literal["last", "best"] = "last",
) -> Path:
    """Evaluate an agent run; write ``RUN/eval.json`` (and ``RUN/video.mp4``).

    An existing ``eval.json`` is kept as ``eval.previous.json`` (replacing an older one there).

    :param run: the agent run folder.
    :param episodes: episodes to play.
    :param video: also write a video of env 0's first episode.
    :param deterministic: greedy actions instead of sampling from the policy; ``None``: as the
        run's periodic evaluations did (``agent.eval_deterministic``, recorded in ``eval.json``).
    :param seed: seed of the evaluation envs (default: the run's seed + 1000).
    :param checkpoint: ``last`` (``last.zip``, the end of training) or ``best``
        (``best_model.zip``, chosen on the periodic evaluations: optimistic).
    :return: the path of ``eval.json``.
    """
    run = require_kind(Path(run), "agent", "agent run")
    if episodes < 1:
        raise UserError(f"--episodes must be >= 1, got {episodes}")
    lock = FolderLock(run / LOCK_FILE)  # not while train-agent (or another evaluate) writes it
    lock.acquire(f"agent run {run}")
    try:
        return _evaluate(run, episodes, video, deterministic, seed, checkpoint)
    finally:
        lock.release()


def _evaluate(run: Path, episodes: int, video: bool, deterministic: bool | None,
              seed: int | None, checkpoint: Literal["last", "best"]) -> Path:
    from worldmodel.config import load_run_config

    cfg = load_run_config(run)
    if deterministic is None:
        deterministic = cfg.agent.eval_deterministic
    zip_path = run / ("last.zip" if checkpoint == "last" else "best_model.zip")
    encoder = load_encoder(run, cfg)
    memory = load_agent_memory(run, cfg)
    features = load_features(run, encoder, memory)  # None for runs without features.json
    seed = cfg.seed + EVAL_SEED_OFFSET if seed is None else seed
    n_envs = min(episodes, cfg.agent.eval_envs)
    env = make_agent_env(cfg, encoder, n_envs=n_envs, seed=seed, training=False, recorder=video,
                         memory=memory, features=features)
    try:
        model = load_model(run, cfg, zip_path, device=agent_device(cfg),
                           action_space=env.action_space)
        model.set_random_seed(seed)
        returns, lengths = evaluate_policy(
            model, env, n_eval_episodes=episodes, deterministic=deterministic,
            return_episode_rewards=True, warn=False,
        )
        assert isinstance(returns, list) and isinstance(lengths, list)
        result: dict[str, Any] = {
            "run": str(run),
            "checkpoint": zip_path.name,
            "timesteps": int(model.num_timesteps),
            "obs_mode": cfg.agent.obs_mode,
            "episodes": episodes,
            "deterministic": deterministic,
            "seed": seed,
            **_stats(returns, "return"),
            **_stats(lengths, "length"),
            "returns": [float(r) for r in returns],
            "lengths": [int(n) for n in lengths],
            "video": None,
        }
        if video:
            result["video"] = _video(cfg, encoder, model, run, env)
    finally:
        env.close()
    path = run / EVAL_FILE
    retire_eval(run)  # e.g. the pipeline's final evaluation, before a quick `evaluate --video`
    atomic_write_json(path, result)
    log.info("%s: return %.2f +- %.2f over %d episodes", run, result["mean_return"],
             result["std_return"], episodes)
    return path


def _video(
    cfg: Config, encoder: LoadedVAE | None, model: BaseAlgorithm, run: Path, env: Any
) -> dict[str, Any]:
    recorder = find_wrapper(env, VecFrameRecorder)
    frames = np.stack(recorder.frames)
    recon = _recon(cfg, encoder, model, run, frames)
    fps = float(env.metadata.get("render_fps") or 30) / cfg.env.frame_skip
    path = write_video(run / "video", compose_video(frames, recon), fps=max(1.0, fps))
    episode = recorder.episode or {}
    return {
        "path": path.name,
        "frames": len(frames),
        "reconstruction": recon is not None,
        "fps": max(1.0, fps),
        "return": float(episode.get("r", np.nan)),
        "length": int(episode.get("l", len(frames))),
    }


def _run_stage(cfg: Config, out: Path, inputs: Mapping[str, Any], resume: bool | None) -> Path:
    run(out, episodes=cfg.pipeline.eval_episodes, deterministic=cfg.agent.eval_deterministic)
    return out


#: ``evaluate`` scores each agent run once more (``pipeline.eval_episodes`` episodes).
STAGE = StageSpec(
    "evaluate", "agent",
    reads=("pipeline.eval_episodes", "agent.eval_deterministic"),
    needs=("train-agent",),
    run=_run_stage,
    parallel=True,
    per_run=True,
)
