"""From ``agent.hyperparams`` (YAML, rl-baselines3-zoo style) to keyword arguments for SB3.

What the zoo writes and SB3 does not take directly is converted here:

* schedules ``"lin_2.5e-4"`` (``learning_rate``, ``clip_range``, ``clip_range_vf``) become SB3's
  :class:`~stable_baselines3.common.utils.LinearSchedule` from the value down to 0;
* numbers that YAML left as strings (``1e-4`` without a dot is a string in YAML 1.1) become
  floats;
* ``policy_kwargs`` may be a mapping or the zoo's string ``"dict(activation_fn=nn.GELU, ...)"``
  (parsed without ``eval``); class names such as ``"GELU"``, ``"nn.GELU"``, ``"th.optim.Adam"``
  or ``"NatureCNN"`` are resolved from an allow-list (:data:`CLASS_NAMES`: torch.nn activations,
  torch optimizers, SB3's extractors and buffers, ours); nothing named in the config is imported;
* ``train_freq: [1, episode]`` becomes a tuple; ``noise_type``/``noise_std`` become an
  ``action_noise`` object (TD3/SAC, as in the zoo);
* zoo keys that are not SB3 arguments (``n_timesteps``, ``n_envs``, ``frame_stack``, ...) and
  unknown keys are one-line :class:`~worldmodel.errors.UserError` s that say where they belong.

Example:
    >>> from stable_baselines3 import PPO
    >>> kw = parse_hyperparams(
    ...     {"learning_rate": "lin_1e-4", "n_steps": 512,
    ...      "policy_kwargs": "dict(activation_fn=nn.GELU, net_arch=dict(pi=[256], vf=[256]))"},
    ...     PPO)
    >>> kw["learning_rate"](0.5), kw["policy_kwargs"]["activation_fn"].__name__
    (5e-05, 'GELU')
"""

from __future__ import annotations

import ast
import inspect
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from gymnasium import spaces

from worldmodel.errors import ConfigError, UserError

#: Keys of the zoo's hyperparameter files that are settings of ours, not SB3 arguments.
ZOO_KEYS = {
    "n_timesteps": "agent.timesteps",
    "n_envs": "env.n_envs",
    "policy": "agent.policy",
    "frame_stack": "agent.history",
    "normalize": "agent.normalize_reward (rewards only)",
    "env_wrapper": "env (preprocessing) and agent.obs_mode",
    "vec_env_wrapper": "agent.obs_mode",
    "callback": "nothing (train-agent sets up its own callbacks)",
    "env_kwargs": "env.kwargs",
}
SCHEDULE_KEYS = ("learning_rate", "clip_range", "clip_range_vf")
#: The class names each class-valued key accepts (nothing else is ever imported), and the module
#: prefixes they may be written with (``GELU``, ``nn.GELU``, ``torch.nn.GELU``, ``th.nn.GELU``).
CLASS_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "activation_fn": (
        ("ReLU", "ReLU6", "RReLU", "LeakyReLU", "PReLU", "ELU", "CELU", "SELU", "GELU", "SiLU",
         "Mish", "Tanh", "Sigmoid", "Hardtanh", "Hardsigmoid", "Hardswish", "Softplus",
         "Softsign", "Tanhshrink", "LogSigmoid", "Identity"),
        ("nn", "torch.nn", "th.nn"),
    ),
    "optimizer_class": (
        ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "SGD", "Adagrad", "Adadelta",
         "ASGD", "Rprop", "RMSpropTFLike"),
        ("optim", "torch.optim", "th.optim", "stable_baselines3.common.sb2_compat.rmsprop_tf_like"),
    ),
    "features_extractor_class": (
        ("NatureCNN", "FlattenExtractor", "VAEFeaturesExtractor"),
        ("stable_baselines3.common.torch_layers", "agents.extractor"),
    ),
    "replay_buffer_class": (
        ("ReplayBuffer", "NStepReplayBuffer", "DictReplayBuffer", "HerReplayBuffer"),
        ("stable_baselines3.common.buffers", "stable_baselines3.her"),
    ),
}
#: The class-valued entries of policy_kwargs.
CLASS_KEYS = ("activation_fn", "optimizer_class", "features_extractor_class")
#: Class-valued top-level hyperparameters.
TOP_CLASS_KEYS = ("replay_buffer_class",)


