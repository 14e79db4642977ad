from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from worldmodel.config import (
    Config,
    apply_overrides,
    load_run_config,
    load_yaml_dict,
    resolve_config,
)
from worldmodel.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_validate() -> None:
    cfg = Config()
    assert cfg.env.id == "worldmodel/Reach-v0"
    assert cfg.env.obs_shape == (64, 64, 3)
    assert cfg.vae.widths == [32, 64, 128, 256]


def test_overrides_are_yaml_scalars() -> None:
    cfg = resolve_config(
        None,
        ["vae.lr=1e-4", "env.grayscale=true", "pipeline.seeds=[3, 4]", "env.kwargs.continuous=yes"],
    )
    assert cfg.vae.lr == pytest.approx(1e-4)
    assert cfg.env.grayscale is True and cfg.env.obs_shape == (64, 64, 1)
    assert cfg.pipeline.seeds == [3, 4]
    assert cfg.env.kwargs == {"continuous": True}


def test_override_does_not_mutate_input() -> None:
    data = {"vae": {"lr": 0.1}}
    apply_overrides(data, ["vae.lr=0.2"])
    assert data == {"vae": {"lr": 0.1}}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("collect.bogus_key=1", "collect.bogus_key: unknown key; valid keys: episodes, frames"),
        ("nonsense=1", "nonsense: unknown key; valid keys: seed, env, collect"),
        ("env.crop.middle=1", "env.crop.middle: unknown key; valid keys: top, bottom, left, right"),
        ("vae.lr=abc", "vae.lr: input should be a valid number"),
        ("vae.lr=-1", "vae.lr: input should be greater than 0 (got -1)"),
        ("collect.policy=greedy", "collect.policy: must be random, brownian or agent:PATH"),
        ("vae", "expected dotted.key=value"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config(None, [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_frames_replaces_default_episodes() -> None:
    cfg = resolve_config(None, ["collect.frames=500"])
    assert cfg.collect.frames == 500 and cfg.collect.episodes is None
    with pytest.raises(ConfigError, match=r"exactly one of collect\.episodes and collect\.frames"):
        resolve_config(None, ["collect.frames=500", "collect.episodes=3"])


def test_extends_merges_deeply(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("seed: 3\nvae: {lr: 0.01, beta: 2.0}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nvae: {beta: 0.5}\n")
    cfg = resolve_config(tmp_path / "child.yaml", ["seed=4"])
    assert (cfg.seed, cfg.vae.lr, cfg.vae.beta) == (4, 0.01, 0.5)


def test_extends_loop_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_yaml_dict(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(tmp_path / "missing.yaml")


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("seed: 1\nenv: [unclosed\n")
    with pytest.raises(ConfigError, match="line"):
        resolve_config(tmp_path / "bad.yaml")


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = resolve_config(None, ["vae.latent_dim=7", "env.crop.bottom=12"])
    cfg.save(tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["vae"]["latent_dim"] == 7
    again = load_run_config(tmp_path)
    assert again == cfg
    assert again.digest() == cfg.digest()
    assert again.digest("vae") != resolve_config(None).digest("vae")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    resolve_config(path)
