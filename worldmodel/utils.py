"""Run-time helpers shared by the stages: seeding, devices, logging, run folders."""

from __future__ import annotations

import logging
import random
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from worldmodel.config import Config

log = logging.getLogger("worldmodel")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) so that one seed gives one result."""
    import torch

    random.seed(seed)
    np.random.seed(seed)  # seeds libraries that use the global generator
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else the CPU.

    PyTorch already uses every physical core on the CPU; callers that run several trainings at
    once (the pipeline) lower ``torch.set_num_threads`` in each process themselves.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from worldmodel.errors import ConfigError

        raise ConfigError("device cuda: no CUDA device is available; use device=auto or cpu")
    return torch.device(device)


def setup_logging(verbosity: int = 0) -> None:
    """Log to stderr: ``-1`` warnings only, ``0`` info, ``1`` debug."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", force=True)


def progress_enabled() -> bool:
    """Whether progress bars should be drawn (not when logging is at warning level)."""
    return log.getEffectiveLevel() <= logging.INFO


def default_run_dir(cfg: Config, stage: str, root: Path = Path("runs")) -> Path:
    """``runs/{env}__{stage}__{seed}__{timestamp}``, CleanRL style."""
    env = re.sub(r"[^A-Za-z0-9.-]+", "-", cfg.env.id).strip("-")
    return root / f"{env}__{stage}__{cfg.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
