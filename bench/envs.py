"""Env steps/s per family: raw ``gymnasium.make`` vs through ``envs.make_env`` (our wrappers).

Target: wrapper overhead <= 10% (ratio ours/raw >= 0.9). Raw envs step with the same actions and
the same frame skip as ours, but keep their native frames; ours add crop/resize/grayscale. For
Atari, "raw" is the env ``AtariPreprocessing`` wraps (``frameskip=1``) stepped ``frame_skip``
times, the same emulator work; a second line compares with ALE's faster internal frame skip.
Run: ``python bench/envs.py`` (about a minute).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
# Run as a script, Python puts bench/ first on sys.path, where this file would shadow the `envs`
# package: put the repo root there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import gymnasium as gym

import envs
from bench.common import compare, verdict
from envs import EnvConfig, make_env


def stepper(env: gym.Env[Any, Any], steps: int) -> Callable[[], int]:
    env.reset(seed=0)
    env.action_space.seed(0)

    def work() -> int:
        for _ in range(steps):
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            if terminated or truncated:
                env.reset()
        return steps

    return work


def raw_env(cfg: EnvConfig) -> gym.Env[Any, Any]:
    family = envs.env_family(cfg.id)
    if family == "atari":  # the env AtariPreprocessing wraps, stepped frame_skip times
        obs_type = "grayscale" if cfg.grayscale else "rgb"
        base = gym.make(cfg.id, frameskip=1, obs_type=obs_type, **cfg.kwargs)
        return envs.wrappers.FrameSkip(base, cfg.frame_skip)
    if family == "render":
        return gym.wrappers.AddRenderObservation(
            gym.make(cfg.id, render_mode="rgb_array", **cfg.kwargs), render_only=True
        )
    env: gym.Env[Any, Any] = gym.make(cfg.id, **cfg.kwargs)
    return envs.wrappers.FrameSkip(env, cfg.frame_skip) if cfg.frame_skip > 1 else env


CASES = [
    ("Reach-v0 64x64", EnvConfig(), 2000, 2.0),
    ("CartPole-v1 rendered", EnvConfig(id="CartPole-v1"), 100, 2.0),
    ("CarRacing-v3", EnvConfig(id="CarRacing-v3", frame_skip=2), 30, 3.0),
]
try:
    import ale_py  # noqa: F401

    CASES += [
        ("ALE/Pong-v5", EnvConfig(id="ALE/Pong-v5", frame_skip=4, grayscale=True), 200, 2.0),
        ("ALE/Breakout-v5", EnvConfig(id="ALE/Breakout-v5", frame_skip=4, grayscale=True), 200,
         2.0),
    ]
except ImportError:
    print("(Atari skipped: pip install 'worldmodel[atari]')")


def main() -> None:
    print(f"{'env':24s} {'raw steps/s':>12s} {'ours steps/s':>13s} {'ours/raw':>9s}  target>=0.9")
    for name, cfg, steps, seconds in CASES:
        raw, ours = compare(stepper(raw_env(cfg), steps), stepper(make_env(cfg), steps), seconds)
        ratio = ours / raw
        print(f"{name:24s} {raw:12.0f} {ours:13.0f} {ratio:9.2f}  {verdict(ratio, 0.9)}")
        if envs.env_family(cfg.id) == "atari":
            obs_type = "grayscale" if cfg.grayscale else "rgb"
            # Context: ALE skipping frames inside C++ (no max-pooling, no Python per frame).
            native = gym.make(cfg.id, frameskip=cfg.frame_skip, obs_type=obs_type, **cfg.kwargs)
            internal, ours = compare(stepper(native, steps), stepper(make_env(cfg), steps), seconds)
            print(f"{'  vs ALE internal skip':24s} {internal:12.0f} {ours:13.0f} "
                  f"{ours / internal:9.2f}  (context; EnvPool is the fast Atari route)")


if __name__ == "__main__":
    main()
