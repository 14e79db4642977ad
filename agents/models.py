"""The SB3 side of an agent run: algorithm, device, policy and its kwargs, loading a saved agent.

The policy is the mode's :attr:`~agents.modes.ObsModeSpec.default_policy` unless
``agent.policy`` is set; a mode with ``encoder_in_policy`` (``latent-finetune``) adds a
``VAEFeaturesExtractor`` built from the run's ``vae.json``.

Loading a run never executes code from it: :func:`load_model` supplies every entry SB3 would
unpickle from a saved zip through ``custom_objects`` (rebuilt from ``config.yaml``) and refuses
the others; SB3 reads the weights with ``torch.load(weights_only=True)``. The replay buffer is
an NPZ read with ``allow_pickle=False`` (:func:`load_replay_buffer`).
"""

from __future__ import annotations

import io
import logging
import pickle
import zlib
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from gymnasium import spaces

from agents.encoders import VAE_RECORD as VAE_RECORD_NAME
from agents.encoders import read_vae_record
from agents.modes import get_mode
from worldmodel.errors import RunNotFoundError, UserError

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


def agent_observation_space(run_dir: Path, cfg: Config) -> spaces.Box:
    """The observation space the run's policy reads, from its config (and ``vae.json``)."""
    import numpy as np

    from agents.latent import latent_space

    history = cfg.agent.history
    mode = get_mode(cfg.agent.obs_mode)
    if mode.needs_memory_run:
        from agents.memory_obs import memory_space, read_memory_record

        vae_record, memory_record = read_vae_record(run_dir), read_memory_record(run_dir)
        if vae_record is None or memory_record is None:
            raise UserError(f"{run_dir}: {VAE_RECORD_NAME} or memory.json is missing; cannot "
                            "rebuild the agent")
        return memory_space(int(vae_record["latent_dim"]), int(memory_record["hidden_size"]),
                            history)
    if mode.wrapper == "latents":
        record = read_vae_record(run_dir)
        if record is None:
            raise UserError(f"{run_dir}: {VAE_RECORD_NAME} is missing; cannot rebuild the agent")
        try:
            latent_dim = int(record["latent_dim"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"{run_dir}/{VAE_RECORD_NAME}: no valid latent_dim ({type(e).__name__})"
            ) from e
        return latent_space(latent_dim, history)
    h, w, c = cfg.env.obs_shape
    return spaces.Box(0, 255, (c * history, h, w), np.uint8)


def _env_action_space(cfg: Config) -> spaces.Space[Any]:
    from envs import make_env

    env = make_env(cfg.env)
    try:
        return env.action_space
    finally:
        env.close()


def _read_zip(checkpoint: Path) -> tuple[bytes, dict[str, Any]]:
    """The bytes of a saved agent and its ``data`` entry, parsed as JSON (never unpickled)."""
    import json
    import zipfile

    try:
        raw = checkpoint.read_bytes()
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            data = json.loads(archive.read("data").decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(
            f"{checkpoint}: not a readable agent ({type(e).__name__}: {_line(e)})"
        ) from e
    if not isinstance(data, dict):
        raise UserError(f"{checkpoint}: its data entry is not a mapping; not a saved agent")
    return raw, data


def _line(e: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(e).split())[:300]


#: Entries SB3 never writes (``_excluded_save_params``); a file holding one was not written by it.
_NEVER_SAVED = frozenset({
    "policy", "device", "env", "replay_buffer", "rollout_buffer", "_vec_normalize_env", "_logger",
    "_custom_logger",
})


def rebuilt_objects(
    algo: type[BaseAlgorithm],
    cfg: Config,
    run_dir: Path,
    observation_space: spaces.Space[Any],
    action_space: spaces.Space[Any],
    stats_window: int = 100,
) -> dict[str, Any]:
    """Every object SB3 would unpickle from a saved agent's ``data``, rebuilt from the config.

    The values are what ``algo(policy, env, **hyperparams)`` and its ``_setup_model`` set (the
    SB3 class defaults for what the config leaves out); the env-step state (``_last_obs``, ...)
    is ``None`` (training resets the envs) and the episode-info buffers start empty.
    """
    from collections import deque

    from stable_baselines3.common.buffers import NStepReplayBuffer, ReplayBuffer, RolloutBuffer
    from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
    from stable_baselines3.common.utils import FloatSchedule, LinearSchedule

    from agents.hyperparams import parse_hyperparams

    hyper = parse_hyperparams(cfg.agent.hyperparams, algo, action_space)
    user = hyper.pop("policy_kwargs", {})
    policy, policy_kwargs = full_policy_kwargs(
        cfg, read_vae_record(run_dir), user, for_loading=True
    )
    try:
        template = algo(policy, None, device="cpu", policy_kwargs=policy_kwargs,  # type: ignore[call-arg]
                        _init_setup_model=False, **hyper)
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise UserError(f"{run_dir}: cannot rebuild the {cfg.agent.algo} agent: {_line(e)}") from e
    objects: dict[str, Any] = dict(vars(template))
    for name in _NEVER_SAVED:
        objects.pop(name, None)
    objects.update({
        "observation_space": observation_space,
        "action_space": action_space,
        "lr_schedule": FloatSchedule(template.learning_rate),
        "_last_obs": None,
        "_last_episode_starts": None,
        "_last_original_obs": None,
        "ep_info_buffer": deque(maxlen=stats_window),
        "ep_success_buffer": deque(maxlen=stats_window),
    })
    for key in ("clip_range", "clip_range_vf"):
        if objects.get(key) is not None:
            objects[key] = FloatSchedule(objects[key])
    if isinstance(template, OffPolicyAlgorithm):
        template._convert_train_freq()
        objects["train_freq"] = template.train_freq
        if objects.get("replay_buffer_class") is None:
            objects["replay_buffer_class"] = (
                NStepReplayBuffer if template.n_steps > 1 else ReplayBuffer
            )
    elif "rollout_buffer_class" in objects and objects["rollout_buffer_class"] is None:
        objects["rollout_buffer_class"] = RolloutBuffer
    if "exploration_initial_eps" in objects:  # DQN
        objects["exploration_schedule"] = LinearSchedule(
            objects["exploration_initial_eps"],
            objects["exploration_final_eps"],
            objects["exploration_fraction"],
        )
    return objects


def _custom_objects(
    checkpoint: Path, data: dict[str, Any], algo: type[BaseAlgorithm], rebuilt: dict[str, Any]
) -> dict[str, Any]:
    """``custom_objects`` for every entry of ``data`` SB3 would unpickle, plus our policy_kwargs.

    :raises UserError: an entry we cannot rebuild, or one SB3 never saves.
    """
    custom: dict[str, Any] = {"policy_kwargs": rebuilt["policy_kwargs"]}
    for key, item in data.items():
        serialized = isinstance(item, dict) and ":serialized:" in item
        if key in _NEVER_SAVED or (hasattr(algo, key) and key not in rebuilt):
            raise UserError(
                f"{checkpoint}: unexpected entry {key!r} in its data; refusing to load it"
            )
        if serialized:
            if key not in rebuilt:
                raise UserError(
                    f"{checkpoint}: its data holds a pickled {key!r} this project cannot rebuild "
                    "from config.yaml; refusing to unpickle it"
                )
            custom[key] = rebuilt[key]
    return custom


def _check_space(checkpoint: Path, data: dict[str, Any], key: str, space: Any) -> None:
    """The shape SB3 wrote next to a pickled space must be the one rebuilt from the config."""
    item = data.get(key)
    shape = item.get("_shape") if isinstance(item, dict) else None
    n = item.get("n") if isinstance(item, dict) else None
    if n is not None and isinstance(space, spaces.Discrete) and str(n) != str(int(space.n)):
        raise UserError(
            f"{checkpoint}: saved for {n} discrete actions, but its config.yaml gives {space.n}"
        )
    if isinstance(shape, list) and tuple(shape) != tuple(space.shape or ()):
        raise UserError(
            f"{checkpoint}: saved for {key.replace('_', ' ')} shape {tuple(shape)}, but its "
            f"config.yaml gives {tuple(space.shape)}"
        )


def load_model(
    run_dir: Path,
    cfg: Config,
    checkpoint: Path,
    *,
    env: VecEnv | None = None,
    device: str | torch.device = "cpu",
    action_space: spaces.Space[Any] | None = None,
) -> BaseAlgorithm:
    """Load a saved agent (``last.zip``/``best_model.zip``) without needing its VAE run.

    Nothing in the file is unpickled: every entry SB3 would unpickle is supplied through
    ``custom_objects``, rebuilt from ``cfg`` (:func:`rebuilt_objects`); the weights are read by
    SB3 with ``torch.load(weights_only=True)``.

    :param env: the env to resume training in (its spaces are the model's).
    :param action_space: the env's action space when ``env`` is not given (default: built from
        ``cfg.env``).
    :raises UserError: when the file is missing, unreadable or holds anything we cannot rebuild.
    """
    if not checkpoint.is_file():
        raise RunNotFoundError(
            f"{checkpoint} not found; train the agent first (worldmodel train-agent)"
        )
    algo = algo_class(cfg.agent.algo)
    raw, data = _read_zip(checkpoint)
    if env is not None:
        obs_space, act_space = env.observation_space, env.action_space
    else:
        obs_space = agent_observation_space(run_dir, cfg)
        act_space = action_space if action_space is not None else _env_action_space(cfg)
    _check_space(checkpoint, data, "observation_space", obs_space)
    _check_space(checkpoint, data, "action_space", act_space)
    window = data.get("_stats_window_size", 100)
    rebuilt = rebuilt_objects(algo, cfg, run_dir, obs_space, act_space,
                              window if isinstance(window, int) and window > 0 else 100)
    custom = _custom_objects(checkpoint, data, algo, rebuilt)
    try:
        return algo.load(io.BytesIO(raw), env=env, device=device, custom_objects=custom)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AssertionError, RuntimeError, EOFError,
            AttributeError, pickle.UnpicklingError, zlib.error) as e:
        raise UserError(
            f"{checkpoint}: cannot load the agent ({type(e).__name__}: {_line(e)})"
        ) from e


#: The replay buffer of an off-policy run (:func:`save_replay_buffer`), and the pickle older
#: versions wrote instead (never loaded).
REPLAY_FILE = "replay_buffer.npz"
LEGACY_REPLAY_FILE = "replay_buffer.pkl"
_REPLAY_META = "__meta__"
_REPLAY_FORMAT = "replay_buffer/1"


def replay_arrays(buffer: Any) -> dict[str, Any]:
    """The numpy arrays of a replay buffer (its transitions), by attribute name."""
    import numpy as np

    return {k: v for k, v in vars(buffer).items() if isinstance(v, np.ndarray)}


def save_replay_buffer(model: BaseAlgorithm, file: IO[bytes]) -> None:
    """Write the model's replay buffer as NPZ: its arrays, and ``pos``/``full`` as JSON."""
    import json

    import numpy as np

    buffer = model.replay_buffer  # type: ignore[attr-defined]
    meta = {"format": _REPLAY_FORMAT, "class": type(buffer).__name__,
            "pos": int(buffer.pos), "full": bool(buffer.full)}
    encoded = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    arrays: dict[str, Any] = {**replay_arrays(buffer), _REPLAY_META: encoded}
    np.savez(file, **arrays)


def load_replay_buffer(model: BaseAlgorithm, path: Path) -> None:
    """Fill the model's (freshly allocated) replay buffer from :func:`save_replay_buffer`'s NPZ.

    Read with ``allow_pickle=False``; every array must have the shape and dtype of the buffer
    the config allocates.

    :raises UserError: an unreadable, truncated or mismatched file (one line).
    """
    import json
    import zipfile

    import numpy as np

    buffer = model.replay_buffer  # type: ignore[attr-defined]
    want = replay_arrays(buffer)
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(npz[_REPLAY_META].tobytes().decode())
            if meta.get("format") != _REPLAY_FORMAT or meta.get("class") != type(buffer).__name__:
                raise ValueError(f"a {meta.get('class')} in format {meta.get('format')!r}, "
                                 f"expected a {type(buffer).__name__} in {_REPLAY_FORMAT!r}")
            got = {k: npz[k] for k in npz.files if k != _REPLAY_META}
        if set(got) != set(want):
            raise ValueError(f"arrays {sorted(got)}, expected {sorted(want)}")
        for name, array in got.items():
            if array.shape != want[name].shape or array.dtype != want[name].dtype:
                raise ValueError(
                    f"{name} is {array.dtype}{list(array.shape)}, this config's buffer "
                    f"{want[name].dtype}{list(want[name].shape)} (buffer_size or n_envs changed?)"
                )
        pos, full = meta["pos"], meta["full"]
        size = buffer.buffer_size
        if not isinstance(pos, int) or not isinstance(full, bool) or not 0 <= pos < size:
            raise ValueError(f"bad pos/full {pos!r}/{full!r}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError,
            zipfile.BadZipFile, zlib.error) as e:
        raise UserError(
            f"{path}: unreadable replay buffer ({type(e).__name__}: {_line(e)}); delete it to "
            "resume with an empty replay buffer"
        ) from e
    for name, array in got.items():
        setattr(buffer, name, array)
    buffer.pos, buffer.full = pos, full
