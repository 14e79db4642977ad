"""Shared test set-up: no screen, one torch thread, small budgets, tiny datasets.

Fixtures every test file can ask for:

``one_torch_thread`` (autouse)
    every test runs with one intra-op torch thread: tiny models gain nothing from more, and two
    threads on a busy 2-core machine are several times slower.
``tiny_config``
    ``tiny_config(*overrides)``: a :class:`~worldmodel.config.Config` with 16x16 Reach frames and
    a 2-layer VAE of 4 latents (:data:`TINY`), plus ``overrides``.
``reach16``
    4 Reach episodes of at most 30 steps at 16x16x3, with the true state, collected once per
    session (read-only: copy it before changing it).
``reach16_vae``
    a ``train-vae``-style run folder of a :data:`TINY` VAE trained for 200 steps on ``reach16``
    (beta 0.1, so that the latents matter after a few steps), once per session (read-only).
``make_tiny_vae``
    ``make_tiny_vae(path, data, *overrides, steps=200)``: such a run folder of one's own
    (``data=None``: untrained), e.g. for another image size.

Tests marked ``slow`` (the end-to-end runs) are left out by ``make test-fast``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

if TYPE_CHECKING:
    from worldmodel.config import Config

#: Settings of the tiny configs: 16x16 frames and a 2-layer VAE of 4 latents.
TINY = ["env.image_size=16", "vae.widths=[8, 16]", "vae.latent_dim=4"]
#: Steps of the session's tiny VAE (``reach16_vae``).
TINY_VAE_STEPS = 200
#: Settings of the session's tiny memory model M (``reach16_memory``), on top of :data:`TINY`.
TINY_MEMORY = [
    "memory.hidden_size=8", "memory.mixtures=2", "memory.batch_size=2", "memory.seq_len=8",
    "memory.steps=4", "memory.val_every=2", "memory.log_every=2", "data.val_fraction=0.25",
    "memory.device=cpu",
]


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run each test with one torch thread (restored afterwards)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_config(*overrides: str) -> Config:
    from worldmodel.config import resolve_config

    return resolve_config(None, [*TINY, *overrides])


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., Config]:
    """``tiny_config(*overrides)``: the :data:`TINY` config with ``overrides`` applied."""
    return _tiny_config


@pytest.fixture(scope="session")
def reach16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 Reach episodes of at most 30 steps at 16x16x3, with the true state."""
    from worldmodel.collect import run

    cfg = _tiny_config("collect.episodes=4", "collect.workers=1", "collect.max_episode_steps=30")
    return run(cfg, tmp_path_factory.mktemp("reach16") / "data")


def _train_tiny_vae(path: Path, data: Path | None, *overrides: str,
                    steps: int = TINY_VAE_STEPS) -> Path:
    """Save a :data:`TINY` VAE (plus ``overrides``) trained ``steps`` steps on ``data``.

    Random initialisation (seed 0) when ``data`` is ``None`` or ``steps`` is 0. beta = 0.1, so
    that a few steps give latents that matter (at beta = 1 it first sits at the mean image).
    The folder holds ``config.yaml`` and ``best.pt``, as ``worldmodel train-vae`` writes them.
    """
    import numpy as np
    import torch

    from worldmodel.dataset import open_dataset
    from worldmodel.vae import build_vae, frames_to_tensor, save_checkpoint, vae_loss

    cfg = _tiny_config(*overrides)
    torch.manual_seed(0)
    model = build_vae(cfg.vae, cfg.env)
    if data is not None and steps:
        x = frames_to_tensor(np.concatenate([ep.obs for ep in open_dataset(data)]))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(steps):
            batch = x[torch.randint(0, len(x), (32,))]
            loss = vae_loss(model(batch), batch, beta=0.1).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    path.mkdir(parents=True, exist_ok=True)
    cfg.save(path / "config.yaml")
    save_checkpoint(path / "best.pt", {"model": model.state_dict(), "step": steps})
    return path


@pytest.fixture(scope="session")
def make_tiny_vae() -> Callable[..., Path]:
    """``make_tiny_vae(path, data, *overrides, steps=200)``: a tiny trained VAE run folder."""
    return _train_tiny_vae


@pytest.fixture(scope="session")
def reach16_vae(reach16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A :data:`TINY` VAE run trained for :data:`TINY_VAE_STEPS` steps on ``reach16``."""
    return _train_tiny_vae(tmp_path_factory.mktemp("reach16_vae") / "vae", reach16)


@pytest.fixture(scope="session")
def reach16_memory(reach16: Path, reach16_vae: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(vae, memory)``: a copy of ``reach16_vae`` (M caches its latents in it) and a
    :data:`TINY_MEMORY` M trained on ``reach16`` with it, once per session (read-only)."""
    import shutil

    from worldmodel import train_memory

    root = tmp_path_factory.mktemp("reach16_memory")
    vae = Path(shutil.copytree(reach16_vae, root / "vae"))
    memory = train_memory.run(_tiny_config(*TINY_MEMORY), reach16, vae, root / "memory")
    return vae, memory
