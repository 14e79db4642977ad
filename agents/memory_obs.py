"""``latent-memory`` modes: the policy observes ``[z_t, h_t]``, as World Models' controller does.

World Models (Ha & Schmidhuber 2018) feeds its controller the VAE latent ``z_t`` and the memory
model M's LSTM hidden state ``h_t``. ctallec's reproduction scored about the same with an
untrained M (870 +- 120) as with a trained one (860 +- 120), so a gain can only be credited to
M against the ``latent-memory-untrained`` control: the same architecture, untrained weights.

:class:`VecMemoryObservation` wraps a :class:`~agents.latent.VecLatentObservation` (one batched
encoding of all envs' frames and terminal frames per step) and carries ``(h, c)`` per env::

    h_0 = 0,   observation_t = [z_t, h_t],   (h_{t+1}, c_{t+1}) = M.step(z_t, a_t, (h_t, c_t))

``h`` goes back to zeros for each env whose episode ended; the ``terminal_observation`` of an
ended episode is ``[z_T, h_T]``. ``history`` stacks the last ``history`` such vectors (zeros
before the start of an episode), as the latent modes do. With ``stats``
(:class:`~agents.features.FeatureStats`, ``agent.standardize``) each ``[z_t, h_t]`` is
standardised per dimension before stacking; M itself reads the raw ``z_t``.

An agent run records its M in ``memory.json`` (:func:`prepare_memory`): the memory run's path
(absolute and relative to the agent run), checkpoint, weights hash, the hash of the VAE weights
it was trained on (which must be the agent's), its sizes and action space; the untrained
control's weights are in ``random_memory.pt``. :func:`load_agent_memory` rebuilds it, weights
hash checked, for evaluation and the collector's ``agent:PATH`` policy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn
from stable_baselines3.common.vec_env.stacked_observations import StackedObservations

from agents.encoders import locate_recorded_run
from agents.modes import MODES, get_mode
from worldmodel.errors import UserError
from worldmodel.io import atomic_write_json, read_json

if TYPE_CHECKING:
    from agents.features import FeatureStats
    from worldmodel.config import Config
    from worldmodel.memory import LoadedMemory
    from worldmodel.vae import LoadedVAE

log = logging.getLogger("worldmodel")

MEMORY_RECORD = "memory.json"
RANDOM_MEMORY_WEIGHTS = "random_memory.pt"
#: The checkpoint of the memory run an agent reads.
MEMORY_CHECKPOINT: Literal["best", "last"] = "best"


def memory_space(latent_dim: int, hidden_size: int, history: int = 1) -> spaces.Box:
    """``Box(-inf, inf, (history * (Z + H),), float32)``: what a memory mode's policy observes."""
    return spaces.Box(-np.inf, np.inf, (history * (latent_dim + hidden_size),), np.float32)


def check_memory_actions(memory: LoadedMemory, space: spaces.Space[Any], where: str) -> None:
    """Refuse (one line) an env whose actions are not those M was trained on."""
    kind = memory.action_space.get("type")
    try:
        size = memory.actions(np.asarray([space.sample()])).shape[1]
    except (ValueError, IndexError, KeyError):
        size = -1
    if kind != type(space).__name__ or size != memory.action_dim:
        raise UserError(
            f"{where}: M was trained on {kind} actions of size {memory.action_dim} but the env "
            f"acts in {space}; use a memory run trained on this env's actions"
        )


