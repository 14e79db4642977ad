"""Stages as data: what each stage reads, what it needs, what it writes, how it runs.

Each stage module declares one :class:`StageSpec` beside its ``run`` function (``collect.STAGE``,
``train_vae.STAGE``, ``agents.train.STAGE``...); ``worldmodel.pipeline.REGISTRY`` lists them in
order, and the pipeline iterates that list. What a stage reads, together with what each config
field declares about itself (its effect: ``output``, ``runtime`` or ``budget``, see
:data:`envs.config.Effect`), is the single source for the three consumers that used to keep
their own lists:

* the pipeline's cache key of a stage (:func:`stage_key`): every key the stage reads that is
  not ``runtime``, plus the keys of the runs it reads;
* every ``--resume`` check (:func:`resume_mismatches`): a resumed run refuses only ``output``
  keys it reads that changed (budgets may grow, runtime settings may change);
* ``compare``'s grouping (:func:`defining_keys`): agent runs are grouped by the non-``runtime``
  keys ``train-agent`` reads, the seed aside.

Example:
    >>> from worldmodel.config import resolve_config
    >>> spec = StageSpec("train-vae", "vae", reads=("seed", "vae", "data"))
    >>> a, b = resolve_config(None), resolve_config(None, ["vae.device=cpu", "vae.steps=10"])
    >>> resume_mismatches(a, b, spec)  # a device is runtime, steps a budget
    []
    >>> stage_key(a, spec) == stage_key(resolve_config(None, ["vae.device=cpu"]), spec)
    True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envs.config import Effect, Section, field_effect
from worldmodel.config import Config

#: A stage's uniform entry point: ``run(cfg, out, inputs, resume) -> out``. ``inputs`` maps each
#: stage named in ``needs`` to the run folder(s) it wrote (a list for fanned-out stages);
#: ``resume`` is ``True`` (``--resume``), ``False``, or ``None`` (resume when there is a
#: checkpoint: what the pipeline passes).
StageRun = Callable[[Config, Path, Mapping[str, Any], "bool | None"], Path]


@dataclass(frozen=True)
class Variant:
    """One of several runs of a stage in a pipeline (an arm and seed of ``train-agent``).

    :param name: its sub-folder, under the stage's folder.
    :param config: its config.
    :param needs: the stages whose runs it reads (a subset of the stage's ``needs``).
    :param keyed_on: those of ``needs`` whose output decides its own (their keys are its
        parents); a run read only for its settings contributes ``reads_from`` instead.
    :param reads_from: extra config keys that decide its output (``vae`` for an untrained
        encoder that borrows the VAE run's architecture).
    """

    name: str
    config: Config
    needs: tuple[str, ...]
    keyed_on: tuple[str, ...]
    reads_from: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageSpec:
    """One stage, declared once.

    :param name: the CLI subcommand (``train-vae``).
    :param kind: the kind of run folder it writes (:mod:`worldmodel.runfolder`).
    :param reads: the config keys it reads: sections (``"vae"``) or dotted keys (``"env.id"``).
    :param ignores: keys inside ``reads`` that it does not read (``"env.n_envs"`` for collect).
    :param needs: stages whose runs it reads (their output is part of its own).
    :param run: the uniform entry point (see :data:`StageRun`).
    :param folder: its folder in a pipeline run (``vae``, ``agents``...).
    :param parallel: the pipeline runs its runs in worker processes (``pipeline.parallel``).
    :param variants: a stage with several runs in a pipeline (one per arm and seed): their
        :class:`Variant` list; ``None``: one run.
    :param per_run: one run per run of the first stage in ``needs``, in that run's folder (what
        ``evaluate`` does to each agent run).
    :param switch: a boolean config key that turns the stage on in the pipeline.
    :param on_demand: the pipeline runs it only when a run of another stage reads it (a
        :class:`Variant`'s ``needs``, or ``needs`` of a stage without variants): ``train-memory``
        runs only when an agent arm observes M.
    """

    name: str
    kind: str
    reads: tuple[str, ...]
    ignores: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    run: StageRun | None = None
    folder: str = ""
    parallel: bool = False
    variants: Callable[[Config], list[Variant]] | None = None
    per_run: bool = False
    switch: str | None = None
    on_demand: bool = False

    def keys(self) -> list[str]:
        """Every leaf config key the stage reads, in :func:`config_effects` order."""
        return [k for k in config_effects() if _matches(k, self.reads)
                and not _matches(k, self.ignores)]


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def config_effects(model: type[Section] = Config, prefix: str = "") -> dict[str, Effect]:
    """Every leaf key of the config with the :data:`~envs.config.Effect` its field declares.

    Sections are walked; optional sections (``env.crop``) and mappings (``agent.hyperparams``)
    are one setting each.

    Example:
        >>> effects = config_effects()
        >>> effects["vae.lr"], effects["vae.device"], effects["agent.timesteps"]
        ('output', 'runtime', 'budget')
    """
    out: dict[str, Effect] = {}
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            out.update(config_effects(ann, f"{key}."))
        else:
            out[key] = field_effect(info)
    return out


def config_values(cfg: Config, keys: Sequence[str]) -> dict[str, Any]:
    """``{dotted.key: value}`` of ``cfg`` for ``keys`` (a leaf may be a whole mapping).

    Example:
        >>> from worldmodel.config import resolve_config
        >>> config_values(resolve_config(None), ["vae.lr", "env.kwargs"])
        {'vae.lr': 0.001, 'env.kwargs': {}}
    """
    data = cfg.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key in keys:
        value: Any = data
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out[key] = value
    return out


def settings(cfg: Config, spec: StageSpec, *effects: Effect) -> dict[str, Any]:
    """``{dotted.key: value}`` of the keys ``spec`` reads whose effect is one of ``effects``."""
    table = config_effects()
    keys = [k for k in spec.keys() if table[k] in effects]
    return config_values(cfg, keys)


def stage_key(cfg: Config, spec: StageSpec, *parents: str) -> str:
    """The pipeline's cache key of a stage's run.

    It hashes the stage's ``output`` and ``budget`` settings and its parents' keys; ``runtime``
    settings are left out, so changing them reruns nothing.
    """
    data = settings(cfg, spec, "output", "budget")
    text = json.dumps([spec.name, data, list(parents)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def budget_grew(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether the budget settings ``new`` only extend ``old`` (a resume can then continue)."""
    if set(old) != set(new):
        return False
    for key, before in old.items():
        after = new[key]
        if before == after:
            continue
        if before is None or after is None or not after > before:
            return False
    return True


def resume_mismatches(old: Config, new: Config, spec: StageSpec) -> list[str]:
    """The settings a resume must refuse: ``output`` keys ``spec`` reads that differ.

    :return: ``key: old -> new`` lines, for a run saved with ``old`` resumed under ``new``.
    """
    a, b = settings(old, spec, "output"), settings(new, spec, "output")
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]


def defining_keys(spec: StageSpec) -> list[str]:
    """The keys that define an arm of ``spec``'s runs: read, not ``runtime``, not the seed."""
    table = config_effects()
    return [k for k in spec.keys() if table[k] != "runtime" and k != "seed"]
