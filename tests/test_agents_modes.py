"""The observation-mode table: lookups, validation, and its agreement with the code using it."""

from __future__ import annotations

import dataclasses

import pytest

from agents.modes import (
    MODE_NAMES,
    MODES,
    ObsModeSpec,
    check_modes,
    get_mode,
    modes_help,
    report_rank,
)
from agents.wrapping import WRAPPERS
from worldmodel.config import AgentConfig, Config, resolve_config
from worldmodel.errors import ConfigError, UserError


def test_table_rows() -> None:
    assert MODE_NAMES == ("pixel", "latent", "latent-finetune", "random-encoder",
                          "latent-memory", "latent-memory-untrained", "dream")
    pixel, latent, finetune, random, memory, control, dream = MODES
    assert (pixel.encoder_kind, latent.encoder_kind, finetune.encoder_kind,
            random.encoder_kind) == (None, "vae", "vae", "random")
    assert [m.name for m in MODES if m.uses_vae_weights] == [
        "latent", "latent-finetune", "latent-memory", "latent-memory-untrained", "dream"]
    assert [m.name for m in MODES if m.frozen_encoder] == [
        "latent", "random-encoder", "latent-memory", "latent-memory-untrained", "dream"]
    assert [m.memory_kind for m in MODES] == [None] * 4 + ["memory", "random", "memory"]
    assert memory.wrapper == control.wrapper == dream.wrapper == "latents-memory"
    assert [m.name for m in MODES if m.trains_in == "dream"] == ["dream"]
    assert [m.default_policy for m in MODES] == ["CnnPolicy", "MlpPolicy", "CnnPolicy",
                                                 "MlpPolicy", "MlpPolicy", "MlpPolicy",
                                                 "MlpPolicy"]
    assert all(m.wrapper in WRAPPERS for m in MODES)
    assert all(m.policy_input == ("latents" if m.frozen_encoder else "frames") for m in MODES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pixel.name = "other"  # type: ignore[misc]


def test_rows_that_contradict_themselves_are_rejected() -> None:
    with pytest.raises(ValueError, match="uses_vae_weights needs needs_vae_run"):
        dataclasses.replace(MODES[0], name="bad", uses_vae_weights=True)
    with pytest.raises(ValueError, match="encoder_in_policy needs needs_vae_run"):
        dataclasses.replace(MODES[0], name="bad", encoder_in_policy=True)
    with pytest.raises(ValueError, match="uses_memory_weights needs needs_memory_run"):
        dataclasses.replace(MODES[1], name="bad", uses_memory_weights=True)
    with pytest.raises(ValueError, match="needs_memory_run needs a frozen encoder"):
        dataclasses.replace(MODES[2], name="bad", needs_memory_run=True)
    with pytest.raises(ValueError, match="trains_in dream"):
        dataclasses.replace(MODES[5], name="bad", trains_in="dream")  # an untrained M


def test_get_mode() -> None:
    assert get_mode("latent") is MODES[1]
    assert isinstance(get_mode("latent"), ObsModeSpec)
    with pytest.raises(ConfigError) as e:
        get_mode("telepathy")
    assert isinstance(e.value, UserError)
    assert str(e.value) == ("agent.obs_mode: unknown observation mode 'telepathy'; expected one "
                            "of pixel, latent, latent-finetune, random-encoder, latent-memory, "
                            "latent-memory-untrained, dream")


def test_report_rank_follows_the_table() -> None:
    assert [report_rank(n) for n in MODE_NAMES] == list(range(len(MODES)))
    assert report_rank("retired-mode") == len(MODES)


def _with_modes(agent: str, pipeline: list[str]) -> Config:
    cfg = resolve_config(None, [])
    return cfg.model_copy(update={
        "agent": cfg.agent.model_copy(update={"obs_mode": agent}),
        "pipeline": cfg.pipeline.model_copy(update={"obs_modes": pipeline}),
    })


def test_check_modes() -> None:
    check_modes(resolve_config(None, []))
    check_modes(_with_modes("random-encoder", list(MODE_NAMES)))
    with pytest.raises(ConfigError, match=r"^agent\.obs_mode: unknown observation mode 'x'"):
        check_modes(_with_modes("x", ["pixel"]))
    with pytest.raises(ConfigError, match=r"^pipeline\.obs_modes\[1\]: unknown .* 'telepathy'; "
                                          r"expected one of pixel, latent, "):
        check_modes(_with_modes("pixel", ["pixel", "telepathy"]))


def test_config_describes_every_mode() -> None:
    """``worldmodel/config.py`` cannot import the table: its help text must follow it."""
    assert AgentConfig.model_fields["obs_mode"].description == modes_help()
