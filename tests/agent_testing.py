"""Helpers of the agent tests: a small saved VAE run and tiny, fast agent configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from worldmodel.config import Config, resolve_config
from worldmodel.vae import build_vae, save_checkpoint

SIZE = 32  # image side of the encoder tests (a 2-conv VAE)
PIXEL_SIZE = 36  # NatureCNN needs >= 36 px
VAE_SETTINGS = ["vae.widths=[8,16]", "vae.latent_dim=6"]

#: Tiny budgets per algorithm: a few hundred steps, updates after a few dozen.
ALGO_HYPERPARAMS: dict[str, dict[str, Any]] = {
    "PPO": {"n_steps": 32, "batch_size": 32, "n_epochs": 1},
    "A2C": {"n_steps": 8},
    "SAC": {"buffer_size": 400, "learning_starts": 32, "batch_size": 16, "train_freq": 4},
    "TD3": {"buffer_size": 400, "learning_starts": 32, "batch_size": 16, "train_freq": 4},
    "DQN": {"buffer_size": 400, "learning_starts": 32, "batch_size": 16, "train_freq": 4,
            "target_update_interval": 50},
}


def make_vae_run(path: Path, *overrides: str, seed: int = 1234, size: int = SIZE) -> Path:
    """A ``train-vae``-style run folder (config.yaml, best.pt, last.pt) of an untrained VAE."""
    cfg = resolve_config(None, [f"env.image_size={size}", *VAE_SETTINGS, *overrides])
    torch.manual_seed(seed)
    model = build_vae(cfg.vae, cfg.env)
    path.mkdir(parents=True, exist_ok=True)
    cfg.save(path / "config.yaml")
    for name in ("best.pt", "last.pt"):
        save_checkpoint(path / name, {"model": model.state_dict()})
    return path


def agent_config(
    mode: str = "latent",
    algo: str = "PPO",
    *overrides: str,
    timesteps: int = 128,
    size: int | None = None,
    hyperparams: dict[str, Any] | None = None,
) -> Config:
    """A config that trains ``algo`` for ``timesteps`` on short Reach episodes."""
    size = size or (PIXEL_SIZE if mode == "pixel" else SIZE)
    continuous = ["env.kwargs.continuous=true"] if algo in ("SAC", "TD3") else []
    cfg = resolve_config(None, [
        f"env.image_size={size}", "env.n_envs=2", "env.max_episode_steps=20",
        *continuous, *VAE_SETTINGS,
        f"agent.algo={algo}", f"agent.obs_mode={mode}", f"agent.timesteps={timesteps}",
        "agent.eval_every=64", "agent.eval_episodes=2", "agent.checkpoint_every=64",
        "agent.history=2", "agent.device=cpu",
        "agent.standardize=false",  # their VAE runs record no dataset (tests/test_features.py)
        *overrides,
    ])
    cfg.agent.hyperparams = dict(ALGO_HYPERPARAMS[algo] if hyperparams is None else hyperparams)
    return cfg