class VecMemoryObservation(VecEnvWrapper):
    """Latents ``(n, Z)`` -> ``(n, history * (Z + H))``: each env's latent and M's hidden state.

    :param venv: a VecEnv of latents, one per env (:class:`~agents.latent.VecLatentObservation`
        with ``history=1``), whose ``terminal_observation`` entries are latents too.
    :param memory: M (trained, or the untrained control).
    :param history: concatenate the last ``history`` observations (zeros before the start).
    :param stats: standardise each ``[z_t, h_t]`` with these ``(Z + H,)`` statistics before
        stacking (``None``: raw).

    Attributes ``state`` (``(h, c)``, each ``(1, n, H)``) and ``hidden`` (``(n, H)``, the ``h``
    of the last observations) are kept for tests and debugging.
    """

    def __init__(self, venv: VecEnv, memory: LoadedMemory, history: int = 1,
                 stats: FeatureStats | None = None) -> None:
        if history < 1:
            raise UserError(f"history must be >= 1, got {history}")
        z_dim = int(np.prod(venv.observation_space.shape or (0,)))
        if z_dim != memory.latent_dim:
            raise UserError(
                f"M takes latents of size {memory.latent_dim} but the encoder gives {z_dim}; use "
                "a memory run trained on this agent's VAE"
            )
        check_memory_actions(memory, venv.action_space, "VecMemoryObservation")
        if stats is not None:
            stats.check(memory.latent_dim + memory.hidden_size, "VecMemoryObservation")
        self.stats = stats
        self.memory = memory
        self.history = history
        base = memory_space(memory.latent_dim, memory.hidden_size)
        self._stack = StackedObservations(venv.num_envs, history, base, "last")
        super().__init__(venv, observation_space=self._stack.stacked_observation_space)
        self.state = memory.initial_state(venv.num_envs)
        self.hidden = np.zeros((venv.num_envs, memory.hidden_size), np.float32)
        self._z = np.zeros((venv.num_envs, memory.latent_dim), np.float32)
        self._actions: np.ndarray | None = None

    def _observe(self, z: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """``[z, h]`` ``(n, Z + H)`` float32, standardised with ``stats`` when given."""
        obs = np.concatenate([z, hidden], axis=1).astype(np.float32, copy=False)
        return obs if self.stats is None else self.stats.apply(obs)

    def reset(self) -> np.ndarray:
        """Reset all envs and M's states; return ``(n, history * (Z + H))`` float32."""
        z = np.asarray(self.venv.reset(), np.float32)
        self.state = self.memory.initial_state(self.num_envs)
        self.hidden = np.zeros((self.num_envs, self.memory.hidden_size), np.float32)
        self._z = z
        return self._stack.reset(self._observe(z, self.hidden)).copy()

    def step_async(self, actions: np.ndarray) -> None:
        """Keep the actions (M reads ``(z_t, a_t)``) and step the envs."""
        self._actions = np.asarray(actions)
        self.venv.step_async(actions)

    def step_wait(self) -> VecEnvStepReturn:
        """Advance M with ``(z_t, a_t)``; observe ``[z_{t+1}, h_{t+1}]`` (h = 0 after resets)."""
        z, rewards, dones, infos = self.venv.step_wait()
        z = np.asarray(z, np.float32)
        assert self._actions is not None, "step_wait without step_async"
        _, (h, c) = self.memory.step(self._z, self.memory.actions(self._actions), self.state)
        hidden = h[0].cpu().numpy().astype(np.float32)
        for i in np.flatnonzero(dones):
            if "terminal_observation" in infos[i]:  # [z_T, h_T] of the ended episode
                z_t = np.asarray(infos[i]["terminal_observation"], np.float32)
                infos[i]["terminal_observation"] = self._observe(z_t[None], hidden[i : i + 1])[0]
            h[:, i] = 0.0
            c[:, i] = 0.0
            hidden[i] = 0.0
        self.state, self.hidden, self._z = (h, c), hidden, z
        stacked, infos = self._stack.update(self._observe(z, hidden), dones, infos)
        return stacked.copy(), rewards, dones, infos


# --------------------------------------------------------------------------------------------
# The M of an agent run: chosen when it starts, recorded in memory.json, rebuilt from it


def memory_vae_hash(run_dir: Path, checkpoint: str = MEMORY_CHECKPOINT) -> str | None:
    """The hash of the VAE weights a memory run was trained on (its checkpoint's ``vae_hash``)."""
    from worldmodel.vae import load_checkpoint

    value = load_checkpoint(Path(run_dir) / f"{checkpoint}.pt").get("vae_hash")
    return None if value is None else str(value)


def _record(memory: LoadedMemory, cfg: Config, run_dir: Path, kind: str,
            vae_hash: str | None) -> dict[str, Any]:
    from worldmodel.vae import state_dict_hash

    path = Path(memory.run_dir).resolve() if memory.run_dir is not None else None
    return {
        "kind": kind,
        "obs_mode": cfg.agent.obs_mode,
        "path": str(path) if path is not None else None,
        "relpath": os.path.relpath(path, run_dir.resolve()) if path is not None else None,
        "checkpoint": MEMORY_CHECKPOINT,
        "weights_hash": state_dict_hash(memory.model),
        "vae_weights_hash": vae_hash,
        "latent_dim": memory.latent_dim,
        "action_dim": memory.action_dim,
        "hidden_size": memory.hidden_size,
        "mixtures": memory.mixtures,
        "action_space": memory.action_space,
        "memory": memory.config.memory.model_dump(mode="json"),
    }


def prepare_memory(
    cfg: Config, memory_path: Path | None, encoder: LoadedVAE | None, run_dir: Path
) -> tuple[LoadedMemory | None, dict[str, Any] | None]:
    """The M a fresh run uses, checked against its encoder; writes ``memory.json``.

    :param cfg: the run config.
    :param memory_path: the ``--memory`` run folder, or ``None``.
    :param encoder: the run's frozen encoder (:func:`agents.encoders.prepare_encoder`).
    :param run_dir: the agent run folder.
    :return: ``(memory, record)``; both ``None`` for a mode without M.
    :raises UserError: no ``--memory`` for a memory mode, or an M trained on another VAE.
    """
    from worldmodel.memory import LoadedMemory, build_memory, load_memory
    from worldmodel.vae import save_checkpoint

    mode = get_mode(cfg.agent.obs_mode)
    if mode.memory_kind is None:
        if memory_path is not None:
            log.warning("obs_mode %s: --memory %s is not used", mode.name, memory_path)
        return None, None
    if memory_path is None:
        others = " or ".join(m.name for m in MODES if m.uses_vae_weights and not m.needs_memory_run
                             and m.frozen_encoder)
        raise UserError(
            f"agent.obs_mode={mode.name} needs a memory run: pass --memory MEMORY_RUN (a "
            f"train-memory run folder), or use obs_mode {others}"
        )
    assert encoder is not None
    trained = load_memory(Path(memory_path), MEMORY_CHECKPOINT)
    vae_hash = memory_vae_hash(Path(memory_path))
    if trained.latent_dim != encoder.latent_dim:
        raise UserError(
            f"memory run {memory_path} takes latents of size {trained.latent_dim} but the VAE "
            f"gives {encoder.latent_dim}; pass a memory run trained on this VAE"
        )
    if mode.memory_kind == "memory":
        if vae_hash != encoder.weights_hash:
            raise UserError(
                f"memory run {memory_path} was trained on other VAE weights (hash "
                f"{str(vae_hash)[:12]}) than the agent's VAE (hash {encoder.weights_hash[:12]}); "
                "pass the VAE run it was trained on, or train M on this VAE"
            )
        memory, record = trained, _record(trained, cfg, run_dir, "memory", vae_hash)
    else:
        # The memory run's architecture, untrained, seeded by cfg.seed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = build_memory(trained.config.memory, trained.latent_dim, trained.action_dim)
        save_checkpoint(run_dir / RANDOM_MEMORY_WEIGHTS, {"model": model.state_dict()})
        memory = LoadedMemory(model, trained.config, trained.action_space)
        record = _record(memory, cfg, run_dir, "random", None)
        record["architecture_from"] = str(Path(memory_path).resolve())
        record["weights_file"] = RANDOM_MEMORY_WEIGHTS
    atomic_write_json(run_dir / MEMORY_RECORD, record)
    return memory, record


def read_memory_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``memory.json``, or ``None`` when it has no M."""
    path = Path(run_dir) / MEMORY_RECORD
    return read_json(path) if path.is_file() else None


def load_agent_memory(run_dir: Path, cfg: Config) -> LoadedMemory | None:
    """Rebuild the M of a run's env wrapper from its ``memory.json`` (``None`` without M).

    :raises UserError: the record is missing, the memory run is gone, or its weights changed
        since (hash mismatch).
    """
    from worldmodel.config import MemoryConfig
    from worldmodel.memory import LoadedMemory, build_memory, load_memory
    from worldmodel.vae import load_checkpoint, state_dict_hash

    run_dir = Path(run_dir)
    if get_mode(cfg.agent.obs_mode).memory_kind is None:
        return None
    record = read_memory_record(run_dir)
    if record is None:
        raise UserError(f"{run_dir} has no {MEMORY_RECORD}: it is not a complete agent run")
    if record["kind"] == "random":
        memory_cfg = MemoryConfig.model_validate(record["memory"])
        model = build_memory(memory_cfg, int(record["latent_dim"]), int(record["action_dim"]))
        model.load_state_dict(load_checkpoint(run_dir / record["weights_file"])["model"])
        memory = LoadedMemory(model, cfg.model_copy(update={"memory": memory_cfg}),
                              record["action_space"])
    else:
        path = locate_recorded_run(record, run_dir)
        if path is None:
            raise UserError(
                f"{run_dir} was trained with the memory run {record['path']}, which is gone; "
                f"restore it there (or next to the agent run as recorded in {MEMORY_RECORD})"
            )
        checkpoint: Literal["best", "last"] = "last" if record["checkpoint"] == "last" else "best"
        memory = load_memory(path, checkpoint)
    found = state_dict_hash(memory.model)
    if found != record["weights_hash"]:
        raise UserError(
            f"the memory weights of {record.get('path') or run_dir} changed since {run_dir} was "
            f"trained (hash {found[:12]} != recorded {record['weights_hash'][:12]}); restore the "
            "original memory run"
        )
    return memory
