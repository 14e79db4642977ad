"""Env steps/s per family: raw ``gymnasium.make`` vs through ``envs.make_env`` (our wrappers).

Target: wrapper overhead <= 10% (ratio ours/raw >= 0.9). Raw envs step with the same actions and
the same frame skip as ours, but keep their native frames; ours add crop/resize/grayscale. For
Atari, "raw" is the env ``AtariPreprocessing`` wraps (``frameskip=1``) stepped ``frame_skip``
times, the same emulator work; a second line compares with ALE's faster internal frame skip.
Run: ``python bench/envs.py`` (about four minutes; ``python bench/envs.py envpool`` runs only the
EnvPool lines).

EnvPool backend (``env.backend: envpool``, issue 9; skipped without ``worldmodel[fast]``):

* CarRacing-v3 agent steps/s with ``configs/carracing.yaml``'s env (64x64 grayscale, frame skip
  2, dashboard crop) through our preprocessing: the Gymnasium backend (one env) vs the EnvPool
  SB3 VecEnv (4 envs) with 1 and with 2 EnvPool threads. Targets: EnvPool 1 thread >= 10x
  Gymnasium; 2 threads >= 1.8x 1 thread. Raw EnvPool (same envs, no preprocessing) is printed
  as the ceiling of both ratios on this machine at this moment.
* The collector on EnvPool (``worldmodel collect``, 2 envs in one pool, 2 threads, random
  policy; frames/s while it runs, from its run record) vs raw EnvPool (the same 2 envs and 2
  threads stepped directly with random actions, ``frame_skip`` raw steps per frame, no
  preprocessing, policy or storage). Target >= 0.9.
* Pong and Breakout with ``configs/pong.yaml``'s env (64x64 grayscale, frame skip 4): the
  EnvPool backend vs ALE through Gymnasium (our backends), one env each and ``n_envs`` (8) envs
  as agents train them (Gymnasium's DummyVecEnv on one core vs EnvPool's VecEnv with 1 and 2
  threads). Context, no target.
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

import json
import tempfile

import gymnasium as gym
import numpy as np

import envs
from bench.common import compare, rate, verdict
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


def vec_stepper(venv: Any, steps: int) -> Callable[[], int]:
    """Step a VecEnv with uniform random actions (drawn in one call per step)."""
    venv.reset()
    rng = np.random.default_rng(0)
    space, n = venv.action_space, venv.num_envs

    def sample() -> np.ndarray:
        if isinstance(space, gym.spaces.Discrete):
            return rng.integers(space.n, size=n)
        return rng.uniform(space.low, space.high, (n, *space.shape)).astype(np.float32)

    def work() -> int:
        for _ in range(steps):
            venv.step(sample())
        return steps * n

    return work


def interleaved(works: list[Callable[[], int]], seconds: float, rounds: int = 3) -> list[float]:
    """Best rate of each work over ``rounds`` interleaved runs (A B C A B C ...)."""
    best = [0.0] * len(works)
    for _ in range(rounds):
        for i, work in enumerate(works):
            best[i] = max(best[i], rate(work, seconds))
    return best


def raw_envpool(cfg: EnvConfig, n_envs: int, threads: int, frames: int) -> Callable[[], int]:
    """EnvPool alone: ``n_envs`` raw envs, random actions, ``frame_skip`` raw steps per frame."""
    import envpool

    from envs.envpool import envpool_task, pool_kwargs

    task, family = envpool_task(cfg.id)
    pool = envpool.make_gymnasium(task, num_envs=n_envs, batch_size=n_envs, num_threads=threads,
                                  seed=list(range(n_envs)), **pool_kwargs(cfg, task, family))
    pool.reset()
    rng = np.random.default_rng(0)
    low, high = np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32)
    skip = cfg.frame_skip if family == "carracing" else 1

    def work() -> int:
        for _ in range(frames // n_envs):
            action = rng.uniform(low, high, (n_envs, 3)).astype(np.float32)
            for _ in range(skip):
                pool.step(action)  # EnvPool resets ended envs by itself
        return frames // n_envs * n_envs

    return work


def collector_fps(overrides: list[str], frames: int) -> float:
    """Frames/s of ``worldmodel collect`` while it runs (its run record), into a temp folder."""
    from worldmodel.collect import run
    from worldmodel.config import resolve_config

    cfg = resolve_config(None, [*overrides, f"collect.frames={frames}"])
    with tempfile.TemporaryDirectory() as tmp:
        run(cfg, Path(tmp) / "data")
        record = json.loads((Path(tmp) / "data" / "manifest.json").read_text())["runs"][-1]
    return float(record["fps"])


def carracing_lines(car: EnvConfig) -> None:
    """Gymnasium vs EnvPool backend (1 and 2 threads), with raw EnvPool as the ceiling."""
    from envs.envpool_vec import make_envpool_vec_env

    pooled = car.model_copy(update={"backend": "envpool"})
    print(f"\nEnvPool backend, CarRacing-v3 {car.image_size}x{car.image_size} "
          f"{'gray' if car.grayscale else 'RGB'}, frame skip {car.frame_skip} (agent steps/s)")
    works = [stepper(make_env(car), 10),
             vec_stepper(make_envpool_vec_env(pooled, n_envs=4, num_threads=1), 25),
             vec_stepper(make_envpool_vec_env(pooled, n_envs=4, num_threads=2), 25),
             raw_envpool(pooled, n_envs=4, threads=1, frames=100),
             raw_envpool(pooled, n_envs=4, threads=2, frames=100)]
    gym_rate, one, two, raw_one, raw_two = interleaved(works, seconds=3.0)
    print(f"{'  gymnasium backend, 1 env':34s} {gym_rate:7.0f}")
    print(f"{'  envpool backend, 4 envs, 1 thread':34s} {one:7.0f}  x{one / gym_rate:5.2f} vs "
          f"gymnasium   target>=10   {verdict(one / gym_rate, 10)}")
    print(f"{'  envpool backend, 4 envs, 2 threads':34s} {two:7.0f}  x{two / one:5.2f} vs 1 thread "
          f"   target>=1.8  {verdict(two / one, 1.8)}")
    print(f"{'  raw EnvPool, 4 envs, 1 / 2 threads':34s} {raw_one:7.0f} / {raw_two:.0f}  "
          f"(ceilings: x{raw_one / gym_rate:.2f} vs gymnasium, x{raw_two / raw_one:.2f} "
          "2 vs 1 thread)")


def collector_line(car: EnvConfig) -> None:
    """The collector on EnvPool vs raw EnvPool, same envs and threads."""
    from worldmodel.utils import setup_logging

    setup_logging(-1)
    pooled = car.model_copy(update={"backend": "envpool"})
    overrides = [f"env.{k}={json.dumps(v)}" for k, v in pooled.model_dump(
        include={"id", "backend", "image_size", "grayscale", "frame_skip"}).items()]
    overrides += ["collect.workers=2", "collect.policy=random", "collect.chunk_frames=256"]
    raw = raw_envpool(pooled, n_envs=2, threads=2, frames=400)
    best_raw = best_collect = 0.0
    for _ in range(3):
        best_raw = max(best_raw, rate(raw, 4.0))
        best_collect = max(best_collect, collector_fps(overrides, frames=6000))
    ratio = best_collect / best_raw
    print(f"\nCollector on EnvPool (2 envs, 2 threads, random policy) vs raw EnvPool, frames/s: "
          f"collect {best_collect:.0f}, raw {best_raw:.0f}, ratio {ratio:.2f}  target>=0.9  "
          f"{verdict(ratio, 0.9)}")


def atari_lines(atari: EnvConfig, n_envs: int) -> None:
    """EnvPool vs ALE through Gymnasium: one env each, and ``n_envs`` envs as agents train."""
    from envs.envpool_vec import make_envpool_vec_env

    print(f"\nAtari {atari.image_size}x{atari.image_size} gray={atari.grayscale}, frame skip "
          f"{atari.frame_skip} (agent steps/s): EnvPool vs ALE through Gymnasium")
    for game in ("ALE/Pong-v5", "ALE/Breakout-v5"):
        ale = atari.model_copy(update={"id": game})
        pool = ale.model_copy(update={"backend": "envpool"})
        single, batched, one, two = interleaved([
            stepper(make_env(ale), 100),
            vec_stepper(envs.make_vec_env(ale, n_envs=n_envs, vec_env="dummy"), 25),
            vec_stepper(make_envpool_vec_env(pool, n_envs=n_envs, num_threads=1), 25),
            vec_stepper(make_envpool_vec_env(pool, n_envs=n_envs, num_threads=2), 25),
        ], seconds=2.0)
        alone = rate(stepper(make_env(pool), 100), 2.0)
        print(f"  {game:16s} 1 env: gymnasium {single:6.0f}, envpool {alone:6.0f} "
              f"(x{alone / single:.2f})")
        print(f"  {'':16s} {n_envs} envs: gymnasium DummyVecEnv {batched:6.0f}, envpool 1 thread "
              f"{one:6.0f} (x{one / batched:.2f}), 2 threads {two:6.0f} (x{two / batched:.2f})")


def envpool_main() -> None:
    try:
        import envpool  # noqa: F401
    except ImportError:
        print("(EnvPool skipped: pip install 'worldmodel[fast]')")
        return
    from worldmodel.config import resolve_config

    root = Path(__file__).resolve().parents[1] / "configs"
    car = resolve_config(root / "carracing.yaml").env.model_copy(update={"backend": "gymnasium"})
    carracing_lines(car)
    collector_line(car)
    try:
        import ale_py  # noqa: F401
    except ImportError:
        print("(Atari skipped: pip install 'worldmodel[atari]')")
        return
    atari = resolve_config(root / "pong.yaml").env.model_copy(update={"backend": "gymnasium"})
    atari_lines(atari, n_envs=atari.n_envs)


if __name__ == "__main__":
    if sys.argv[1:] != ["envpool"]:  # `python -m bench.envs envpool`: only the EnvPool lines
        main()
    envpool_main()
