"""Agents with the real stages around them: a train-vae run, and agent:PATH collection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from agent_testing import VAE_SETTINGS, agent_config

from agents import evaluate, train
from agents.policy import make_policy
from worldmodel import collect, train_vae
from worldmodel.config import resolve_config
from worldmodel.dataset import open_dataset
from worldmodel.io import read_json
from worldmodel.vae import load_vae


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny dataset, a real (short) train-vae run on it, and a latent agent on that VAE."""
    root = tmp_path_factory.mktemp("stages")
    cfg = resolve_config(None, [
        "env.image_size=32", *VAE_SETTINGS, "collect.episodes=4", "collect.workers=1",
        "vae.steps=6", "vae.batch_size=16", "vae.val_every=3", "vae.val_frames=64",
        "vae.probe_frames=0", "vae.device=cpu",
    ])
    data = collect.run(cfg, root / "data")
    vae = train_vae.run(cfg, data, root / "vae")
    agent = train.run(agent_config("latent", timesteps=64), root / "agent", vae=vae)
    return {"data": data, "vae": vae, "agent": agent}


def test_agent_on_a_train_vae_run(stages: dict[str, Path]) -> None:
    record = read_json(stages["agent"] / "vae.json")
    vae = load_vae(stages["vae"])
    assert record["weights_hash"] == vae.weights_hash and record["kind"] == "vae"
    assert "vae_summary" in record  # the VAE run's summary.json travels with the agent
    result = read_json(evaluate.run(stages["agent"], episodes=2))
    assert len(result["returns"]) == 2


@pytest.mark.slow
def test_collect_with_an_agent_policy(stages: dict[str, Path], tmp_path: Path) -> None:
    cfg = resolve_config(None, [
        "env.image_size=32", "env.max_episode_steps=20", "collect.episodes=3",
        "collect.workers=1", f"collect.policy=agent:{stages['agent']}", "collect.epsilon=0.2",
    ])
    out = collect.run(cfg, tmp_path / "data", make_policy=make_policy)
    reader = open_dataset(out)
    assert reader.num_episodes == 3
    actions = np.concatenate([reader.episode(i).action for i in range(3)])
    assert set(np.unique(actions)) <= set(range(5))
    again = collect.run(cfg, tmp_path / "again", make_policy=make_policy)  # seeded per episode
    assert np.array_equal(
        open_dataset(again).episode(2).action, reader.episode(2).action
    )
