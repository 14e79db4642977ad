"""worldmodel: train RL agents on VAE-compressed observations of Gymnasium games.

Heavy modules (torch, SB3) load on first use: ``worldmodel.load_vae`` and
``worldmodel.load_memory`` import the VAE and the memory model lazily.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_memory", "load_vae"]


def __getattr__(name: str) -> Any:
    if name == "load_vae":
        from worldmodel.vae import load_vae

        return load_vae
    if name == "load_memory":
        from worldmodel.memory import load_memory

        return load_memory
    raise AttributeError(f"module 'worldmodel' has no attribute {name!r}")
