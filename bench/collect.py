"""Collector, loader and storage benchmarks, printed as ratios measured in one run.

1. Collector overhead: ``worldmodel collect`` with 1 worker (frames/s while its worker runs,
   i.e. from "ready" to "done": env steps, stacking, and in the worker's writer process
   checksums, compression, zarr writes and commits; the process start-up is reported apart) vs
   a bare loop ``env.step(policy.act(...))`` with the same env, policy and seeds. Targets: >= 0.8
   on Reach (64x64, ~13 us per bare step: the writer process needs about as much CPU per frame
   as the env, so this needs a free second core) and >= 0.9 on CarRacing-v3 (64x64).
2. Scaling on CarRacing-v3: 2 workers vs 1 worker, frames/s. Target >= 1.8 on 2 free cores.
3. Loader: ``FrameDataset`` frames/s (2 decompression threads, a cache a quarter of the data)
   vs ConvVAE training frames/s (``worldmodel.vae``, 64x64, batch 256). Target >= 10. Also the
   trainer fed by the loader vs on one fixed batch (1.0: the loader never starves it).
4. Storage: compression ratio and bytes/frame of CarRacing 64x64x3 frames.

Pairs are run interleaved and the best of each is kept, which reduces (but cannot remove) the
effect of other processes on a shared machine. Run: ``python bench/collect.py`` (~2-3 min).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from bench.common import verdict
from envs import make_env
from worldmodel.collect import episode_seeds, make_builtin_policy, run
from worldmodel.config import Config, resolve_config
from worldmodel.dataset import SHARDS, Location, open_dataset
from worldmodel.loaders import FrameDataset
from worldmodel.utils import setup_logging


def bare_fps(cfg: Config) -> tuple[float, float]:
    """Frames/s and CPU seconds/frame of a plain rollout loop over the collector's episodes."""
    env = make_env(cfg.env)
    policy = make_builtin_policy(cfg.collect.policy, env.action_space, cfg.collect.brownian_dt)
    cap = cfg.collect.max_episode_steps
    frames = 0
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(cfg.collect.episodes or 1):
        env_seed, policy_seed = episode_seeds(cfg.seed, i)
        policy.seed(policy_seed)  # type: ignore[attr-defined]
        obs, info = env.reset(seed=env_seed)
        policy.reset(obs, info)
        t = 0
        while True:
            obs, _, terminated, truncated, info = env.step(policy.act(obs, info))
            t += 1
            if terminated or truncated or (cap is not None and t >= cap):
                break
        frames += t
    return frames / (time.perf_counter() - start), (time.process_time() - cpu) / frames


def collect_fps(cfg: Config, out: Path) -> tuple[float, dict[str, float]]:
    """Frames/s of ``worldmodel collect`` while its workers run, and its run record."""
    run(cfg, out)
    record = json.loads((out / "manifest.json").read_text())["runs"][-1]
    return float(record["fps"]), record


def overhead(name: str, overrides: list[str], tmp: Path, target: float,
             rounds: int = 2) -> Path:
    cfg = resolve_config(None, [*overrides, "collect.workers=1"])
    best_bare = best_collect = 0.0
    bare_cpu = main_cpu = total_cpu = float("inf")
    startup = wait = 0.0
    for r in range(rounds):
        fps, cpu = bare_fps(cfg)
        best_bare, bare_cpu = max(best_bare, fps), min(bare_cpu, cpu)
        fps, record = collect_fps(cfg, tmp / f"{name}-1w-{r}")
        if fps > best_collect:
            wait = record["writer_wait_seconds"] / record["active_seconds"]
        best_collect, startup = max(best_collect, fps), record["startup_seconds"]
        main_cpu = min(main_cpu, record["cpu_main_seconds"] / record["frames_stepped"])
        total_cpu = min(total_cpu, record["cpu_total_seconds"] / record["frames_stepped"])
    ratio = best_collect / best_bare
    print(f"collector overhead, {name}: bare loop {best_bare:,.0f} frames/s, collect 1 worker "
          f"{best_collect:,.0f} frames/s (+{startup:.1f} s process start-up), ratio "
          f"{ratio:.2f} (target >= {target}: {verdict(ratio, target)})")
    print(f"    CPU per frame: bare loop {bare_cpu * 1e6:,.1f} us; collector env thread "
          f"{main_cpu * 1e6:,.1f} us ({bare_cpu / main_cpu:.2f} of the bare speed when the writer "
          f"process has its own core), whole worker (env + writer processes) "
          f"{total_cpu * 1e6:,.1f} us; the env loop waited for its writer {wait:.0%} of the time")
    return tmp / f"{name}-1w-0"


