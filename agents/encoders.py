"""The encoder of an agent run: built or checked when training starts, rebuilt from its folder.

Training, evaluation and the collector's ``agent:PATH`` policy rebuild a run's observations
from what its folder records:

* ``config.yaml``: the resolved config (``env`` preprocessing, ``agent.obs_mode``, history...);
* ``vae.json``: the encoder of the modes that have one (:attr:`ObsModeSpec.needs_vae_run
  <agents.modes.ObsModeSpec.needs_vae_run>`) -- the VAE run's path (absolute and relative to the
  agent run), checkpoint, weights hash, image shape, latent size and the VAE run's ``env``
  preprocessing; when the mode only borrows the architecture (``random-encoder``) the untrained
  weights are in ``random_encoder.pt``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from agents.modes import MODES, get_mode
from worldmodel.errors import UserError
from worldmodel.io import atomic_write_json, read_json

if TYPE_CHECKING:
    from envs.config import EnvConfig
    from worldmodel.config import Config
    from worldmodel.vae import LoadedVAE

log = logging.getLogger("worldmodel")

VAE_RECORD = "vae.json"
RANDOM_WEIGHTS = "random_encoder.pt"


def check_vae_matches_env(vae: LoadedVAE, env_cfg: EnvConfig) -> None:
    """Raise when the VAE cannot take ``env_cfg``'s frames; warn when they look different.

    Shape and channels must match (``UserError``). Other preprocessing differences (another game,
    crop, frame skip, env kwargs) are legal -- transfer is a valid experiment -- but are logged
    as warnings because they usually are mistakes.
    """
    where = f"VAE run {vae.run_dir}" if vae.run_dir is not None else "the VAE"
    if vae.image_shape != env_cfg.obs_shape:
        h, w, c = vae.image_shape
        raise UserError(
            f"{where} takes {h}x{w}x{c} frames but env {env_cfg.id} gives "
            f"{'x'.join(map(str, env_cfg.obs_shape))} (env.image_size={env_cfg.image_size}, "
            f"env.grayscale={str(env_cfg.grayscale).lower()}); set env.image_size={h} "
            f"env.grayscale={str(c == 1).lower()} or train a VAE on these frames"
        )
    theirs = vae.config.env.preprocessing()
    ours = env_cfg.preprocessing()
    diff = sorted(k for k in ours if ours[k] != theirs.get(k))
    if diff:
        details = ", ".join(f"{k}: {theirs.get(k)!r} vs {ours[k]!r}" for k in diff)
        log.warning("%s was trained on other frames than this agent's env (%s)", where, details)


def _vae_record(vae: LoadedVAE, cfg: Config, run_dir: Path, kind: str) -> dict[str, Any]:
    path = Path(vae.run_dir).resolve() if vae.run_dir is not None else None
    record: dict[str, Any] = {
        "kind": kind,
        "obs_mode": cfg.agent.obs_mode,
        "path": str(path) if path is not None else None,
        "relpath": os.path.relpath(path, run_dir.resolve()) if path is not None else None,
        "checkpoint": cfg.agent.vae_checkpoint,
        "weights_hash": vae.weights_hash,
        "image_shape": list(vae.image_shape),
        "latent_dim": vae.latent_dim,
        "vae": vae.config.vae.model_dump(mode="json"),
        "env": vae.config.env.preprocessing(),
    }
    if path is not None and (path / "summary.json").is_file():
        record["vae_summary"] = read_json(path / "summary.json")
    return record


def prepare_encoder(
    cfg: Config, vae_path: Path | None, run_dir: Path
) -> tuple[LoadedVAE | None, dict[str, Any] | None]:
    """The encoder a fresh run uses, checked against the env; writes ``vae.json``.

    :param cfg: the run config.
    :param vae_path: the ``--vae`` run folder, or ``None``.
    :param run_dir: the agent run folder (created by the caller).
    :return: ``(encoder, record)``; both ``None`` for a mode without an encoder (``pixel``).
    :raises UserError: no ``--vae`` for a mode that uses the VAE's weights, or a VAE whose frames
        differ from the env's.
    """
    from worldmodel.vae import LoadedVAE, build_vae, load_vae, save_checkpoint

    mode = get_mode(cfg.agent.obs_mode)
    if mode.uses_vae_weights and vae_path is None:
        others = " or ".join(m.name for m in MODES if not m.uses_vae_weights)
        raise UserError(
            f"agent.obs_mode={mode.name} needs a trained VAE: pass --vae VAE_RUN (a train-vae run "
            f"folder), or use obs_mode {others}"
        )
    if mode.encoder_kind is None:
        if vae_path is not None:
            log.warning("obs_mode %s: --vae %s is not used", mode.name, vae_path)
        return None, None
    vae = load_vae(Path(vae_path), cfg.agent.vae_checkpoint) if vae_path is not None else None
    if vae is not None:
        check_vae_matches_env(vae, cfg.env)
    if mode.encoder_kind == "vae":
        assert vae is not None
        record = _vae_record(vae, cfg, run_dir, "vae")
    else:
        # Same architecture as the given VAE (or cfg.vae), untrained, seeded by cfg.seed.
        vae_cfg = vae.config.vae if vae is not None else cfg.vae
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = build_vae(vae_cfg, cfg.env)
        save_checkpoint(run_dir / RANDOM_WEIGHTS, {"model": model.state_dict()})
        random_vae = LoadedVAE(model, cfg.model_copy(update={"vae": vae_cfg}))
        record = _vae_record(random_vae, cfg, run_dir, "random")
        record["architecture_from"] = str(Path(vae_path).resolve()) if vae_path else None
        record["weights_file"] = RANDOM_WEIGHTS
        vae = random_vae
    atomic_write_json(run_dir / VAE_RECORD, record)
    return vae, record


def read_vae_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``vae.json``, or ``None`` when it used no encoder (``pixel``)."""
    path = Path(run_dir) / VAE_RECORD
    return read_json(path) if path.is_file() else None


