"""The validated run config: one pydantic model with a section per stage.

Configs are YAML files (``configs/*.yaml``) that may ``extends:`` another file, plus dotted
``--set key=value`` overrides whose values are parsed as YAML scalars. Every stage writes the
resolved config into its run folder as ``config.yaml``.

Example:
    >>> cfg = resolve_config(None, ["vae.latent_dim=16", "env.image_size=32"])
    >>> cfg.vae.latent_dim, cfg.env.obs_shape
    (16, (32, 32, 3))
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from envs.config import BUDGET, RUNTIME, EnvConfig, Section, field_effect
from worldmodel.errors import ConfigError, ConfigNotFoundError
from worldmodel.io import atomic_write_text

#: An ``agent.obs_mode`` name. The modes are a table in ``agents/modes.py`` (a layer above this
#: one), which the CLI and the pipeline check a config against (``agents.modes.check_modes``).
ObsMode = str
Device = Literal["auto", "cpu", "cuda"]

#: The largest ``seed`` (and ``pipeline.seeds`` entry, ``evaluate --seed``): NumPy's and SB3's
#: global seeding takes 32-bit seeds, and derived seeds (evaluation ``seed + 1000 + i``, env
#: ``i`` at ``seed + i``) must stay below ``2**32`` too, so seeds are non-negative int32s.
MAX_SEED = 2**31 - 1


class CollectConfig(Section):
    """``worldmodel collect``: how rollouts are gathered into a dataset."""

    episodes: int | None = Field(
        100, ge=1,
        json_schema_extra=BUDGET,
        description="Episodes to collect.",
    )
    frames: int | None = Field(
        None, ge=1,
        json_schema_extra=BUDGET,
        description="Alternatively, collect whole episodes until this many frames."
    )
    workers: int = Field(
        2, ge=1,
        json_schema_extra=RUNTIME,
        description="Parallel worker processes (or Ray tasks).",
    )
    policy: str = Field(
        "random",
        description="random | brownian (temporally correlated, World Models' CarRacing "
        "policy) | agent:PATH (a trained agent run of this project).",
    )
    epsilon: float = Field(
        0.0, ge=0.0, le=1.0, description="With agent:PATH, probability of a random action."
    )
    max_episode_steps: int | None = Field(None, ge=1, description="Cap on each episode's length.")
    backend: Literal["process", "ray", "envpool"] = Field(
        "process", description="process: local worker processes; ray: Ray tasks; envpool: "
        "EnvPool's batched threads in one process."
    )
    ray_address: str | None = Field(
        None,
        json_schema_extra=RUNTIME,
        description="Ray cluster address (null: start a local Ray)."
    )
    chunk_frames: int = Field(256, ge=1, description="Frames per zarr chunk along time.")
    commit_seconds: float = Field(
        2.0,
        ge=0.0,
        json_schema_extra=RUNTIME,
        description="Each worker commits its finished episodes at least this often (0: after "
        "every episode); an episode is visible, and survives a crash, once committed.",
    )
    brownian_dt: float = Field(
        1 / 50,
        gt=0.0,
        le=1.0,
        description="brownian policy: a_{t+1} = clip(a_t + sqrt(dt) N(0, 1)) for Box actions; "
        "Discrete actions are resampled with probability sqrt(dt) per step.",
    )

    @field_validator("policy")
    @classmethod
    def _check_policy(cls, value: str) -> str:
        if value in ("random", "brownian") or (value.startswith("agent:") and len(value) > 6):
            return value
        raise ValueError("must be random, brownian or agent:PATH")

    @model_validator(mode="before")
    @classmethod
    def _frames_replace_episodes(cls, data: Any) -> Any:
        """Setting only ``frames`` drops the default ``episodes``."""
        if isinstance(data, dict) and data.get("frames") is not None and "episodes" not in data:
            data = {**data, "episodes": None}
        return data

    @model_validator(mode="after")
    def _episodes_or_frames(self) -> CollectConfig:
        if (self.episodes is None) == (self.frames is None):
            raise ValueError("set exactly one of collect.episodes and collect.frames")
        return self


class DataConfig(Section):
    """How datasets are read for training."""

    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Fraction of episodes held out for validation."
    )
    cache_bytes: int = Field(
        512 * 2**20, ge=2**20, description="Memory budget for decompressed frames in the loader."
    )
    loader_workers: int = Field(
        1, ge=0,
        json_schema_extra=RUNTIME,
        description="Threads that decompress chunks ahead of the trainer (0: inline)."
    )


class VAEConfig(Section):
    """The ConvVAE and ``worldmodel train-vae``. Input size and channels come from ``env``."""

    latent_dim: int = Field(32, ge=1, description="Size of the latent vector z.")
    widths: list[int] = Field(
        default_factory=lambda: [32, 64, 128, 256],
        min_length=1,
        description="Encoder conv channels (stride 2 each); the decoder mirrors them.",
    )
    decoder: Literal["deconv", "broadcast"] = Field(
        "deconv",
        description="deconv: World Models' decoder (linear layer, transposed convs); broadcast: "
        "a spatial broadcast decoder (z tiled over a grid with x/y channels), which learns "
        "object positions as linear latent directions.",
    )
    broadcast_size: int = Field(
        8, ge=1, description="broadcast decoder: grid side (the smallest encoder map >= this)."
    )
    beta: float = Field(1.0, ge=0.0, description="Weight of the KL term.")
    kl_warmup_steps: int = Field(
        0,
        ge=0,
        description="Ramp the KL weight linearly from 0 to beta over this many steps (0: off); "
        "lets the VAE leave the mean-image plateau sooner.",
    )
    kl_tolerance: float = Field(
        0.0, ge=0.0, description="Free bits: KL per latent dimension below this is not penalised."
    )
    recon_loss: Literal["mse", "bce"] = Field("mse", description="Reconstruction loss.")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate.")
    batch_size: int = Field(64, ge=1)
    steps: int | None = Field(
        2000, ge=1,
        json_schema_extra=BUDGET,
        description="Optimizer steps (or set epochs).",
    )
    epochs: int | None = Field(
        None, ge=1,
        json_schema_extra=BUDGET,
        description="Passes over the training frames.",
    )
    val_every: int = Field(
        250, ge=1, description="Validate (metrics, best.pt, last.pt) every N steps and at the end."
    )
    val_frames: int = Field(
        2048, ge=1, description="Validation frames (a seeded sample of the held-out episodes)."
    )
    probe_frames: int = Field(
        5000,
        ge=0,
        description="Frames per split (train/held-out episodes) for the representation metrics "
        "(linear probe, KNN-MSE) on datasets with a true state; 0 turns them off.",
    )
    knn_k: int = Field(5, ge=1, description="Neighbours of the KNN-MSE metric.")
    log_every: int = Field(
        25, ge=1,
        json_schema_extra=RUNTIME,
        description="Log training scalars every N steps.",
    )
    image_every: int = Field(
        500, ge=1,
        json_schema_extra=RUNTIME,
        description="Log an image grid every N steps.",
    )
    device: Device = Field("auto", json_schema_extra=RUNTIME)

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_steps(cls, data: Any) -> Any:
        """Setting only ``epochs`` drops the default ``steps``."""
        if isinstance(data, dict) and data.get("epochs") is not None and "steps" not in data:
            data = {**data, "steps": None}
        return data

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> VAEConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of vae.steps and vae.epochs")
        return self


class MemoryConfig(Section):
    """The memory model M (an MDN-RNN) and ``worldmodel train-memory``.

    Defaults follow World Models' CarRacing M (Ha & Schmidhuber 2018; hardmaru's
    ``carracing/rnn/rnn.py``): an LSTM of 256 units, 5 Gaussians per latent dimension, Adam
    1e-3, gradient clip 1.0. The latent size comes from the ``--vae`` run.
    """

    hidden_size: int = Field(256, ge=1, description="LSTM hidden units H.")
    mixtures: int = Field(5, ge=1, description="Gaussians K per latent dimension.")
    seq_len: int = Field(
        32, ge=1,
        description="Steps per training window (windows never cross episodes; shorter "
        "episodes are padded and masked). World Models used 1,000 on CarRacing.",
    )
    batch_size: int = Field(100, ge=1, description="Windows per batch.")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate.")
    grad_clip: float = Field(1.0, gt=0.0, description="Clip the gradient norm to this.")
    steps: int | None = Field(
        2000, ge=1,
        json_schema_extra=BUDGET,
        description="Optimizer steps (or set epochs).",
    )
    epochs: int | None = Field(
        None, ge=1,
        json_schema_extra=BUDGET,
        description="Passes over the training windows.",
    )
    reward_weight: float = Field(
        1.0, ge=0.0,
        description="Weight of the reward head's loss (Huber on standardised rewards).",
    )
    done_weight: float = Field(
        1.0, ge=0.0,
        description="Weight of the done head's cross-entropy in the loss (World Models' Doom "
        "M used 10).",
    )
    temperature: float = Field(
        1.0, gt=0.0,
        description="Dream temperature tau: mixture logits / tau, Gaussian noise * sqrt(tau) "
        "(the default of the memory's sample(); training does not read it).",
    )
    val_every: int = Field(
        250, ge=1, description="Validate (metrics, best.pt, last.pt) every N steps and at the end."
    )
    log_every: int = Field(
        25, ge=1,
        json_schema_extra=RUNTIME,
        description="Log training scalars every N steps.",
    )
    device: Device = Field("auto", json_schema_extra=RUNTIME)
    vae_checkpoint: Literal["best", "last"] = Field(
        "best", description="Which checkpoint of the --vae run encodes the dataset."
    )

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_steps(cls, data: Any) -> Any:
        """Setting only ``epochs`` drops the default ``steps``."""
        if isinstance(data, dict) and data.get("epochs") is not None and "steps" not in data:
            data = {**data, "steps": None}
        return data

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> MemoryConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of memory.steps and memory.epochs")
        return self


class AgentConfig(Section):
    """Stable-Baselines3 agents and ``worldmodel train-agent``."""

    algo: Literal["PPO", "A2C", "SAC", "TD3", "DQN"] = "PPO"
    obs_mode: ObsMode = Field(
        "latent",
        description="pixel: CnnPolicy on frames; latent: MlpPolicy on a frozen VAE's latents; "
        "latent-finetune: the VAE encoder inside the policy, trained; random-encoder: an "
        "untrained frozen encoder (control); latent-memory: MlpPolicy on [z, h]: a frozen "
        "VAE's latents and M's LSTM state; latent-memory-untrained: [z, h] with an untrained M "
        "(control); dream: [z, h] as latent-memory, trained only in M's dream, scored in the "
        "real env.",
    )
    timesteps: int = Field(
        100_000, ge=1,
        json_schema_extra=BUDGET,
        description="Env steps to train for.",
    )
    history: int = Field(
        1, ge=1, description="Stack the last N frames (pixel) or latents (latent modes)."
    )
    latent: Literal["mean", "sample"] = Field("mean", description="Which latent to observe.")
    standardize: bool = Field(
        True,
        description="Latent modes (and the dream): the policy observes z (or [z, h]) "
        "standardised per dimension with statistics of the VAE's dataset under the mode's own "
        "encoder and M (recorded in features.json), so a control differs from its arm only in "
        "the weights.",
    )
    policy: str | None = Field(
        None, description="SB3 policy name; null picks CnnPolicy for pixel, else MlpPolicy."
    )
    hyperparams: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the SB3 algorithm."
    )
    normalize_reward: bool = Field(False, description="VecNormalize the rewards only.")
    eval_every: int = Field(
        10_000, ge=1,
        json_schema_extra=RUNTIME,
        description="Evaluate every N env steps.",
    )
    eval_episodes: int = Field(10, ge=1, description="Episodes per periodic evaluation.")
    checkpoint_every: int = Field(
        25_000, ge=1,
        json_schema_extra=RUNTIME,
        description="Save last.zip every N env steps.",
    )
    eval_envs: int = Field(
        1,
        ge=1,
        description="Parallel envs of the periodic evaluation (seeded apart from training).",
    )
    eval_deterministic: bool = Field(
        True,
        description="Greedy actions when evaluating: the periodic evaluations during training "
        "and, unless --deterministic/--stochastic says otherwise, `worldmodel evaluate`.",
    )
    vae_checkpoint: Literal["best", "last"] = Field(
        "best", description="Which checkpoint of the --vae run the latent modes use."
    )
    replay_buffer_max_mb: int = Field(
        512,
        ge=0,
        json_schema_extra=RUNTIME,
        description="Off-policy algos: save the replay buffer with last.zip (for --resume) when it "
        "takes at most this many MB; 0 never saves it.",
    )
    torch_threads: int = Field(
        1,
        ge=0,
        json_schema_extra=RUNTIME,
        description="PyTorch intra-op CPU threads of the agent (0: leave torch's setting). 1 is "
        "fastest for small policies, batch-1 inference, and when other jobs share the cores.",
    )
    device: Device = Field("auto", json_schema_extra=RUNTIME)


class CompareConfig(Section):
    """``worldmodel compare``: statistics over agent runs."""

    random_episodes: int = Field(
        30, ge=1, description="Episodes of the random-policy baseline."
    )
    bootstrap_reps: int = Field(2000, ge=100, description="Stratified bootstrap resamples.")
    confidence: float = Field(0.95, gt=0.0, lt=1.0)


class PipelineConfig(Section):
    """``worldmodel pipeline``: collect -> train-vae -> train-agent -> evaluate -> compare."""

    obs_modes: list[ObsMode] = Field(
        default_factory=lambda: ["pixel", "latent", "random-encoder"],
        min_length=1,
        description="Observation modes to train (the rows of agents/modes.py), one arm each.",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2], min_length=1, description="Seeds of every arm."
    )
    parallel: int = Field(
        1, ge=1,
        json_schema_extra=RUNTIME,
        description="Agent runs trained at once.",
    )
    backend: Literal["process", "ray"] = Field("process", json_schema_extra=RUNTIME)
    eval_episodes: int = Field(20, ge=1, description="Final evaluation episodes per agent.")
    visualize: bool = Field(True, description="Run the visualize stage on the VAE.")

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, value: list[int]) -> list[int]:
        bad = [s for s in value if not 0 <= s <= MAX_SEED]
        if bad:
            raise ValueError(f"each seed must be between 0 and {MAX_SEED}")
        return value


class IterateConfig(Section):
    """``worldmodel iterate``: collect with the dream agent, retrain M, train in the dream again."""

    rounds: int = Field(
        3, ge=1,
        json_schema_extra=BUDGET,
        description="Rounds of collect -> train-memory (on all data) -> train a dream agent "
        "(`--rounds` overrides it; a rerun with more rounds extends the run).",
    )
    episodes: int = Field(
        20, ge=1, description="Episodes each round collects with the previous round's agent."
    )
    epsilon: float = Field(
        0.1, ge=0.0, le=1.0,
        description="Exploration noise while collecting: probability of a random action "
        "(the round's collect.epsilon).",
    )


class Config(Section):
    """The whole run config. Each stage reads its own sections plus ``seed`` and ``env``."""

    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seeds everything: envs, networks, data order."
    )
    env: EnvConfig = Field(default_factory=EnvConfig)
    collect: CollectConfig = Field(default_factory=CollectConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    vae: VAEConfig = Field(default_factory=VAEConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    iterate: IterateConfig = Field(default_factory=IterateConfig)

    def to_yaml(self) -> str:
        """The config as YAML, every key spelled out."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: Path) -> None:
        """Write :meth:`to_yaml` atomically to ``path``."""
        atomic_write_text(path, self.to_yaml())

    def digest(self, *sections: str) -> str:
        """A short hash of the given sections (all when none): equal hashes, equal settings."""
        data = self.model_dump(mode="json", include=set(sections) if sections else None)
        text = json.dumps(data, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml_dict(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, resolving ``extends: other.yaml`` (relative to the file) first."""
    path = Path(path)
    try:
        found = path.is_file()
    except OSError as e:  # a name too long for the file system, ...
        raise ConfigError(f"config file {str(path)[:80]!r}...: {e.strerror or e}") from None
    if not found:
        raise ConfigNotFoundError(
            f"config file {str(path)!r} not found; pass an existing --config"
        )
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason}); save it as UTF-8 YAML"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)
        problem = " ".join(str(problem).split())  # one line, whatever the YAML error says
        raise ConfigError(f"{path}{line}: not valid YAML ({problem})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data)}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{path}: 'extends' must name a config file, got {parent!r}")
    base = load_yaml_dict(path.parent / parent, (*_seen, path.resolve()))
    return _deep_merge(base, data)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` strings; values are parsed as YAML (``1e-3``, ``[1, 2]``)."""
    out = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. vae.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML") from e
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def flatten_dotted(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``dotted.key -> value`` (the keys :func:`apply_overrides` takes).

    An empty mapping stays a value, so ``{}`` and a missing key compare unequal.

    Example:
        >>> flatten_dotted({"seed": 0, "env": {"id": "X", "kwargs": {}}})
        {'seed': 0, 'env.id': 'X', 'env.kwargs': {}}
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_dotted(value, f"{name}."))
        else:
            out[name] = value
    return out


def _valid_keys(model: type[Section], loc: tuple[str | int, ...]) -> list[str]:
    """The field names of the (sub)model that ``loc`` points into."""
    current: Any = model
    for part in loc[:-1]:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        ann = field.annotation
        for candidate in getattr(ann, "__args__", (ann,)):
            if isinstance(candidate, type) and issubclass(candidate, Section):
                current = candidate
                break
        else:
            return []
    return list(current.model_fields)


def format_validation_error(err: ValidationError, model: type[Section] = Config) -> str:
    """One line per problem: ``collect.bogus: unknown key; valid keys: episodes, ...``."""
    lines = []
    for item in err.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(p) for p in loc) or "config"
        if item["type"] == "extra_forbidden":
            keys = ", ".join(_valid_keys(model, loc))
            lines.append(f"{key}: unknown key; valid keys: {keys}")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            got = item.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{key}: {msg[0].lower()}{msg[1:]}{shown}")
    return "; ".join(lines).replace("\r", "\\r").replace("\n", "\\n")  # one line


def validate_config(data: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from a plain dict, raising :class:`ConfigError` on bad input."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def resolve_config(path: Path | str | None, overrides: Iterable[str] = ()) -> Config:
    """Load ``path`` (defaults when ``None``), apply ``--set`` overrides and validate.

    :param path: a YAML file, or the bare name of a config shipped with the package
        (``quickstart``, ``carracing``...: :func:`packaged_configs`).
    """
    data = load_yaml_dict(find_config(path)) if path is not None else {}
    return validate_config(apply_overrides(data, overrides))


def packaged_configs() -> dict[str, Path]:
    """The configs shipped inside the package, by name (``worldmodel/configs/NAME.yaml``).

    They are copies of the repository's ``configs/`` (a test keeps them equal), so an installed
    package runs ``--config quickstart`` without a clone.
    """
    folder = Path(__file__).resolve().parent / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def find_config(path: Path | str) -> Path:
    """An existing config file, or the packaged config a bare name (no folder, no suffix) means.

    :raise ConfigNotFoundError: neither a file nor a packaged name (the names are listed).
    """
    given = Path(path)
    if given.suffix or len(given.parts) != 1:
        return given
    try:
        if given.is_file():
            return given
    except OSError:
        return given
    packaged = packaged_configs()
    if str(path) in packaged:
        return packaged[str(path)]
    raise ConfigNotFoundError(
        f"config {str(path)!r} is neither a file nor a packaged config ({', '.join(packaged)}); "
        "pass a YAML file or one of those names (`worldmodel configs` lists them)"
    )


def config_description(path: Path) -> str:
    """A config file's one-line description: the first sentence of its leading comment."""
    words: list[str] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        words += line.lstrip("#").split()
    text = " ".join(words)
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def load_run_config(run_dir: Path) -> Config:
    """The resolved config saved in a run folder (``RUN/config.yaml``)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no config.yaml: is it a run folder of this project?")
    return validate_config(load_yaml_dict(path))


def _type_name(annotation: Any) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    for noise in ("typing.", "worldmodel.config.", "envs.config.", "<class '", "'>"):
        text = text.replace(noise, "")
    return text.replace("Literal[", "one of [").replace("NoneType", "null").replace(" | ", " or ")


def _bounds(field: Any) -> str:
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "min length"}
    parts = []
    for meta in field.metadata:
        for attr, symbol in symbols.items():
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def config_reference() -> str:
    """The config reference as Markdown tables, one per section (the README embeds it).

    The effect column is each field's declared :data:`~envs.config.Effect`: ``output`` (what the
    stage produces), ``runtime`` (speed, devices, logging: reruns nothing) or ``budget`` (steps
    a resume may extend).
    """
    lines = [
        "Effect: `output` changes what a stage produces (the pipeline reruns it, `--resume` "
        "refuses a change, `compare` groups by it); `runtime` only how fast, where or how "
        "verbosely it runs (reruns nothing); `budget` how long it runs (a larger one resumes and "
        "extends a run).",
        "",
        f"- `seed` (int, default 0, output): {Config.model_fields['seed'].description or 'seed'}",
    ]
    for name, field in Config.model_fields.items():
        section = field.annotation
        if not (isinstance(section, type) and issubclass(section, Section)):
            continue
        lines += ["", f"**`{name}`**: {(section.__doc__ or '').strip().splitlines()[0]}", "",
                  "| key | type | default | effect | description |", "|---|---|---|---|---|"]
        defaults = section().model_dump(mode="json")
        for key, sub in section.model_fields.items():
            allowed = _type_name(sub.annotation)
            bounds = _bounds(sub)
            kind = f"{allowed} ({bounds})" if bounds else allowed
            default = json.dumps(defaults[key])
            text = (sub.description or "").replace("|", "\\|")
            effect = field_effect(sub)
            lines.append(f"| `{name}.{key}` | {kind} | `{default}` | {effect} | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
