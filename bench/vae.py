"""VAE speed, measured in one run: trainer vs a bare PyTorch loop, and batched vs single encoding.

1. Trainer overhead: ``worldmodel.train_vae.run`` (reading the zarr dataset through
   ``FrameDataset``, logging, the loss checks) against a bare loop (forward, loss, backward,
   Adam step) on the same model and the same frames already in memory as uint8 tensors.
   Both time only training steps (the trainer's ``summary.json`` "frames_per_second" excludes its
   validation and checkpoints). Target: trainer / bare >= 0.9.
2. Absolute training frames/s of the default (World Models) model at batch 256, and of the
   quickstart model (``configs/quickstart.yaml``'s ``vae``) at its batch size.
3. ``LoadedVAE.encode`` frames/s: batches of 256 vs one frame per call.

Run: ``python bench/vae.py [--threads N]`` (about 2-3 minutes on 2 cores). The numbers are
only as good as the machine is idle: the load average is printed first; on a shared machine,
``--threads 1`` avoids two intra-op threads fighting other jobs for the cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import yaml

from bench.common import verdict
from worldmodel import collect, train_vae
from worldmodel.config import Config, resolve_config
from worldmodel.loaders import FrameDataset
from worldmodel.utils import setup_logging
from worldmodel.vae import LoadedVAE, build_vae, frames_to_tensor, vae_loss

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(cfg: Config, batches: list[torch.Tensor]) -> float:
    """Frames/s of forward + loss + backward + Adam over in-memory uint8 batches."""
    torch.manual_seed(cfg.seed)
    model = build_vae(cfg.vae, cfg.env)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.vae.lr)
    v = cfg.vae
    start = time.perf_counter()
    for frames in batches:
        x = frames_to_tensor(frames)
        terms = vae_loss(model(x), x, v.beta, v.kl_tolerance, v.recon_loss)
        opt.zero_grad(set_to_none=True)
        terms.loss.backward()
        opt.step()
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def trainer(cfg: Config, data: Path, out: Path) -> float:
    """Frames/s of ``train_vae.run`` (training steps only, as its summary reports them)."""
    run = train_vae.run(cfg, data, out)
    return float(json.loads((run / "summary.json").read_text())["frames_per_second"])


def bench_cfg(overrides: list[str], steps: int) -> Config:
    return resolve_config(None, [
        *overrides, f"vae.steps={steps}", f"vae.val_every={steps}", "vae.log_every=5",
        "vae.image_every=100000", "vae.val_frames=256", "vae.probe_frames=0",
    ])


def trainer_vs_bare(name: str, overrides: list[str], steps: int, data: Path, tmp: Path,
                    rounds: int = 2) -> float:
    cfg = bench_cfg(overrides, steps)
    ds = FrameDataset(data, "train", batch_size=cfg.vae.batch_size, seed=cfg.seed,
                      val_fraction=cfg.data.val_fraction, workers=cfg.data.loader_workers)
    batches = [torch.from_numpy(b) for _, b in zip(range(steps), ds.batches(0), strict=False)]
    best_bare = best_trainer = 0.0
    for r in range(rounds):  # interleaved, best of each: less sensitive to a busy machine
        best_bare = max(best_bare, bare_loop(cfg, batches))
        best_trainer = max(best_trainer, trainer(cfg, data, tmp / f"{name}-{r}"))
    ratio = best_trainer / best_bare
    print(f"{name}: batch {cfg.vae.batch_size}, widths {cfg.vae.widths}: bare loop "
          f"{best_bare:,.0f} frames/s, trainer {best_trainer:,.0f} frames/s, ratio {ratio:.2f} "
          f"(target >= 0.9: {verdict(ratio, 0.9)})")
    return ratio


def encode_speed(data: Path) -> None:
    cfg = resolve_config(None, [])
    vae = LoadedVAE(build_vae(cfg.vae, cfg.env), cfg)
    ds = FrameDataset(data, "all", batch_size=256, seed=0, val_fraction=0.1)
    frames = ds.sample(2048)
    vae.encode(frames[:256])  # warm-up
    start = time.perf_counter()
    vae.encode(frames, batch_size=256)
    batched = len(frames) / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(300):
        vae.encode(frames[i : i + 1])
    single = 300 / (time.perf_counter() - start)
    print(f"encode (default model, 64x64x3): batched (256) {batched:,.0f} frames/s, one frame "
          f"per call {single:,.0f} frames/s, ratio {batched / single:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_logging(-1)
    logging.getLogger("worldmodel").setLevel(logging.ERROR)  # short runs warn, by design
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} "
          f"cores, load average {load}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = collect.run(resolve_config(None, ["collect.episodes=40", "collect.workers=1"]),
                           tmp / "reach64")
        trainer_vs_bare("default model", ["vae.batch_size=256"], 8, data, tmp)
        vae = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())["vae"]
        sets = [f"vae.{k}={json.dumps(v)}" for k, v in vae.items()
                if k not in ("steps", "epochs", "val_every", "image_every", "log_every")]
        trainer_vs_bare("quickstart model", sets, 50, data, tmp)
        encode_speed(data)


if __name__ == "__main__":
    main()