def _allowed_class(key: str, short: str) -> type:
    """The class ``short`` of the allow-list of ``key`` (fixed imports only)."""
    import torch
    from stable_baselines3.common import buffers, torch_layers
    from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike
    from stable_baselines3.her import HerReplayBuffer

    from agents.extractor import VAEFeaturesExtractor

    extra: dict[str, type] = {
        "RMSpropTFLike": RMSpropTFLike,
        "VAEFeaturesExtractor": VAEFeaturesExtractor,
        "HerReplayBuffer": HerReplayBuffer,
    }
    home = {
        "activation_fn": torch.nn,
        "optimizer_class": torch.optim,
        "features_extractor_class": torch_layers,
        "replay_buffer_class": buffers,
    }[key]
    cls = extra[short] if short in extra else getattr(home, short)
    assert isinstance(cls, type)
    return cls


def _literal(node: ast.AST, where: str) -> Any:
    """Evaluate a restricted Python literal: constants, lists, dicts, ``dict(k=v)``, names."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_literal(node.operand, where)
    if isinstance(node, ast.List | ast.Tuple):
        items = [_literal(e, where) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        return {
            _literal(k, where): _literal(v, where)
            for k, v in zip(node.keys, node.values, strict=True)
            if k is not None
        }
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return {kw.arg: _literal(kw.value, where) for kw in node.keywords if kw.arg is not None}
    if isinstance(node, ast.Name | ast.Attribute):
        return ast.unparse(node)  # a class name such as nn.GELU: resolved later
    raise UserError(f"{where}: cannot read {ast.unparse(node)!r}; write it as a YAML mapping")


def parse_policy_kwargs_string(text: str, where: str = "policy_kwargs") -> dict[str, Any]:
    """Parse the zoo's ``"dict(log_std_init=-2, activation_fn=nn.GELU)"`` without ``eval``.

    :return: a dict whose class names are still strings (see :func:`resolve_class`).
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise UserError(f"{where}: {text!r} is not a dict(...) expression ({e.msg})") from e
    value = _literal(tree.body, where)
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping, got {text!r}")
    return value


def resolve_class(name: Any, key: str, where: str) -> Any:
    """A class from its name in the allow-list of ``key`` (:data:`CLASS_NAMES`).

    ``GELU``, ``nn.GELU``, ``torch.nn.GELU`` and ``th.nn.GELU`` name the same class; nothing is
    imported from the config, so ``package.module:Class`` is refused.

    :param name: the name, or already a class (returned as is).
    :param key: the hyperparameter (``activation_fn``, ``optimizer_class``, ...).
    :param where: the config key, for the error message.
    :raises ConfigError: a name outside the allow-list (the message lists the allowed ones).
    """
    if isinstance(name, type):
        return name
    names, prefixes = CLASS_NAMES[key]
    if isinstance(name, str) and ":" not in name:
        prefix, _, short = name.rpartition(".")
        if short in names and (not prefix or prefix in prefixes):
            return _allowed_class(key, short)
    raise ConfigError(f"{where}: unknown class {name!r}; allowed: {', '.join(names)}")