def locate_recorded_run(record: dict[str, Any], run_dir: Path) -> Path | None:
    """The folder of a run an agent run recorded (``vae.json``, ``memory.json``).

    Relative to the agent run first (``relpath``), then the absolute ``path``; ``None`` when
    neither exists.
    """
    for candidate in (
        Path(run_dir) / record["relpath"] if record.get("relpath") else None,
        Path(record["path"]) if record.get("path") else None,
    ):
        if candidate is not None and (candidate / "config.yaml").is_file():
            return candidate
    return None


def load_encoder(run_dir: Path, cfg: Config) -> LoadedVAE | None:
    """Rebuild the frozen encoder of a run's env wrapper (``latent``...) from its ``vae.json``.

    ``None`` for the modes without one: no encoder (``pixel``) or one inside the policy
    (``latent-finetune``, whose saved policy holds its own weights).

    :raises UserError: when the VAE run is gone or its weights changed since (hash mismatch).
    """
    from worldmodel.vae import LoadedVAE, build_vae, load_checkpoint, load_vae

    run_dir = Path(run_dir)
    record = read_vae_record(run_dir)
    if not get_mode(cfg.agent.obs_mode).frozen_encoder:
        return None
    if record is None:
        raise UserError(f"{run_dir} has no {VAE_RECORD}: it is not a complete agent run")
    if record["kind"] == "random":
        vae_cfg = model_cfg(record)
        model = build_vae(vae_cfg, cfg.env)
        model.load_state_dict(load_checkpoint(run_dir / record["weights_file"])["model"])
        vae = LoadedVAE(model, cfg.model_copy(update={"vae": vae_cfg}))
    else:
        path = locate_recorded_run(record, run_dir)
        if path is None:
            raise UserError(
                f"{run_dir} was trained on the VAE run {record['path']}, which is gone; "
                "restore it there (or next to the agent run as recorded in vae.json)"
            )
        vae = load_vae(path, record["checkpoint"])
    if vae.weights_hash != record["weights_hash"]:
        raise UserError(
            f"the VAE weights of {record.get('path') or run_dir} changed since {run_dir} was "
            f"trained (hash {vae.weights_hash[:12]} != recorded {record['weights_hash'][:12]}); "
            "restore the original VAE run"
        )
    return vae


def model_cfg(record: dict[str, Any]) -> Any:
    """The ``VAEConfig`` recorded in ``vae.json``."""
    from worldmodel.config import VAEConfig

    return VAEConfig.model_validate(record["vae"])
