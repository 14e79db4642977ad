"""Minari datasets in and out: ``worldmodel data export`` and ``worldmodel data import``.

`Minari <https://minari.farama.org>`_ is Farama's standard format for offline-RL datasets. Both
directions go through Minari's own API and its local dataset folder, ``$MINARI_DATASETS_PATH``
(default ``~/.minari/datasets``), which Minari reads itself.

Export (:func:`export_minari`) writes our episodes with ``minari.create_dataset_from_buffers``
(the first :data:`BATCH_EPISODES` episodes) and ``MinariDataset.update_dataset_from_buffer`` (the
rest), so a large dataset is never in memory at once:

* observations are our preprocessed ``uint8`` frames, not the env's raw observations; the
  preprocessing (``manifest.json``'s ``preprocessing``) is in the dataset's ``description`` and,
  as JSON, in its metadata key ``worldmodel``;
* our store keeps the frame seen before each action but not the one after an episode's last
  action, which Minari wants (``T + 1`` observations): the final observation repeats the last
  frame (said in the description, and dropped again on import);
* the env spec is the Gymnasium spec of the manifest's ``env_id`` with its ``env.kwargs`` and
  the episode cap the collection used; it is also the evaluation env;
* ``ref_min_score`` is the mean return of the dataset's episodes when they were collected by the
  random policy (otherwise a warning, and it is left unset);
* terminations and truncations are stored apart, exactly; each episode keeps its env seed.

Images: Minari 0.5.4 JPEG-encodes image observations (``uint8`` Box, 0-255, at least 32x32)
unless told ``jpeg_encoding=False``, which we pass: frames are stored losslessly, as raw arrays.
A Minari without that flag (older 0.5.x) JPEG-encodes them: the export then warns and records
``"lossy_frames": true`` in the ``worldmodel`` metadata.

Import (:func:`import_minari`) reads a local Minari dataset with ``minari.load_dataset`` and
writes our store through the collector's writer (:class:`~worldmodel.dataset.ShardWriter`,
:class:`~worldmodel.dataset.Layout`, one shard ``w0``), with a manifest and a ``config.yaml``
whose ``env`` section describes the frames (``env.id`` from the dataset's env spec,
``env.image_size`` and ``env.grayscale`` from the frames; the whole ``env`` section when we
exported it), so ``worldmodel train-vae --config DATA/config.yaml --data DATA`` trains on it.
Frames a Minari dataset stores as JPEG come back decoded, that is with JPEG's losses: the
manifest's ``source`` says so and ``worldmodel data info`` shows it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from worldmodel.dataset import (
    MANIFEST,
    DatasetReader,
    Episode,
    Layout,
    Location,
    PathLike,
    ShardWriter,
    open_dataset,
    shard_lock,
)
from worldmodel.errors import UserError

if TYPE_CHECKING:
    from gymnasium import spaces
    from gymnasium.envs.registration import EnvSpec

    from worldmodel.config import Config

log = logging.getLogger("worldmodel")

MINARI_EXTRA = 'pip install "worldmodel[minari]"'
#: Episodes handed to Minari (export) or committed to our shard (import) at a time.
BATCH_EPISODES = 32
#: The metadata key of a Minari dataset under which the export records our settings.
METADATA_KEY = "worldmodel"
#: Minari's warnings about metadata we have no value for (author, code link...).
_QUIET = r"`(author|author_email|code_permalink|algorithm_name|eval_env)` is set to None"


def _minari() -> ModuleType:
    """The ``minari`` module, or a one-line ``UserError`` naming the extra to install."""
    try:
        import minari
    except ImportError as e:
        raise UserError(f"Minari datasets need Minari: run `{MINARI_EXTRA}`") from e
    return minari


def _datasets_root() -> Path:
    from minari.storage.datasets_root_dir import get_dataset_path

    return Path(get_dataset_path())


def _parse_id(dataset_id: str) -> None:
    from minari.dataset.minari_dataset import parse_dataset_id

    try:
        parse_dataset_id(dataset_id)
    except ValueError:
        raise UserError(
            f"{dataset_id!r} is not a Minari dataset id; use NAMESPACE/ENV/NAME-v0, e.g. "
            "worldmodel/Reach/random-v0"
        ) from None


def is_image_space(space: spaces.Space[Any]) -> bool:
    """Whether Minari treats ``space`` as images (and JPEG-encodes it unless told not to)."""
    try:
        from minari.dataset.minari_storage import is_image_space as minari_is_image
    except ImportError:  # pragma: no cover - another Minari layout: assume its 0.5.4 rule
        from gymnasium import spaces as gym_spaces

        return (isinstance(space, gym_spaces.Box) and space.dtype == np.uint8
                and len(space.shape) in (2, 3) and min(space.shape[:2]) >= 32)
    return bool(minari_is_image(space))


# --------------------------------------------------------------------------------------------
# Spaces


def space_from_description(desc: dict[str, Any]) -> spaces.Space[Any]:
    """The Gymnasium space a manifest's ``action_space`` describes.

    :raise UserError: a space the manifest could only describe by its ``repr``.

    Example:
        >>> space_from_description({"type": "Discrete", "n": 5, "start": 0})
        Discrete(5)
    """
    from gymnasium import spaces

    kind = desc.get("type")
    if kind == "Discrete":
        return spaces.Discrete(int(desc["n"]), start=int(desc.get("start", 0)))
    if kind == "Box":
        dtype = np.dtype(desc.get("dtype", "float32"))
        return spaces.Box(np.asarray(desc["low"], dtype=dtype),
                          np.asarray(desc["high"], dtype=dtype), dtype=dtype)
    if kind == "MultiDiscrete":
        return spaces.MultiDiscrete(desc["nvec"])
    raise UserError(f"the dataset's action space ({desc.get('repr', kind)}) cannot be exported "
                    "to Minari: Box, Discrete and MultiDiscrete can")


# --------------------------------------------------------------------------------------------
# Export


def _env_spec(manifest: dict[str, Any]) -> EnvSpec:
    """The Gymnasium spec of the dataset's env: its id, ``env.kwargs`` and episode cap."""
    import gymnasium as gym

    from envs import check_env_id

    env_id = str(manifest.get("env_id"))
    try:
        check_env_id(env_id)  # registers optional families (ALE) when installed
    except gym.error.Error as e:
        raise UserError(f"cannot record the env spec of {env_id}: {e}") from None
    config = manifest.get("config") or {}
    env_cfg, collect_cfg = config.get("env") or {}, config.get("collect") or {}
    kwargs = dict((manifest.get("preprocessing") or {}).get("kwargs", env_cfg.get("kwargs")) or {})
    if env_id.startswith("worldmodel/") and "image_size" in env_cfg:  # ours draw at that size
        kwargs.setdefault("size", int(env_cfg["image_size"]))
    spec = gym.spec(env_id)
    caps = [c for c in (spec.max_episode_steps, env_cfg.get("max_episode_steps"),
                        collect_cfg.get("max_episode_steps")) if c is not None]
    return dataclasses.replace(spec, kwargs={**spec.kwargs, **kwargs},
                               max_episode_steps=min(caps) if caps else None)


