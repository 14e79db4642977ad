"""Run-time helpers shared by the stages: seeding, devices, logging, run folders."""

from __future__ import annotations

import logging
import os
import random
import re
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from tqdm import tqdm

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
    """Whether progress bars are drawn: logging at info level or lower, and stderr a terminal.

    Redirected to a file (CI, ``nohup``, a cluster job), a bar would write a line every few
    milliseconds; long work logs a :class:`LogProgress` line now and then instead.
    """
    return log.getEffectiveLevel() <= logging.INFO and _stderr_is_tty()


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


#: Seconds between two progress lines when stderr is not a terminal (overridden by the
#: environment variable ``WORLDMODEL_PROGRESS_SECONDS``).
PROGRESS_SECONDS = 30.0


def progress_seconds() -> float:
    """The seconds between two :class:`LogProgress` lines (``WORLDMODEL_PROGRESS_SECONDS``)."""
    value = os.environ.get("WORLDMODEL_PROGRESS_SECONDS")
    try:
        return max(float(value), 0.0) if value else PROGRESS_SECONDS
    except ValueError:
        return PROGRESS_SECONDS


class LogProgress:
    """A progress bar for a log file: one plain line at most every ``every`` seconds.

    It has tqdm's ``update``/``set_postfix``/``close`` and context-manager interface:

    ``train-vae: 500/1500 steps (33%), 12.3 step/s, loss=15.1`` (the rate over this session).
    The last line comes on ``close`` unless the line before showed the same count. With
    ``enabled=False`` (warnings-only logging) it writes nothing.

    :param clock: seconds (``time.monotonic``; a fake one in tests).
    :param every: seconds between two lines (default :func:`progress_seconds`).
    """

    def __init__(self, total: int | None, initial: int = 0, desc: str = "", unit: str = "it",
                 *, every: float | None = None, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.every = progress_seconds() if every is None else every
        self.enabled, self.clock = enabled, clock
        self.postfix = ""
        self._start_n, self._start = initial, clock()
        self._last = self._start
        self._shown: int | None = None
        self._closed = False

    def update(self, n: float = 1) -> None:
        """Count ``n`` more; log a line when the last one is ``every`` seconds old."""
        self.n += int(n)
        if self.enabled and self.clock() - self._last >= self.every:
            self._emit()

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        """The ``key=value`` items shown at the end of the next lines."""
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def line(self) -> str:
        """The progress line as it stands."""
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        text = f"{self.desc}: {done} {self.unit}s" if self.desc else f"{done} {self.unit}s"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        elapsed = self.clock() - self._start
        if elapsed > 0:
            text += f", {(self.n - self._start_n) / elapsed:.1f} {self.unit}/s"
        return text + (f", {self.postfix}" if self.postfix else "")

    def _emit(self) -> None:
        self._last = self.clock()
        self._shown = self.n
        log.info("%s", self.line())

    def close(self) -> None:
        """Log the final count (unless the last line showed it)."""
        if self._closed:
            return
        self._closed = True
        if self.enabled and self._shown != self.n and self.n != self._start_n:
            self._emit()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int | None, initial: int = 0, desc: str = "", unit: str = "it",
             ) -> tqdm[Any] | LogProgress:
    """The progress of long work: tqdm on a terminal (:func:`progress_enabled`), else lines.

    Not on a terminal it is a :class:`LogProgress`, silent when logging is at warning level.
    """
    if progress_enabled():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True)
    return LogProgress(total, initial, desc, unit,
                       enabled=log.getEffectiveLevel() <= logging.INFO)


def default_run_dir(cfg: Config, stage: str, root: Path = Path("runs")) -> Path:
    """``runs/{env}__{stage}__{seed}__{timestamp}``, CleanRL style."""
    env = re.sub(r"[^A-Za-z0-9.-]+", "-", cfg.env.id).strip("-")
    return root / f"{env}__{stage}__{cfg.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