def scaling(overrides: list[str], episodes: int, tmp: Path, rounds: int = 2) -> Path:
    best = {1: 0.0, 2: 0.0}
    for r in range(rounds):
        for workers in (1, 2):
            cfg = resolve_config(None, [*overrides, f"collect.workers={workers}",
                                        f"collect.episodes={episodes * workers}"])
            fps, _ = collect_fps(cfg, tmp / f"scale-{workers}w-{r}")
            best[workers] = max(best[workers], fps)
    ratio = best[2] / best[1]
    print(f"scaling, CarRacing-v3: 1 worker {best[1]:,.0f} frames/s, 2 workers {best[2]:,.0f} "
          f"frames/s, ratio {ratio:.2f} (target >= 1.8: {verdict(ratio, 1.8)})")
    return tmp / "scale-2w-0"


def storage(data: Path) -> None:
    reader = open_dataset(data)
    loc = Location(data)
    stored = sum(loc.size(SHARDS, f"{s}.zarr", "obs") for s in reader.manifest["shards"])
    raw = reader.num_frames * int(np.prod(reader.frame_shape))
    print(f"storage, CarRacing-v3 {'x'.join(map(str, reader.frame_shape))}: "
          f"{stored / reader.num_frames:,.0f} bytes/frame vs {raw // reader.num_frames:,} raw, "
          f"compression {raw / stored:.1f}x ({reader.num_frames} frames; whole dataset on disk "
          f"{reader.size_on_disk() / reader.num_frames:,.0f} bytes/frame)")


def loader_vs_trainer(data: Path, seconds: float = 3.0) -> None:
    import torch

    from worldmodel.vae import ConvVAE, frames_to_tensor, vae_loss

    reader = open_dataset(data)
    cache = reader.num_frames * int(np.prod(reader.frame_shape)) // 4
    ds = FrameDataset(data, "all", batch_size=256, cache_bytes=cache, workers=2)
    frames, epoch = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch in ds.batches(epoch):
            frames += len(batch)
        epoch += 1
    loader = frames / (time.perf_counter() - start)

    model = ConvVAE(image_size=64)  # World Models' encoder/decoder widths, z = 32
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(batch: np.ndarray) -> None:
        x = frames_to_tensor(batch)
        terms = vae_loss(model(x), x)
        opt.zero_grad(set_to_none=True)
        terms.loss.backward()
        opt.step()

    fixed = next(iter(ds))
    step(fixed)  # warm-up
    steps = 4
    t = time.perf_counter()
    for _ in range(steps):
        step(fixed)
    train = steps * 256 / (time.perf_counter() - t)
    t = time.perf_counter()
    for _, batch in zip(range(steps), ds.batches(1), strict=False):
        step(batch)
    fed = steps * 256 / (time.perf_counter() - t)
    ratio = loader / train
    print(f"loader: FrameDataset {loader:,.0f} frames/s (2 threads, cache 1/4 of the data), "
          f"ConvVAE 64x64 batch 256 training {train:,.0f} frames/s, ratio {ratio:,.0f} "
          f"(target >= 10: {verdict(ratio, 10)}); training fed by the loader "
          f"{fed:,.0f} frames/s ({fed / train:.2f} of the fixed-batch speed)")


def main() -> None:
    setup_logging(-1)
    start = time.perf_counter()
    print(f"bench/collect.py on {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench-collect-") as d:
        tmp = Path(d)
        overhead("Reach-v0 64x64", ["env.image_size=64", "collect.episodes=800"], tmp, 0.8)
        car = ["env.id=CarRacing-v3", "env.image_size=64", "collect.max_episode_steps=200",
               "collect.policy=brownian"]
        overhead("CarRacing-v3 64x64", [*car, "collect.episodes=3"], tmp, 0.9)
        data = scaling(car, episodes=3, tmp=tmp)
        storage(data)
        loader_vs_trainer(data)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