def _buffers(reader: DatasetReader, lo: int, hi: int) -> list[Any]:
    """Episodes ``[lo, hi)`` as Minari episode buffers (``T + 1`` observations)."""
    from minari.data_collector import EpisodeBuffer

    index = reader.episode_index()
    out = []
    for i in range(lo, hi):
        ep = reader.episode(i)
        seed = index[i].get("seed")
        out.append(EpisodeBuffer(
            seed=int(seed) if isinstance(seed, int) else None,
            observations=np.concatenate([ep.obs, ep.obs[-1:]]),
            actions=ep.action,
            rewards=ep.reward,
            terminations=ep.terminated,
            truncations=ep.truncated,
        ))
    return out


def _description(data: PathLike, reader: DatasetReader, lossless: bool) -> str:
    import worldmodel

    m = reader.manifest
    h, w, c = reader.frame_shape
    frames = ("stored losslessly (raw arrays)" if lossless
              else "JPEG-encoded by this Minari version (lossy)")
    return (
        f"Exported by worldmodel {worldmodel.__version__} from the dataset {data}: "
        f"{reader.num_episodes} episodes, {reader.num_frames} steps of {m.get('env_id')}, "
        f"collected with the {m.get('policy')} policy (seed {m.get('seed')}). Observations are "
        f"worldmodel's preprocessed frames ({h}x{w}x{c} uint8), not the env's raw observations; "
        f"preprocessing: {json.dumps(m.get('preprocessing'), sort_keys=True)}. The frame after "
        "an episode's last action is not kept, so its final observation repeats the last frame. "
        f"Frames are {frames}."
    )


