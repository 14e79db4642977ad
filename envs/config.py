"""The ``env`` config section: which game, which backend and how its frames are preprocessed.

It lives in ``envs`` (the bottom layer) so that ``make_env`` needs nothing from the rest of the
project; :mod:`worldmodel.config` nests it in the full run config.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

#: What changing a setting changes, declared once beside the setting (``json_schema_extra``).
#: ``output``: what a stage produces (the default); ``runtime``: only how fast or where it runs,
#: or how often it logs (threads, devices, workers, cadences); ``budget``: how long it runs
#: (steps, episodes), which a resume may extend. Pipeline keys, ``--resume`` checks and
#: ``compare``'s grouping are all derived from this (:mod:`worldmodel.stages`).
Effect = Literal["output", "runtime", "budget"]
RUNTIME: dict[str, Any] = {"effect": "runtime"}
BUDGET: dict[str, Any] = {"effect": "budget"}
#: Marks the ``env`` settings that decide what a frame looks like (dataset/model compatibility).
FRAMES: dict[str, Any] = {"frames": True}


def field_effect(field: FieldInfo) -> Effect:
    """The declared :data:`Effect` of a config field (``output`` unless declared otherwise)."""
    extra = field.json_schema_extra
    effect = extra.get("effect", "output") if isinstance(extra, dict) else "output"
    assert effect in ("output", "runtime", "budget"), effect
    return effect  # type: ignore[return-value]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Crop(Section):
    """Pixels removed from each border of the raw frame, before resizing."""

    top: int = Field(0, ge=0)
    bottom: int = Field(0, ge=0)
    left: int = Field(0, ge=0)
    right: int = Field(0, ge=0)

    def is_empty(self) -> bool:
        """Whether this crop removes nothing."""
        return self.top == self.bottom == self.left == self.right == 0


class EnvConfig(Section):
    """How to build the environment and preprocess its frames.

    Observations reaching a stage are always ``uint8`` images ``(image_size, image_size, C)``
    with ``C = 1`` when ``grayscale`` else 3.
    """

    id: str = Field(
        "worldmodel/Reach-v0", json_schema_extra=FRAMES, description="Gymnasium env id."
    )
    backend: Literal["gymnasium", "envpool"] = Field(
        "gymnasium", description="Simulator: Gymnasium's own envs, or EnvPool's C++ ones."
    )
    image_size: int = Field(
        64, ge=8, le=512, json_schema_extra=FRAMES, description="Frames are resized to this square."
    )
    grayscale: bool = Field(
        False, json_schema_extra=FRAMES, description="One channel instead of RGB."
    )
    crop: Crop | None = Field(
        None,
        json_schema_extra=FRAMES,
        description="Border crop before resizing; null uses the env family's default "
        "(CarRacing: bottom 12 rows, its dashboard).",
    )
    frame_skip: int = Field(
        1,
        ge=1,
        json_schema_extra=FRAMES,
        description="Repeat each action this many frames, summing rewards (Atari: 4).",
    )
    max_episode_steps: int | None = Field(
        None, ge=1, description="Truncate episodes after this many agent steps."
    )
    n_envs: int = Field(4, ge=1, description="Parallel envs for agent training.")
    vec_env: Literal["dummy", "subproc"] = Field(
        "dummy", json_schema_extra=RUNTIME, description="SB3 VecEnv class for agent training."
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        json_schema_extra=FRAMES,
        description="Extra keyword arguments for gymnasium.make.",
    )

    @property
    def channels(self) -> int:
        """Number of image channels of the preprocessed frames."""
        return 1 if self.grayscale else 3

    @property
    def obs_shape(self) -> tuple[int, int, int]:
        """Shape ``(H, W, C)`` of one preprocessed frame."""
        return (self.image_size, self.image_size, self.channels)

    def preprocessing(self) -> dict[str, Any]:
        """The settings that decide what frames look like (for dataset/model compatibility)."""
        return self.model_dump(include=frame_keys())


def frame_keys() -> set[str]:
    """The ``env`` keys marked :data:`FRAMES`: they decide what a preprocessed frame looks like."""
    return {k for k, f in EnvConfig.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("frames")}
