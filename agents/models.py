"""The SB3 side of an agent run: algorithm, device, policy and its kwargs, loading a saved agent.

The policy is the mode's :attr:`~agents.modes.ObsModeSpec.default_policy` unless
``agent.policy`` is set; a mode with ``encoder_in_policy`` (``latent-finetune``) adds a
``VAEFeaturesExtractor`` built from the run's ``vae.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from agents.encoders import read_vae_record
from agents.modes import get_mode
from worldmodel.errors import UserError

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm
    from stable_baselines3.common.vec_env import VecEnv

    from worldmodel.config import Config

log = logging.getLogger("worldmodel")


def algo_class(name: str) -> type[BaseAlgorithm]:
    """The SB3 algorithm class called ``name`` (PPO, A2C, SAC, TD3, DQN)."""
    import stable_baselines3

    cls: type[BaseAlgorithm] = getattr(stable_baselines3, name)
    return cls


def agent_device(cfg: Config) -> torch.device:
    """The agent's torch device, with ``agent.torch_threads`` intra-op CPU threads.

    Small policies run batch-1 inference at every env step; with more than one thread they are
    ~100x slower when other processes share the cores (measured: NatureCNN forward on one 36x36
    frame 0.34 ms with 1 thread, 36 ms with 2 under load).
    """
    from worldmodel.utils import resolve_device

    device = resolve_device(cfg.agent.device)
    if cfg.agent.torch_threads > 0:
        torch.set_num_threads(cfg.agent.torch_threads)
    return device


def policy_and_kwargs(
    cfg: Config, record: dict[str, Any] | None, *, for_loading: bool = False
) -> tuple[str, dict[str, Any]]:
    """The SB3 policy name and the policy_kwargs our obs mode adds to the user's.

    :param for_loading: build the finetune extractor without reading the VAE run (a saved
        policy brings its own weights).
    """
    from agents.extractor import VAEFeaturesExtractor

    mode = get_mode(cfg.agent.obs_mode)
    name = cfg.agent.policy or mode.default_policy
    if not mode.encoder_in_policy:
        return name, {}
    assert record is not None
    kwargs: dict[str, Any] = {
        "vae_run": None if for_loading else record["path"],
        "checkpoint": record["checkpoint"],
        "latent_dim": record["latent_dim"],
        "widths": list(record["vae"]["widths"]),
        "channels": record["image_shape"][2],
        "latent": cfg.agent.latent,
    }
    return name, {
        "features_extractor_class": VAEFeaturesExtractor,
        "features_extractor_kwargs": kwargs,
    }


def full_policy_kwargs(
    cfg: Config, record: dict[str, Any] | None, user: dict[str, Any], *, for_loading: bool = False
) -> tuple[str, dict[str, Any]]:
    """Policy name and policy_kwargs: the user's (parsed) ones plus those of the obs mode."""
    name, extra = policy_and_kwargs(cfg, record, for_loading=for_loading)
    if "features_extractor_class" in extra and "features_extractor_class" in user:
        log.warning("obs_mode %s: ignoring policy_kwargs.features_extractor_class",
                    cfg.agent.obs_mode)
    return name, {**user, **extra}


def load_model(
    run_dir: Path,
    cfg: Config,
    checkpoint: Path,
    *,
    env: VecEnv | None = None,
    device: str | torch.device = "cpu",
) -> BaseAlgorithm:
    """Load a saved agent (``last.zip``/``best_model.zip``) without needing its VAE run.

    :raises UserError: when the file is missing or unreadable.
    """
    from agents.hyperparams import parse_hyperparams

    if not checkpoint.is_file():
        raise UserError(f"{checkpoint} not found; train the agent first (worldmodel train-agent)")
    algo = algo_class(cfg.agent.algo)
    custom: dict[str, Any] = {}
    if get_mode(cfg.agent.obs_mode).encoder_in_policy:
        user = parse_hyperparams(cfg.agent.hyperparams, algo).get("policy_kwargs", {})
        _, kwargs = full_policy_kwargs(cfg, read_vae_record(run_dir), user, for_loading=True)
        custom["policy_kwargs"] = kwargs
    try:
        return algo.load(checkpoint, env=env, device=device, custom_objects=custom)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{checkpoint}: cannot load the agent ({type(e).__name__}: {e})") from e