def _create_kwargs(minari: ModuleType) -> tuple[dict[str, Any], bool]:
    """Extra arguments of ``create_dataset_from_buffers``, and whether frames stay lossless."""
    params = inspect.signature(minari.create_dataset_from_buffers).parameters
    if "jpeg_encoding" in params:
        return {"jpeg_encoding": False}, True
    return {}, False


def export_minari(data: PathLike, dataset_id: str) -> str:
    """Write the dataset ``data`` as the local Minari dataset ``dataset_id``.

    :return: the folder Minari wrote (under ``$MINARI_DATASETS_PATH``).
    :raise UserError: Minari missing, a malformed or existing id, an env that is not installed.
    """
    minari = _minari()
    _parse_id(dataset_id)
    reader = open_dataset(data)
    m = reader.manifest
    if (_datasets_root() / dataset_id).exists():
        raise UserError(f"the Minari dataset {dataset_id} already exists in {_datasets_root()}; "
                        f"choose another name or version, or `minari delete {dataset_id}`")
    from gymnasium import spaces

    obs_space = spaces.Box(0, 255, reader.frame_shape, np.uint8)
    action_space = space_from_description(m.get("action_space") or {})
    spec = _env_spec(m)
    extra, lossless = _create_kwargs(minari)
    lossless = lossless or not is_image_space(obs_space)
    if not lossless:
        log.warning("minari %s has no lossless option for images: the %dx%d frames are stored "
                    "as JPEG (lossy); `pip install \"minari>=0.5.4\"` stores them exactly",
                    minari.__version__, *reader.frame_shape[:2])
    n = reader.num_episodes
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_QUIET)
        try:
            dataset = minari.create_dataset_from_buffers(
                dataset_id,
                _buffers(reader, 0, min(n, BATCH_EPISODES)),
                env=spec,
                eval_env=spec,
                algorithm_name=f"worldmodel collect (policy {m.get('policy')})",
                observation_space=obs_space,
                action_space=action_space,
                description=_description(data, reader, lossless),
                **extra,
            )
        except ImportError as e:  # Minari's storage backend (h5py) is an extra of its own
            raise UserError(f"Minari cannot write its datasets here ({e}); run "
                            f"`{MINARI_EXTRA}`") from None
    for lo in range(BATCH_EPISODES, n, BATCH_EPISODES):
        dataset.update_dataset_from_buffer(_buffers(reader, lo, min(n, lo + BATCH_EPISODES)))
    meta: dict[str, Any] = {METADATA_KEY: {
        "source": str(data), "env_id": m.get("env_id"), "policy": m.get("policy"),
        "seed": m.get("seed"), "preprocessing": m.get("preprocessing"),
        "env": (m.get("config") or {}).get("env"), "final_observation": "repeats the last frame",
        "lossy_frames": not lossless,
    }}
    if m.get("policy") == "random":
        returns = [float(e["return"]) for e in reader.episode_index()]
        meta.update(ref_min_score=float(np.mean(returns)), num_episodes_average_score=n)
    else:
        log.warning("ref_min_score is left unset: the dataset was collected with the %s policy, "
                    "not the random one", m.get("policy"))
    dataset.storage.update_metadata(meta)
    log.info("export: %d episodes, %d steps -> Minari dataset %s", n, reader.num_frames,
             dataset_id)
    return str(Path(dataset.storage.data_path).parent)


