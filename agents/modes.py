"""Observation modes as data: one :class:`ObsModeSpec` row per ``agent.obs_mode``.

Everything that differs between modes is read from the mode's row, never from its name:

* the pipeline passes the VAE run to modes that ``needs_vae_run``, and makes their results
  depend on the VAE stage when they ``uses_vae_weights``;
* :func:`agents.encoders.prepare_encoder` requires ``--vae`` when ``uses_vae_weights``, builds an
  untrained encoder when only the architecture is borrowed, and none without ``needs_vae_run``;
* :func:`agents.wrapping.wrap_observations` wraps the raw frames with the row's ``wrapper``;
* modes that ``needs_memory_run`` get a memory run M (``--memory``; the pipeline's
  ``train-memory``) and observe ``[z_t, h_t]`` (:mod:`agents.memory_obs`); with
  ``uses_memory_weights`` its trained weights, otherwise an untrained M of its architecture;
* :mod:`agents.models` picks ``default_policy`` and, with ``encoder_in_policy``, puts the VAE
  encoder inside the policy as its features extractor;
* modes that train ``in "dream"`` train inside M's dream (:mod:`worldmodel.dream`, observing
  ``[z, h]`` as the memory modes do) and are evaluated in the real env;
* ``compare`` reports groups in the table's order.

Adding a mode means adding a row to :data:`MODES` (plus, for a new kind of observation, its
wrapper in :data:`agents.wrapping.WRAPPERS`) and its name in the description of
``agent.obs_mode`` in ``worldmodel/config.py`` (which cannot import this module).

This module imports nothing heavy, so the CLI can validate a config with :func:`check_modes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from worldmodel.errors import ConfigError

if TYPE_CHECKING:
    from worldmodel.config import Config

#: What the policy network observes: image frames or VAE latent vectors (with M's state).
PolicyInput = Literal["frames", "latents"]
#: How raw env frames become observations; a key of :data:`agents.wrapping.WRAPPERS`.
WrapperKind = Literal["frames", "latents", "latents-memory"]
#: Where the agent trains: the real env, or M's dream (World Models' "training inside the dream").
TrainsIn = Literal["real", "dream"]


@dataclass(frozen=True)
class ObsModeSpec:
    """One observation mode: how its agents are built, trained, evaluated and reported.

    :param name: the ``agent.obs_mode`` value.
    :param description: one line, for help texts and docs.
    :param needs_vae_run: it has an encoder whose architecture (and maybe weights) comes from a
        VAE run: the pipeline passes its VAE run (``--vae``); without, there is no encoder.
    :param uses_vae_weights: its results depend on the VAE run's trained weights (``--vae`` is
        required); otherwise it only borrows the architecture and trains with random weights.
    :param policy_input: what the policy network observes.
    :param default_policy: the SB3 policy when ``agent.policy`` is unset.
    :param wrapper: how the env's frames are wrapped into observations.
    :param encoder_in_policy: the VAE encoder is inside the policy (its features extractor) and
        trained with it, instead of frozen in the env wrapper.
    :param needs_memory_run: the policy also observes the LSTM state ``h_t`` of a memory model M
        whose architecture (and maybe weights) comes from a memory run (``--memory``).
    :param uses_memory_weights: its results depend on the memory run's trained weights;
        otherwise M is untrained (seeded by ``seed``), borrowing only the architecture.
    :param trains_in: ``"real"``: it trains in the env; ``"dream"``: in the dream of its trained
        M (:func:`worldmodel.dream.make_dream_env`), while its periodic and final evaluations
        run in the real env, observed as ``[z, h]`` (the ``latents-memory`` wrapper).
    """

    name: str
    description: str
    needs_vae_run: bool
    uses_vae_weights: bool
    policy_input: PolicyInput
    default_policy: Literal["CnnPolicy", "MlpPolicy"]
    wrapper: WrapperKind
    encoder_in_policy: bool = False
    needs_memory_run: bool = False
    uses_memory_weights: bool = False
    trains_in: TrainsIn = "real"

    def __post_init__(self) -> None:
        """Reject rows that contradict themselves."""
        if self.uses_vae_weights and not self.needs_vae_run:
            raise ValueError(f"obs mode {self.name}: uses_vae_weights needs needs_vae_run")
        if self.encoder_in_policy and not self.needs_vae_run:
            raise ValueError(f"obs mode {self.name}: encoder_in_policy needs needs_vae_run")
        if self.uses_memory_weights and not self.needs_memory_run:
            raise ValueError(f"obs mode {self.name}: uses_memory_weights needs needs_memory_run")
        if self.needs_memory_run and not self.frozen_encoder:
            raise ValueError(f"obs mode {self.name}: needs_memory_run needs a frozen encoder")
        if self.trains_in == "dream" and not (self.uses_memory_weights
                                              and self.wrapper == "latents-memory"):
            raise ValueError(f"obs mode {self.name}: trains_in dream needs a trained M and the "
                             "latents-memory wrapper (the dream observes [z, h])")

    @property
    def memory_kind(self) -> Literal["memory", "random"] | None:
        """The ``kind`` recorded in ``memory.json``: trained M, untrained M, or no M."""
        if not self.needs_memory_run:
            return None
        return "memory" if self.uses_memory_weights else "random"

    @property
    def encoder_kind(self) -> Literal["vae", "random"] | None:
        """The ``kind`` recorded in ``vae.json``: trained weights, random weights, or no encoder."""
        if not self.needs_vae_run:
            return None
        return "vae" if self.uses_vae_weights else "random"

    @property
    def frozen_encoder(self) -> bool:
        """The env wrapper holds a frozen encoder (rebuilt from ``vae.json`` at load time)."""
        return self.needs_vae_run and not self.encoder_in_policy


#: Every observation mode, in report order.
MODES: tuple[ObsModeSpec, ...] = (
    ObsModeSpec(
        name="pixel",
        description="CnnPolicy on frames",
        needs_vae_run=False,
        uses_vae_weights=False,
        policy_input="frames",
        default_policy="CnnPolicy",
        wrapper="frames",
    ),
    ObsModeSpec(
        name="latent",
        description="MlpPolicy on a frozen VAE's latents",
        needs_vae_run=True,
        uses_vae_weights=True,
        policy_input="latents",
        default_policy="MlpPolicy",
        wrapper="latents",
    ),
    ObsModeSpec(
        name="latent-finetune",
        description="the VAE encoder inside the policy, trained",
        needs_vae_run=True,
        uses_vae_weights=True,
        policy_input="frames",
        default_policy="CnnPolicy",
        wrapper="frames",
        encoder_in_policy=True,
    ),
    ObsModeSpec(
        name="random-encoder",
        description="an untrained frozen encoder (control)",
        needs_vae_run=True,
        uses_vae_weights=False,
        policy_input="latents",
        default_policy="MlpPolicy",
        wrapper="latents",
    ),
    ObsModeSpec(
        name="latent-memory",
        description="MlpPolicy on [z, h]: a frozen VAE's latents and M's LSTM state",
        needs_vae_run=True,
        uses_vae_weights=True,
        policy_input="latents",
        default_policy="MlpPolicy",
        wrapper="latents-memory",
        needs_memory_run=True,
        uses_memory_weights=True,
    ),
    ObsModeSpec(
        name="latent-memory-untrained",
        description="[z, h] with an untrained M (control)",
        needs_vae_run=True,
        uses_vae_weights=True,
        policy_input="latents",
        default_policy="MlpPolicy",
        wrapper="latents-memory",
        needs_memory_run=True,
    ),
    ObsModeSpec(
        name="dream",
        description="[z, h] as latent-memory, trained only in M's dream, scored in the real env",
        needs_vae_run=True,
        uses_vae_weights=True,
        policy_input="latents",
        default_policy="MlpPolicy",
        wrapper="latents-memory",
        needs_memory_run=True,
        uses_memory_weights=True,
        trains_in="dream",
    ),
)

_BY_NAME = {spec.name: spec for spec in MODES}
assert len(_BY_NAME) == len(MODES), "duplicate obs mode names"

#: The mode names, in report order.
MODE_NAMES: tuple[str, ...] = tuple(_BY_NAME)


def get_mode(name: str, key: str = "agent.obs_mode") -> ObsModeSpec:
    """The row of mode ``name``.

    :param key: the config key named in the error.
    :raises ConfigError: (a ``UserError``) for an unknown mode, naming the valid ones.
    """
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"{key}: unknown observation mode {name!r}; expected one of {', '.join(MODE_NAMES)}"
        ) from None


def report_rank(name: str) -> int:
    """Where mode ``name`` goes in reports: its row index; unknown modes come last."""
    spec = _BY_NAME.get(name)
    return MODES.index(spec) if spec is not None else len(MODES)


def modes_help() -> str:
    """``pixel: CnnPolicy on frames; latent: ...``: every mode and its description, one line."""
    return "; ".join(f"{spec.name}: {spec.description}" for spec in MODES) + "."


def check_modes(cfg: Config) -> None:
    """Check ``agent.obs_mode`` and ``pipeline.obs_modes`` against the table.

    :raises ConfigError: (a ``UserError``, one line) at the first unknown mode.
    """
    get_mode(cfg.agent.obs_mode)
    for i, name in enumerate(cfg.pipeline.obs_modes):
        get_mode(name, f"pipeline.obs_modes[{i}]")
