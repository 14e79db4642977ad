"""The dream beside reality: M run open loop from a real frame, with the recorded actions.

``worldmodel visualize VAE_RUN -d DATA --memory MEMORY_RUN`` uses this module for its "Dream"
section (IRIS and DIAMOND show such real-vs-imagined rollouts):

- :func:`check_memory` loads the memory run and refuses one trained on other VAE weights;
- :func:`open_loop` encodes the real frames of one held-out episode, starts M from the encoded
  first frame and feeds back M's own prediction of ``z_{t+1}`` (the **mixture mean**,
  :func:`worldmodel.memory.mixture_mean`, so the dream is deterministic: no sampling, no
  temperature) with the recorded actions;
- :func:`error_curve` measures the ``k``-step open-loop latent error on held-out episodes: from
  starts spread over each episode (M's state warmed up by teacher forcing on the real latents
  before the start, as train-memory's open-loop metrics do), the MSE of M's ``z_{t+k}`` against
  the encoded real ``z_{t+k}``, beside copy-last-z (predict ``z_t`` for every ``k``).

The pictures and the page are drawn by :mod:`worldmodel.visualize`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import torch

from worldmodel.errors import UserError
from worldmodel.memory import LoadedMemory, encode_actions, mixture_mean

if TYPE_CHECKING:
    from worldmodel.dataset import DatasetReader
    from worldmodel.vae import LoadedVAE

__all__ = ["DreamRollout", "check_memory", "error_curve", "held_out_episodes", "open_loop"]

#: How M's prediction is fed back (recorded in visualize.json).
PREDICTION = "mixture mean (deterministic, no temperature)"


class DreamRollout(NamedTuple):
    """One episode, real and dreamed.

    :param real: ``(T, H, W, C)`` uint8 recorded frames.
    :param dream: ``(T, H, W, C)`` uint8: frame 0 is the decoded encoding of the real frame 0,
        frame ``t`` the decoding of M's open-loop ``z_t``.
    :param z_real: ``(T, Z)`` encoded real frames (posterior means).
    :param z_dream: ``(T, Z)`` M's open-loop latents (``z_dream[0] = z_real[0]``).
    """

    real: np.ndarray
    dream: np.ndarray
    z_real: np.ndarray
    z_dream: np.ndarray


def check_memory(memory_run: Path, vae: LoadedVAE, vae_run: Path) -> LoadedMemory:
    """Load a memory run for the VAE ``vae`` (its ``best.pt``, else ``last.pt``).

    :raise UserError: not a memory run, or M was trained on the latents of other VAE weights
        (the ``vae_hash`` train-memory records in its checkpoint).
    """
    from worldmodel.memory import load_memory
    from worldmodel.runfolder import require_kind
    from worldmodel.vae import load_checkpoint

    memory_run = require_kind(Path(memory_run), "memory", "--memory")
    which: Literal["best", "last"] = "best" if (memory_run / "best.pt").is_file() else "last"
    memory = load_memory(memory_run, which)
    trained_on = str(load_checkpoint(memory_run / f"{which}.pt").get("vae_hash", ""))
    if trained_on != vae.weights_hash:
        raise UserError(f"--memory {memory_run} was trained on other VAE weights than {vae_run} "
                        f"(VAE weights sha256 {trained_on[:16] or 'unrecorded'} vs "
                        f"{vae.weights_hash[:16]}); pass the memory run trained on this VAE")
    return memory


def held_out_episodes(memory: LoadedMemory, reader: DatasetReader) -> list[int]:
    """Positions (in id order) of the episodes M did not train on (all when none is held out)."""
    from worldmodel.loaders import split_episodes

    ids = reader.episode_ids
    _, val = split_episodes(ids, memory.config.data.val_fraction, memory.config.seed)
    pos = {eid: p for p, eid in enumerate(ids)}
    return [pos[i] for i in val] if val else list(range(len(ids)))


def _episode(vae: LoadedVAE, memory: LoadedMemory, reader: DatasetReader, position: int,
             max_steps: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames, encoded latents and action vectors of one episode (at most ``max_steps``)."""
    ep = reader.episode(position)
    obs = ep.obs if max_steps is None else ep.obs[:max_steps]
    actions = encode_actions(np.asarray(ep.action)[: len(obs)], memory.action_space)
    return obs, vae.encode(obs), actions


@torch.no_grad()
def open_loop(vae: LoadedVAE, memory: LoadedMemory, reader: DatasetReader, position: int,
              max_steps: int = 300) -> DreamRollout:
    """Dream episode ``position`` open loop from its first frame with its recorded actions."""
    obs, z_real, actions = _episode(vae, memory, reader, position, max_steps)
    z = torch.as_tensor(z_real[:1])
    state = memory.initial_state(1)
    dream = [z_real[0]]
    for t in range(len(obs) - 1):
        out, state = memory.step(z, actions[t : t + 1], state)
        z = mixture_mean(out)
        dream.append(z[0].cpu().numpy())
    z_dream = np.stack(dream).astype(np.float32)
    return DreamRollout(obs, vae.decode(z_dream), z_real, z_dream)


@torch.no_grad()
def error_curve(vae: LoadedVAE, memory: LoadedMemory, reader: DatasetReader,
                positions: list[int], horizon: int = 15, stride: int = 5,
                max_steps: int = 1000) -> dict[str, Any]:
    """The ``k``-step open-loop latent MSE of M and of copy-last-z, ``k = 1 .. horizon``.

    :param positions: the episodes (held-out ones).
    :param stride: an open-loop start every ``stride`` steps of each episode.
    :return: ``{"k": [...], "memory": [...], "copy_last_z": [...], "count": [...],
        "episodes": n, "starts": n}`` (MSE per latent dimension; ``None`` where no start
        reaches ``k``).
    """
    sse_m = np.zeros(horizon)
    sse_c = np.zeros(horizon)
    count = np.zeros(horizon, np.int64)
    starts_total = 0
    for position in positions:
        _, mu, act = _episode(vae, memory, reader, position, max_steps)
        n = len(mu)
        starts = np.arange(0, n - 1, stride)
        if not len(starts):
            continue
        starts_total += len(starts)
        # teacher forcing: the LSTM state before each step
        state = memory.initial_state(1)
        hs, cs = [], []
        for t in range(int(starts[-1]) + 1):
            hs.append(state[0])
            cs.append(state[1])
            _, state = memory.step(mu[t : t + 1], act[t : t + 1], state)
        state = (torch.cat([hs[s] for s in starts], 1), torch.cat([cs[s] for s in starts], 1))
        z = torch.as_tensor(mu[starts])
        for k in range(1, horizon + 1):
            ok = starts + k < n
            if not ok.any():
                break
            a = act[np.minimum(starts + k - 1, n - 1)]
            out, state = memory.step(z, a, state)
            z = mixture_mean(out)
            truth = mu[np.minimum(starts + k, n - 1)]
            sse_m[k - 1] += float(((z.cpu().numpy() - truth) ** 2).mean(1)[ok].sum())
            sse_c[k - 1] += float(((mu[starts] - truth) ** 2).mean(1)[ok].sum())
            count[k - 1] += int(ok.sum())

    def mean(sse: np.ndarray) -> list[float | None]:
        return [float(s / c) if c else None for s, c in zip(sse, count, strict=True)]

    return {"k": list(range(1, horizon + 1)), "memory": mean(sse_m),
            "copy_last_z": mean(sse_c), "count": count.tolist(), "episodes": len(positions),
            "starts": starts_total, "stride": stride}