# --------------------------------------------------------------------------------------------
# Import


def _frame_shape(space: spaces.Space[Any], dataset_id: str) -> tuple[int, int, int]:
    """``(H, W, C)`` of image observations; ``UserError`` for anything our store cannot hold."""
    from gymnasium import spaces

    shape = getattr(space, "shape", None)
    if (not isinstance(space, spaces.Box) or space.dtype != np.uint8 or shape is None
            or len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3))):
        raise UserError(
            f"the Minari dataset {dataset_id} has {space} observations; worldmodel imports "
            "image observations only (uint8 HxWxC with C = 1 or 3, or HxW)"
        )
    h, w = int(shape[0]), int(shape[1])
    c = int(shape[2]) if len(shape) == 3 else 1
    if h != w or not 8 <= h <= 512:
        raise UserError(f"the Minari dataset {dataset_id} has {h}x{w} frames; worldmodel trains "
                        "on square frames of 8 to 512 pixels (env.image_size)")
    return h, w, c


def _import_config(dataset: Any, frame_shape: tuple[int, int, int], episodes: int) -> Config:
    """The config that describes the imported frames (as far as the Minari dataset tells)."""
    from worldmodel.config import validate_config

    ours = dataset.storage.metadata.get(METADATA_KEY)
    h, _, c = frame_shape
    env: dict[str, Any] = {}
    if isinstance(ours, dict) and isinstance(ours.get("env"), dict):
        env = dict(ours["env"])  # exported by worldmodel: its whole env section
    spec = dataset.env_spec
    if "id" not in env:
        env["id"] = spec.id if spec is not None else f"minari:{dataset.id}"
    env.update(image_size=h, grayscale=c == 1)
    data: dict[str, Any] = {"env": env, "collect": {"episodes": episodes, "workers": 1}}
    if isinstance(ours, dict) and isinstance(ours.get("seed"), int):
        data["seed"] = ours["seed"]
    return validate_config(data)


def _episodes(dataset: Any, c: int) -> Iterator[tuple[dict[str, Any], Episode]]:
    """``(meta, episode)`` per Minari episode, the final observation dropped."""
    ids = [int(i) for i in dataset.episode_indices]
    seeds = [m.get("seed") for m in dataset.storage.get_episode_metadata(ids)]
    for n, (ep, seed) in enumerate(zip(dataset.iterate_episodes(ids), seeds, strict=True)):
        obs = np.asarray(ep.observations, dtype=np.uint8)
        if obs.ndim == 3:
            obs = obs[..., None]
        steps = len(ep.rewards)
        yield {"id": n, "seed": None if seed is None else int(seed), "minari_id": ids[n]}, Episode(
            obs=obs[:steps].reshape(steps, *obs.shape[1:3], c),
            action=np.asarray(ep.actions),
            reward=np.asarray(ep.rewards, dtype=np.float32),
            terminated=np.asarray(ep.terminations, dtype=bool),
            truncated=np.asarray(ep.truncations, dtype=bool),
        )


def _source(minari: ModuleType, dataset: Any) -> dict[str, Any]:
    """What the manifest records about the Minari dataset, with a one-line ``summary``."""
    raw = dataset.storage.metadata
    lossy = bool(getattr(dataset.storage, "jpeg_encoding", True)) and is_image_space(
        dataset.observation_space)
    ours = raw.get(METADATA_KEY)
    if isinstance(ours, dict) and ours.get("lossy_frames"):
        lossy = True
    frames = "frames JPEG-decoded (lossy)" if lossy else "frames exact"
    return {
        "format": "minari",
        "id": dataset.id,
        "minari_version": dataset.minari_version,
        "imported_with": minari.__version__,
        "data_format": raw.get("data_format"),
        "jpeg_encoding": raw.get("jpeg_encoding"),
        "lossy_frames": lossy,
        "final_observation": "dropped (Minari keeps T + 1 observations, worldmodel T)",
        "summary": f"Minari {dataset.id} (minari {dataset.minari_version}, "
                   f"{raw.get('data_format')}), {frames}",
    }


