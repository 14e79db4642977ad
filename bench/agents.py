"""Agent speed, measured in one run: PPO on latents vs PPO on pixels, and the latent wrapper.

1. Env steps/s of PPO ``learn()`` on VAE latents (``obs_mode: latent``, MlpPolicy, the
   World-Models-size VAE encoding every frame inside the loop) vs on pixels (``obs_mode: pixel``,
   SB3's CnnPolicy), same env, 8 envs (the zoo's n_envs for Atari and CarRacing), history and
   hyperparameters; with SB3's default PPO hyperparameters (10 epochs of minibatches of 64 over
   every rollout; n_steps 512 instead of 2048 to fit the time budget -- the training cost per
   env step does not depend on n_steps) and with the zoo's Atari PPO hyperparameters (n_steps
   128, 4 epochs, batch 256, history 4). Target: latent / pixel >= 3 with the defaults. One
   more line repeats Pong with a VAE of half the widths (16-32-64-128, ~4x fewer MACs): the
   latent arm's cost is the encoder's, so this shows how the ratio depends on its size.
2. The latent VecEnv wrapper: random-action steps/s of ``VecLatentObservation`` (one batched
   forward pass per step) vs the raw VecEnv, and vs one ``LatentObservation`` per env (one
   forward pass per env and step).

The VAE is untrained (the compute is the same as a trained one's). Only ``learn()`` is timed
(model construction excluded). PyTorch uses ``--threads`` intra-op threads (default 1, the
project's ``agent.torch_threads`` default). Run: ``python -m bench.agents`` (about 3 minutes on
2 cores; run it on an otherwise idle machine).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from agents.hyperparams import parse_hyperparams
from agents.latent import LatentObservation, VecLatentObservation
from agents.modes import get_mode
from agents.wrapping import make_agent_env
from bench.common import compare, rate, torch_bench_args, verdict
from envs import make_env, make_vec_env
from worldmodel.config import Config, resolve_config
from worldmodel.vae import LoadedVAE, build_vae

ZOO_ATARI = {"n_steps": 128, "n_epochs": 4, "batch_size": 256, "learning_rate": "lin_2.5e-4",
             "clip_range": "lin_0.1", "vf_coef": 0.5, "ent_coef": 0.01}
ENVS = {
    "Reach": ["env.id=worldmodel/Reach-v0"],
    "Pong": ["env.id=ALE/Pong-v5", "env.grayscale=true", "env.frame_skip=4"],
}


def config(env: str, mode: str, n_envs: int, history: int, hyper: dict[str, Any],
           widths: str = "[32,64,128,256]") -> Config:
    cfg = resolve_config(None, [*ENVS[env], "env.image_size=64", f"env.n_envs={n_envs}",
                                f"agent.obs_mode={mode}", f"agent.history={history}",
                                f"vae.widths={widths}"])
    cfg.agent.hyperparams = hyper
    return cfg


def untrained_vae(cfg: Config) -> LoadedVAE:
    torch.manual_seed(0)
    return LoadedVAE(build_vae(cfg.vae, cfg.env), cfg)


def ppo_rate(cfg: Config, steps: int) -> float:
    """Env steps/s of ``PPO.learn(steps)`` in ``cfg.agent.obs_mode``."""
    mode = get_mode(cfg.agent.obs_mode)
    encoder = untrained_vae(cfg) if mode.frozen_encoder else None
    env = make_agent_env(cfg, encoder, n_envs=cfg.env.n_envs, seed=0)
    policy = mode.default_policy
    hyper = parse_hyperparams(cfg.agent.hyperparams, PPO)
    model = PPO(policy, env, seed=0, device="cpu", verbose=0, **hyper)
    start = time.perf_counter()
    model.learn(steps)
    elapsed = time.perf_counter() - start
    env.close()
    return model.num_timesteps / elapsed


_PIXEL: dict[str, float] = {}  # pixel-arm rates, reused by cases that only change the VAE


def ppo_case(name: str, env: str, n_envs: int, history: int, hyper: dict[str, Any],
             steps: int, target: float | None, widths: str = "[32,64,128,256]") -> None:
    key = repr((env, n_envs, history, hyper, steps))
    if key not in _PIXEL:
        _PIXEL[key] = ppo_rate(config(env, "pixel", n_envs, history, hyper), steps)
    pixel = _PIXEL[key]
    latent = ppo_rate(config(env, "latent", n_envs, history, hyper, widths), steps)
    ratio = latent / pixel
    check = verdict(ratio, target) if target is not None else "(no target)"
    print(f"{name:34s} {pixel:11.0f} {latent:12.0f} {ratio:8.2f}x  {check}", flush=True)


def vec_stepper(venv: VecEnv, steps: int) -> Callable[[], int]:
    venv.reset()
    venv.action_space.seed(0)
    n = venv.num_envs

    def work() -> int:
        for _ in range(steps):
            venv.step(np.array([venv.action_space.sample() for _ in range(n)]))
        return steps * n

    return work


def wrapper_case(env: str, n_envs: int, steps: int, seconds: float) -> None:
    cfg = config(env, "latent", n_envs, 1, {})
    vae = untrained_vae(cfg)
    raw, batched = compare(
        vec_stepper(make_vec_env(cfg.env, n_envs=n_envs, seed=0), steps),
        vec_stepper(VecLatentObservation(make_vec_env(cfg.env, n_envs=n_envs, seed=0), vae),
                    steps),
        seconds, rounds=2,
    )
    per_env = DummyVecEnv([lambda: LatentObservation(make_env(cfg.env), vae)] * n_envs)
    single = rate(vec_stepper(per_env, steps), seconds)
    print(f"{env + f' x{n_envs}':14s} {raw:10.0f} {batched:16.0f} {batched / raw:8.2f} "
          f"{single:18.0f} {batched / single:8.2f}x", flush=True)


def main() -> None:
    args = torch_bench_args(__doc__)
    q = 4 if args.quick else 1
    print(f"torch threads: {torch.get_num_threads()}, cores: {os.cpu_count()}")
    print(f"\n{'PPO learn(), 8 envs, env steps/s':34s} {'pixel':>11s} {'latent':>12s} "
          f"{'ratio':>9s}")
    default = {"n_steps": 512 // q}  # SB3's defaults otherwise (batch 64, 10 epochs)
    ppo_case("Reach, SB3 default PPO", "Reach", 8, 1, default, 8 * 512 // q, 3.0)
    ppo_case("Pong, SB3 default PPO", "Pong", 8, 1, default, 8 * 512 // q, 3.0)
    ppo_case("  same, VAE widths 16-32-64-128", "Pong", 8, 1, default, 8 * 512 // q, 3.0,
             "[16,32,64,128]")
    ppo_case("Reach, zoo Atari PPO, history 4", "Reach", 8, 4, ZOO_ATARI, 4096 // q, None)
    ppo_case("Pong, zoo Atari PPO, history 4", "Pong", 8, 4, ZOO_ATARI, 4096 // q, None)
    print(f"\n{'random actions':14s} {'raw VecEnv':>10s} {'VecLatentObs':>16s} {'/raw':>8s} "
          f"{'LatentObs per env':>18s} {'batched/per-env':>9s}")
    wrapper_case("Reach", 8, 50, 3.0 / q)
    wrapper_case("Pong", 8, 20, 3.0 / q)


if __name__ == "__main__":
    main()
