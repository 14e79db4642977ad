"""Property-based: no ``--set`` value and no config file ends in anything but a one-line error."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.modes import check_modes
from worldmodel.config import resolve_config
from worldmodel.errors import ConfigError, UserError
from worldmodel.stages import config_effects

KEYS = sorted(config_effects())
key = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: k + ".sub"),
    st.sampled_from(["bogus", "env.bogus", "agent.hyperparams.gamma", "env.crop.top",
                     "collect.", ".seed", "vae..lr", "env.kwargs.continuous"]),
    st.text(max_size=20),
)
scalar = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
)
value = st.recursive(scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8)


def _check(overrides: list[str], path: Path | None = None) -> None:
    """Either a valid config (that the mode table accepts) or one ``UserError`` line."""
    try:
        cfg = resolve_config(path, overrides)
        check_modes(cfg)
    except UserError as e:
        assert isinstance(e, ConfigError) or "mode" in str(e)
        assert str(e) and "\n" not in str(e), repr(str(e))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(key, value)
def test_any_set_value_is_a_config_or_one_line(k: str, v: object) -> None:
    text = yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()
    text = text.removesuffix("\n...").strip()
    _check([f"{k}={text}"])


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(max_size=60))
def test_any_set_string_is_a_config_or_one_line(item: str) -> None:
    _check([item])


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200),
                 st.dictionaries(st.sampled_from(["seed", "env", "vae", "extends", "agent", "x"]),
                                 value, max_size=4).map(
                     lambda d: yaml.safe_dump(d).encode())))
def test_any_config_file_is_a_config_or_one_line(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(content)
        _check([], path)