def _load(minari: ModuleType, dataset_id: str) -> Any:
    _parse_id(dataset_id)
    try:
        return minari.load_dataset(dataset_id)
    except FileNotFoundError:
        raise UserError(
            f"no local Minari dataset {dataset_id} in {_datasets_root()} (MINARI_DATASETS_PATH); "
            f"download it with `minari download {dataset_id}` or check the id with `minari list "
            "local`"
        ) from None
    except ImportError as e:
        raise UserError(f"Minari cannot read {dataset_id} here ({e}); run "
                        f"`{MINARI_EXTRA}`") from None
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"the Minari dataset {dataset_id} is unreadable ({e})") from None


def _write(loc: Location, manifest: dict[str, Any], layout: Layout, dataset: Any,
           c: int) -> tuple[int, int]:
    """The manifest, then the episodes in batches; returns (episodes, frames) written."""
    loc.write_json(manifest, MANIFEST)
    episodes = frames = 0
    with shard_lock(loc, "w0"):
        writer = ShardWriter(loc, "w0", layout, worker=0)
        batch: list[tuple[dict[str, Any], Episode]] = []
        for item in _episodes(dataset, c):
            batch.append(item)
            if len(batch) == BATCH_EPISODES:
                frames += sum(e["length"] for e in writer.write(batch))
                episodes, batch = episodes + len(batch), []
        frames += sum(e["length"] for e in writer.write(batch))
        episodes += len(batch)
    return episodes, frames


def import_minari(dataset_id: str, out: PathLike) -> Path:
    """Write the local Minari dataset ``dataset_id`` (image observations) as our dataset ``out``.

    :return: ``out``.
    :raise UserError: Minari missing, an unknown id, observations that are not images, actions
        that are not arrays, an ``out`` that already holds something.
    """
    from gymnasium import spaces

    from worldmodel.collect.coordinator import describe_space, new_manifest

    minari = _minari()
    dataset = _load(minari, dataset_id)
    frame_shape = _frame_shape(dataset.observation_space, dataset_id)
    if not isinstance(dataset.action_space, spaces.Box | spaces.Discrete | spaces.MultiDiscrete):
        raise UserError(f"the Minari dataset {dataset_id} has {dataset.action_space} actions; "
                        "worldmodel imports Box, Discrete and MultiDiscrete actions")
    if dataset.total_episodes == 0:
        raise UserError(f"the Minari dataset {dataset_id} holds no episodes")
    folder = Path(out)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"{folder} exists and is not empty; choose a new -o folder")
    cfg = _import_config(dataset, frame_shape, int(dataset.total_episodes))
    sample = np.asarray(dataset.action_space.sample())
    layout = Layout(frame_shape=frame_shape, action_shape=tuple(sample.shape),
                    action_dtype=str(sample.dtype), state_shape=None,
                    chunk_frames=cfg.collect.chunk_frames)
    source = _source(minari, dataset)
    ours = dataset.storage.metadata.get(METADATA_KEY)
    ours = ours if isinstance(ours, dict) else {}
    manifest = new_manifest(
        cfg, layout, describe_space(dataset.action_space),
        policy=ours.get("policy") or f"minari:{dataset.storage.metadata.get('algorithm_name')}",
        seed=ours.get("seed"), shards=["w0"],
    )
    manifest["target"] = {"episodes": int(dataset.total_episodes), "frames": None}
    manifest["source"] = source
    if source["lossy_frames"]:
        log.warning("the Minari dataset %s stores its frames as JPEG: the imported frames carry "
                    "JPEG's losses", dataset_id)
    created = not folder.exists()
    loc = Location(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        episodes, frames = _write(loc, manifest, layout, dataset, frame_shape[2])
        loc.write_text(cfg.to_yaml(), "config.yaml")
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    log.info("import: Minari dataset %s -> %s (%d episodes, %d frames); train on it with "
             "--config %s", dataset_id, folder, episodes, frames, folder / "config.yaml")
    return folder