def _number(value: Any) -> Any:
    """``"1e-4"`` -> ``1e-4``; anything else unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _schedule(key: str, value: Any) -> Any:
    """``"lin_1e-4"`` -> a linear schedule from 1e-4 (start of training) to 0."""
    from stable_baselines3.common.utils import LinearSchedule

    if isinstance(value, str) and value.startswith("lin_"):
        try:
            start = float(value[4:])
        except ValueError:
            raise UserError(
                f"agent.hyperparams.{key}: bad schedule {value!r}; e.g. lin_2.5e-4"
            ) from None
        return LinearSchedule(start, 0.0, 1.0)
    value = _number(value)
    if isinstance(value, str):
        raise UserError(f"agent.hyperparams.{key}: {value!r} is neither a number nor lin_<value>")
    return value


def _policy_kwargs(value: Any) -> dict[str, Any]:
    where = "agent.hyperparams.policy_kwargs"
    if isinstance(value, str):
        value = parse_policy_kwargs_string(value, where)
    if not isinstance(value, Mapping):
        raise UserError(f"{where}: expected a mapping, got {value!r}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key in CLASS_KEYS:
            out[key] = resolve_class(item, key, f"{where}.{key}")
        elif key == "net_arch" and isinstance(item, Mapping):
            out[key] = dict(item)
        else:
            out[key] = _number(item)
    return out


def _noise_std(value: Any) -> float:
    """``noise_std`` as a non-negative float (a clear error for ``abc`` or ``[1]``)."""
    try:
        std = float(_number(value))
    except (TypeError, ValueError):
        std = math.nan
    if not std >= 0 or isinstance(value, bool):
        raise UserError(
            f"agent.hyperparams.noise_std: expected a number >= 0 (e.g. 0.1), got {value!r}"
        )
    return std


def _train_freq(value: Any) -> int | tuple[int, str]:
    """``4`` -> ``4``, ``[4, "step"]`` -> ``(4, "step")``; a clear error for ``[4]``."""
    try:
        n, unit = value if isinstance(value, list) else (value, "step")
        n = _number(n)
        whole = isinstance(n, int | float) and not isinstance(n, bool) and float(n).is_integer()
        freq = int(n) if whole else 0
    except (TypeError, ValueError):
        freq, unit = 0, None
    if freq < 1 or unit not in ("step", "episode"):
        raise UserError(
            f"agent.hyperparams.train_freq: expected N or [N, step|episode] with N >= 1 "
            f"(e.g. 4 or [1, episode]), got {value!r}"
        )
    return (freq, unit) if isinstance(value, list) else freq


def _action_noise(kind: Any, std: float, action_space: spaces.Space[Any] | None) -> Any:
    from stable_baselines3.common.noise import NormalActionNoise, OrnsteinUhlenbeckActionNoise

    classes = {"normal": NormalActionNoise, "ornstein-uhlenbeck": OrnsteinUhlenbeckActionNoise}
    if kind not in classes:
        raise UserError(
            f"agent.hyperparams.noise_type: {kind!r}; use one of {', '.join(classes)}"
        )
    if action_space is None:
        return None
    if not isinstance(action_space, spaces.Box):
        raise UserError("agent.hyperparams.noise_type: action noise needs continuous actions")
    n = int(np.prod(action_space.shape))
    return classes[kind](mean=np.zeros(n), sigma=float(std) * np.ones(n))


def parse_hyperparams(
    raw: Mapping[str, Any],
    algo_cls: type,
    action_space: spaces.Space[Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``algo_cls(policy, env, **kwargs)`` from ``agent.hyperparams``.

    :param raw: the config's mapping (zoo style).
    :param algo_cls: the SB3 algorithm class, whose signature decides which keys are valid.
    :param action_space: needed to build ``action_noise``; ``None`` only validates.
    :raises UserError: for zoo-only keys, unknown keys and unreadable values.
    """
    params = inspect.signature(algo_cls.__init__).parameters  # type: ignore[misc]
    valid = sorted(k for k in params if k not in ("self", "policy", "env", "_init_setup_model"))
    out: dict[str, Any] = {}
    noise_type = raw.get("noise_type")
    noise_std = _noise_std(raw.get("noise_std", 0.1))
    for key, value in raw.items():
        if key in ("noise_type", "noise_std"):
            continue
        if key in ZOO_KEYS:
            raise UserError(
                f"agent.hyperparams.{key}: not an SB3 argument; in this project set "
                f"{ZOO_KEYS[key]} instead"
            )
        if key not in params or key in ("self", "policy", "env"):
            raise UserError(
                f"agent.hyperparams.{key}: unknown {algo_cls.__name__} argument; valid: "
                f"{', '.join(valid)}"
            )
        if key in SCHEDULE_KEYS:
            out[key] = _schedule(key, value)
        elif key == "policy_kwargs":
            out[key] = _policy_kwargs(value)
        elif key == "train_freq":
            out[key] = _train_freq(value)
        elif key in TOP_CLASS_KEYS:
            out[key] = resolve_class(value, key, f"agent.hyperparams.{key}")
        else:
            out[key] = _number(value)
    if noise_type is not None:
        if "action_noise" not in params:
            raise UserError(
                f"agent.hyperparams.noise_type: {algo_cls.__name__} takes no action noise"
            )
        noise = _action_noise(noise_type, noise_std, action_space)
        if noise is not None:
            out["action_noise"] = noise
    return out
