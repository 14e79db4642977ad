"""The rollout dataset: a folder of zarr (v3) shards, one per collector worker.

Layout of a dataset folder ``DATA``::

    DATA/manifest.json            env id, preprocessing, policy, seed, config, versions, layout
    DATA/config.yaml              the resolved config of the last ``worldmodel collect``
    DATA/shards/w{k}.zarr/        zarr group written only by worker k, arrays along time:
        obs        uint8   (N, H, W, C)   chunks (chunk_frames, H, W, C)
        action     A.dtype (N, *A)        (int64 (N,) for Discrete, float32 (N, d) for Box)
        reward     float32 (N,)
        terminated bool    (N,)
        truncated  bool    (N,)
        state      float32 (N, S)         only when the env reports ``info["state"]``
    DATA/shards/w{k}.episodes.jsonl the committed episodes of shard k, one JSON line each (id,
                                    start, length, seed, return, worker, CRC32 of each array)

Episodes are stored back to back. ``obs[t]`` is the frame the policy saw before taking
``action[t]``; ``reward[t]``, ``terminated[t]`` and ``truncated[t]`` are what that action
returned, so the last step of an episode has ``terminated | truncated`` set. An episode is
visible only once its shard's index lists it: the writer grows the arrays, writes the data,
fsyncs the chunk files it wrote (zarr renames them into place without ``fsync``; this costs
about 4-5 ms per commit, measured on 100-frame 64x64 commits), and only then appends the
episodes' lines to the index (one ``write`` + ``fsync``; a torn last line is ignored by readers
and cut off by the next writer, atomically). A read that comes back shorter than the index says
(zarr clips reads past an array's end) is a :class:`DamagedDataError`, never silent.
Appending keeps a commit O(1) however long the shard grows, where rewriting a JSON list would
make a collection of many short episodes quadratic. Data past the last committed frame (a
killed episode) is never read, and the next writer of the shard deletes it before appending;
an array shorter than its committed frames is refused (:class:`DamagedDataError`), not refilled.

Compression: every chunk is zstd level 3 with zstd's frame checksum. Measured on 512 CarRacing
frames (64x64x3): zstd-3 over a whole chunk stores ~980 B/frame (12.6x) at ~880 MB/s encode and
~2.4 GB/s decode; blosc (zstd or lz4 inside, any shuffle) splits a chunk into small blocks and
loses the redundancy between consecutive frames (6.6-12.4x at equal or lower speed; shuffling
does not help uint8), and zstd-9 gains 15% for a 5x slower encoder. The frame checksum makes a
damaged chunk fail to decode instead of returning wrong pixels.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from worldmodel.errors import UserError
from worldmodel.io import atomic_write_text
from worldmodel.runfolder import FolderLock

log = logging.getLogger("worldmodel")

FORMAT = "worldmodel-dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
#: The arrays of every shard, in checksum order (``state`` only when the env has one).
FIELDS = ("obs", "action", "reward", "terminated", "truncated", "state")
#: Scalar arrays use chunks this many times longer than ``obs`` (fewer, still small files).
SCALAR_CHUNK_FACTOR = 16

PathLike = str | os.PathLike[str]


class Episode(NamedTuple):
    """One episode of ``T`` steps.

    :param obs: ``(T, H, W, C)`` uint8, the frame seen before each action.
    :param action: ``(T, *A)``, the actions (dtype of the action space).
    :param reward: ``(T,)`` float32, the reward each action returned.
    :param terminated: ``(T,)`` bool, the env ended the episode after this step.
    :param truncated: ``(T,)`` bool, a time limit cut the episode after this step.
    :param state: ``(T, S)`` float32 true env state at each frame, or ``None``.
    """

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    state: np.ndarray | None = None

    @property
    def length(self) -> int:
        """Number of steps ``T``."""
        return int(self.reward.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The stored arrays by name (without ``state`` when it is ``None``)."""
        out = {name: getattr(self, name) for name in FIELDS}
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class Layout:
    """Shapes and dtypes of one step, which every shard of a dataset shares.

    :param frame_shape: ``(H, W, C)`` of ``obs``.
    :param action_shape: shape of one action (``()`` for Discrete).
    :param action_dtype: numpy dtype name of the stored actions.
    :param state_shape: shape of ``info["state"]``, or ``None`` when the env has none.
    :param chunk_frames: frames per ``obs`` chunk.
    """

    frame_shape: tuple[int, int, int]
    action_shape: tuple[int, ...]
    action_dtype: str
    state_shape: tuple[int, ...] | None
    chunk_frames: int

    def fields(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Per stored array: (shape of one step, dtype name)."""
        out: dict[str, tuple[tuple[int, ...], str]] = {
            "obs": (self.frame_shape, "uint8"),
            "action": (self.action_shape, self.action_dtype),
            "reward": ((), "float32"),
            "terminated": ((), "bool"),
            "truncated": ((), "bool"),
        }
        if self.state_shape is not None:
            out["state"] = (self.state_shape, "float32")
        return out

    @property
    def step_bytes(self) -> int:
        """Bytes one step takes uncompressed: frame, action, reward and flags, and state."""
        return sum(math.prod(shape) * np.dtype(dtype).itemsize
                   for shape, dtype in self.fields().values())

    def to_json(self) -> dict[str, Any]:
        """The layout as JSON-friendly values (for the manifest)."""
        return {
            "frame_shape": list(self.frame_shape),
            "action_shape": list(self.action_shape),
            "action_dtype": self.action_dtype,
            "state_shape": None if self.state_shape is None else list(self.state_shape),
            "chunk_frames": self.chunk_frames,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Layout:
        """Inverse of :meth:`to_json`."""
        state = data.get("state_shape")
        h, w, c = (int(v) for v in data["frame_shape"])
        return cls(
            frame_shape=(h, w, c),
            action_shape=tuple(int(v) for v in data["action_shape"]),
            action_dtype=str(data["action_dtype"]),
            state_shape=None if state is None else tuple(int(v) for v in state),
            chunk_frames=int(data["chunk_frames"]),
        )


# --------------------------------------------------------------------------------------------
# Where the dataset lives: a local folder, or any fsspec URL that zarr also accepts.


class Location:
    """A dataset root: a local folder (atomic writes, locks) or an fsspec URL (``s3://...``).

    :param root: local path or URL of the dataset folder.
    """

    def __init__(self, root: PathLike) -> None:
        text = os.fspath(root)
        self.remote = "://" in text and not text.startswith("file://")
        self.url = text.rstrip("/") if self.remote else str(Path(text.removeprefix("file://")))
        self._fs: Any = None

    def __str__(self) -> str:
        return self.url

    @property
    def fs(self) -> Any:
        """The fsspec filesystem of a remote root."""
        if self._fs is None:
            try:
                from fsspec.core import url_to_fs
            except ImportError as e:  # pragma: no cover - fsspec comes with zarr's extras
                raise UserError(f"{self.url}: remote datasets need `pip install fsspec`") from e
            self._fs, _ = url_to_fs(self.url)
        return self._fs

    def path(self, *parts: str) -> str:
        """The path or URL of ``parts`` under the root."""
        if self.remote:
            return "/".join((self.url, *parts))
        return str(Path(self.url, *parts))

    def exists(self, *parts: str) -> bool:
        """Whether ``parts`` exists under the root."""
        target = self.path(*parts)
        return bool(self.fs.exists(target)) if self.remote else Path(target).exists()

    def read_text(self, *parts: str) -> str:
        """A UTF-8 file under the root (``FileNotFoundError`` when absent)."""
        target = self.path(*parts)
        if self.remote:
            with self.fs.open(target, "rb") as f:
                return str(f.read().decode())
        return Path(target).read_text()

    def read_json(self, *parts: str) -> Any:
        """Parse a JSON file under the root (``FileNotFoundError`` when absent)."""
        return json.loads(self.read_text(*parts))

    def write_text(self, text: str, *parts: str) -> None:
        """Replace a file atomically (temp + rename locally; one PUT on object stores)."""
        target = self.path(*parts)
        if self.remote:
            self.fs.pipe(target, text.encode())
        else:
            atomic_write_text(Path(target), text)

    def write_json(self, data: Any, *parts: str) -> None:
        """Replace a JSON file atomically."""
        self.write_text(json.dumps(data, indent=2, default=str) + "\n", *parts)

    def append_text(self, text: str, *parts: str) -> None:
        """Append to a file with one ``write`` and ``fsync`` (object stores: rewrite it)."""
        target = self.path(*parts)
        if self.remote:
            old = self.read_text(*parts) if self.fs.exists(target) else ""
            self.fs.pipe(target, (old + text).encode())
            return
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        with open(target, "ab") as f:
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())

    def size(self, *parts: str) -> int:
        """Bytes stored under ``parts`` (a file or a folder, recursively)."""
        target = self.path(*parts)
        if self.remote:
            return int(self.fs.du(target)) if self.fs.exists(target) else 0
        p = Path(target)
        if p.is_file():
            return p.stat().st_size
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def shard_lock(loc: Location, shard: str) -> FolderLock:
    """The lock that the single writer of ``shard`` holds (no-op on remote locations)."""
    return FolderLock(None if loc.remote else Path(loc.path(SHARDS, f"{shard}.lock")))


# --------------------------------------------------------------------------------------------
# Writing


def _zstd() -> Any:
    from zarr.codecs import ZstdCodec

    return ZstdCodec(level=3, checksum=True)


def episode_checksums(episode: Episode) -> dict[str, int]:
    """CRC32 of each array's bytes (C order, stored dtype), to detect damaged data later."""
    return {
        name: zlib.crc32(np.ascontiguousarray(arr).data)
        for name, arr in episode.arrays().items()
    }


class ShardWriter:
    """Appends whole episodes to one shard and commits them to the shard's episode index.

    Only one writer may own a shard (hold :func:`shard_lock` around it). Opening a shard
    deletes anything past its committed frames, the remains of a killed writer; an array
    shorter than the committed frames raises :class:`DamagedDataError`.

    :param loc: the dataset root.
    :param shard: shard name, ``w{k}``.
    :param layout: shapes and dtypes of the arrays.
    :param worker: the worker number recorded in each episode's index entry.
    """

    def __init__(self, loc: Location, shard: str, layout: Layout, worker: int) -> None:
        import zarr

        self.loc, self.shard, self.layout, self.worker = loc, shard, layout, worker
        self.episodes, torn = _parse_index(loc, shard)
        if torn:  # a writer died mid-append: cut the partial line before appending after it
            rewrite_shard_index(loc, shard, self.episodes)
        self.end = max((e["start"] + e["length"] for e in self.episodes), default=0)
        group = zarr.open_group(loc.path(SHARDS, f"{shard}.zarr"), mode="a", zarr_format=3)
        self.arrays: dict[str, Any] = {}
        for name, (shape, dtype) in layout.fields().items():
            chunk = layout.chunk_frames * (1 if name == "obs" else SCALAR_CHUNK_FACTOR)
            if name in group:
                arr: Any = group[name]
                if tuple(arr.shape[1:]) != shape or str(arr.dtype) != dtype:
                    raise UserError(
                        f"{loc}: shard {shard} array {name} is {arr.dtype}{arr.shape[1:]}, "
                        f"expected {dtype}{shape}; collect into a new folder"
                    )
            else:
                arr = group.create_array(
                    name,
                    shape=(0, *shape),
                    chunks=(chunk, *shape),
                    dtype=dtype,
                    compressors=_zstd(),
                    # chunk files side by side (``c.7.0.0.0``): nested folders cost a mkdir and
                    # an fsync per level and chunk when a batch is committed
                    chunk_key_encoding={"name": "default", "separator": "."},
                    fill_value=False if dtype == "bool" else 0,
                )
            if arr.shape[0] < self.end:  # never fill committed frames with zeros
                raise DamagedDataError(
                    f"{loc}: shard {shard} array {name} holds {arr.shape[0]} steps but its "
                    f"index commits {self.end}: committed data is lost; run `worldmodel data "
                    f"verify {loc}` and collect into a new folder",
                    f"{name} holds {arr.shape[0]} of {self.end} committed steps",
                )
            if arr.shape[0] > self.end:  # drop the uncommitted tail of a killed writer
                arr.resize((self.end, *shape))
            # A runtime setting (not stored): skips zarr's slow all-fill check of every chunk.
            self.arrays[name] = arr.with_config({"write_empty_chunks": True})

    def write(self, items: Sequence[tuple[dict[str, Any], Episode]]) -> list[dict[str, Any]]:
        """Append episodes and commit them in one index update.

        :param items: ``(meta, episode)`` pairs; ``meta`` holds at least ``id`` and ``seed``.
        :return: the new index entries (``start``, ``length``, ``return``, ``crc32`` added).
        """
        stacked: dict[str, np.ndarray] = {}
        for name in self.layout.fields():
            parts = [getattr(ep, name) for _, ep in items]
            if any(p is None for p in parts):
                raise ValueError(f"episode without {name} in a shard that stores {name}")
            stacked[name] = np.concatenate(parts) if parts else np.zeros(0)
        return self.write_stacked([m for m, _ in items], [ep.length for _, ep in items], stacked)

    def write_stacked(
        self,
        metas: Sequence[dict[str, Any]],
        lengths: Sequence[int],
        stacked: dict[str, np.ndarray],
    ) -> list[dict[str, Any]]:
        """Append episodes given as one array per field, back to back, and commit them.

        :param metas: per episode, at least ``id`` and ``seed``.
        :param lengths: per episode, its number of steps ``T_i``.
        :param stacked: per field of the layout, ``(sum(T_i), *step_shape)`` arrays.
        :return: the new index entries.
        """
        total = sum(lengths)
        if total == 0:
            return []
        start, new_end = self.end, self.end + total
        data: dict[str, np.ndarray] = {}
        for name, (shape, dtype) in self.layout.fields().items():
            arr = np.ascontiguousarray(stacked[name], dtype=dtype)
            if arr.shape != (total, *shape):
                raise ValueError(f"{name}: got {arr.shape}, expected {(total, *shape)}")
            data[name] = arr
        for arr in self.arrays.values():  # grow first: chunks never lie outside the shape
            arr.resize((new_end, *arr.shape[1:]))
        for name, arr in self.arrays.items():
            _write_aligned(arr, start, data[name])
        self._sync(start, new_end)
        entries = []
        offset = 0
        for meta, length in zip(metas, lengths, strict=True):
            part = {n: a[offset : offset + length] for n, a in data.items()}
            view = Episode(state=part.pop("state", None), **part)
            entries.append({
                **meta,
                "start": start + offset,
                "length": int(length),
                "return": float(view.reward.sum(dtype=np.float64)),
                "worker": self.worker,
                "crc32": episode_checksums(view),
            })
            offset += length
        append_shard_index(self.loc, self.shard, entries)
        self.episodes.extend(entries)
        self.end = new_end
        return entries

    def _sync(self, lo: int, hi: int) -> None:
        """Flush steps ``[lo, hi)`` to disk before they are committed (local shards).

        zarr replaces each chunk file by a rename without ``fsync``: after an OS crash a
        committed episode could point at chunks that never reached the disk. This fsyncs the
        chunk files that hold ``[lo, hi)``, every array's ``zarr.json`` (its shape) and the
        folders whose entries the renames changed. Object stores need nothing: a PUT is durable.
        """
        if self.loc.remote:
            return
        group = Path(self.loc.path(SHARDS, f"{self.shard}.zarr"))
        files = {group / "zarr.json"}
        for name, arr in self.arrays.items():
            base = group / name
            files.add(base / "zarr.json")
            step = int(arr.chunks[0])
            rest = (0,) * (arr.ndim - 1)
            for c in range(lo // step, (hi - 1) // step + 1):
                files.add(base / arr.metadata.encode_chunk_key((c, *rest)))
        folders = {group.parent}
        for f in files:
            folders.update(p for p in f.parents if p.is_relative_to(group))
        for path in sorted(files) + sorted(folders):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _write_aligned(arr: Any, start: int, data: np.ndarray) -> None:
    """``arr[start : start + len(data)] = data``, each whole chunk written on its own.

    zarr encodes a write of exactly one chunk straight from ``data``; a write spanning several
    chunks first copies each of them into a freshly allocated chunk buffer (page faults and a
    copy per frame: about a third of the writer's time for Reach's 12 KiB frames).
    """
    step = int(arr.chunks[0])
    end = start + len(data)
    for lo in [start, *range((start // step + 1) * step, end, step)]:
        hi = min((lo // step + 1) * step, end)
        arr[lo:hi] = data[lo - start : hi - start]


def _index_name(shard: str) -> str:
    return f"{shard}.episodes.jsonl"


def _parse_index(loc: Location, shard: str) -> tuple[list[dict[str, Any]], bool]:
    """The committed entries of a shard, and whether the file ends with a torn line."""
    try:
        text = loc.read_text(SHARDS, _index_name(shard))
    except FileNotFoundError:
        return [], False
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{loc}: {SHARDS}/{_index_name(shard)} is unreadable ({e})") from e
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # tail: "" after a final newline, else a torn line
    entries = []
    for n, line in enumerate(complete, start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or "id" not in entry:
            raise UserError(
                f"{loc}: {SHARDS}/{_index_name(shard)} is unreadable (line {n} is not an episode)"
            )
        entries.append(entry)
    return entries, tail != ""


def read_shard_index(loc: Location, shard: str) -> list[dict[str, Any]]:
    """The committed episodes of a shard (empty when it has committed none)."""
    return _parse_index(loc, shard)[0]


def _index_text(entries: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries)


def append_shard_index(loc: Location, shard: str, entries: Sequence[dict[str, Any]]) -> None:
    """Commit episodes: append their lines to the shard's index in one write, then fsync."""
    loc.append_text(_index_text(entries), SHARDS, _index_name(shard))


def rewrite_shard_index(loc: Location, shard: str, episodes: Sequence[dict[str, Any]]) -> None:
    """Replace a shard's episode list atomically (to drop episodes or a torn last line)."""
    loc.write_text(_index_text(episodes), SHARDS, _index_name(shard))


# --------------------------------------------------------------------------------------------
# Reading


class DamagedDataError(UserError):
    """A chunk of the dataset cannot be decoded.

    :param message: the one-line message for the user.
    :param detail: what is damaged, without the dataset path (for ``data verify``).
    """

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message, exit_code=1)
        self.detail = detail


def read_manifest(loc: Location) -> dict[str, Any]:
    """The manifest of a dataset, or a one-line ``UserError`` saying what is wrong."""
    if not loc.exists():
        raise UserError(f"{loc}: no such dataset; create one with `worldmodel collect --out {loc}`")
    try:
        manifest = loc.read_json(MANIFEST)
    except FileNotFoundError:
        raise UserError(
            f"{loc} is not a worldmodel dataset (no {MANIFEST}); pass a folder written by "
            "`worldmodel collect`"
        ) from None
    except (OSError, ValueError) as e:
        raise UserError(f"{loc}: {MANIFEST} is corrupt ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{loc}: {MANIFEST} is not a worldmodel dataset manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{loc}: dataset format version {manifest.get('format_version')} is not supported "
            f"(this worldmodel reads version {FORMAT_VERSION})"
        )
    return manifest


class DatasetReader:
    """Read access to a collected dataset: its manifest, episode index and episodes.

    Episodes are ordered by id; for a complete dataset ``episode(i)`` is episode id ``i``.

    :param path: the dataset folder (or fsspec URL).
    :param allow_empty: accept a dataset without any committed episode.
    """

    def __init__(self, path: PathLike, allow_empty: bool = False) -> None:
        self.loc = Location(path)
        self.manifest: dict[str, Any] = read_manifest(self.loc)
        try:
            self.layout = Layout.from_json(self.manifest["layout"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{self.loc}: {MANIFEST} has no valid layout ({e})") from e
        self.frame_shape: tuple[int, int, int] = self.layout.frame_shape
        self.has_state: bool = self.layout.state_shape is not None
        shards = self.manifest.get("shards", [])
        self._index: list[dict[str, Any]] = []
        for shard in shards:
            for entry in read_shard_index(self.loc, shard):
                self._index.append({**entry, "shard": shard})
        self._index.sort(key=lambda e: int(e["id"]))
        ids = [int(e["id"]) for e in self._index]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise UserError(f"{self.loc}: episodes {dup} are listed twice; the dataset is corrupt")
        if not self._index and not allow_empty:
            raise UserError(
                f"{self.loc}: the dataset has no complete episodes yet; run or resume "
                "`worldmodel collect`"
            )
        self.num_episodes: int = len(self._index)
        self.num_frames: int = sum(int(e["length"]) for e in self._index)
        self._groups: dict[str, Any] = {}
        self._arrays: dict[tuple[str, str], Any] = {}

    @property
    def episode_ids(self) -> list[int]:
        """Ids of the committed episodes, ascending."""
        return [int(e["id"]) for e in self._index]

    def episode_index(self) -> list[dict[str, Any]]:
        """Per episode (by id): id, shard, start, length, seed, return, worker, crc32."""
        return [dict(e) for e in self._index]

    def shard_array(self, shard: str, name: str) -> Any:
        """The zarr array ``name`` of ``shard`` (opened read-only, cached)."""
        import zarr

        cached = self._arrays.get((shard, name))
        if cached is not None:  # opening an array reads and parses its zarr.json
            return cached
        if shard not in self._groups:
            try:
                self._groups[shard] = zarr.open_group(
                    self.loc.path(SHARDS, f"{shard}.zarr"), mode="r", zarr_format=3
                )
            except Exception as e:  # zarr raises several types for a missing/broken group
                raise UserError(f"{self.loc}: shard {shard} is unreadable ({e})") from e
        try:
            arr = self._groups[shard][name]
        except KeyError:
            raise UserError(f"{self.loc}: shard {shard} has no array {name!r}") from None
        self._arrays[shard, name] = arr
        return arr

    def read_range(self, shard: str, name: str, lo: int, hi: int) -> np.ndarray:
        """Frames ``[lo, hi)`` of one array of a shard; :class:`DamagedDataError` when damaged."""
        try:
            data = np.asarray(self.shard_array(shard, name)[lo:hi])
        except UserError:
            raise
        except Exception as e:  # decode errors of damaged chunks
            detail = f"{name}[{lo}:{hi}] is unreadable ({type(e).__name__}: {e})"
            raise DamagedDataError(
                f"{self.loc}: shard {shard} {detail}; run `worldmodel data verify {self.loc}`",
                detail,
            ) from e
        if len(data) != hi - lo:  # zarr clips a read past the array's end without a word
            detail = f"{name}[{lo}:{hi}] is cut short: the array ends at {lo + len(data)}"
            raise DamagedDataError(
                f"{self.loc}: shard {shard} {detail}; run `worldmodel data verify {self.loc}`",
                detail,
            )
        return data

    def _read_entry(self, entry: dict[str, Any]) -> Episode:
        shard, lo = entry["shard"], int(entry["start"])
        hi = lo + int(entry["length"])
        data = {name: self.read_range(shard, name, lo, hi) for name in self.layout.fields()}
        data.setdefault("state", None)  # type: ignore[arg-type]
        return Episode(**data)

    def episode(self, i: int) -> Episode:
        """The ``i``-th episode (ordered by id) with all its arrays."""
        if not 0 <= i < self.num_episodes:
            raise IndexError(f"episode {i} out of range (dataset has {self.num_episodes})")
        return self._read_entry(self._index[i])

    def __iter__(self) -> Iterator[Episode]:
        for i in range(self.num_episodes):
            yield self.episode(i)

    def size_on_disk(self) -> int:
        """Bytes stored in the dataset folder."""
        return self.loc.size()


def open_dataset(path: PathLike) -> DatasetReader:
    """Open a dataset for reading; ``UserError`` when it is missing, empty or corrupt.

    :param path: the folder given to ``worldmodel collect --out`` (or an fsspec URL).
    """
    return DatasetReader(path)


# --------------------------------------------------------------------------------------------
# `worldmodel data info` and `worldmodel data verify`


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _stats(values: list[float]) -> str:
    a = np.asarray(values, dtype=np.float64)
    return (f"mean {a.mean():.3f} ± {a.std():.3f} (min {a.min():.3f}, median "
            f"{np.median(a):.3f}, max {a.max():.3f})")


def print_info(path: PathLike) -> int:
    """Print episodes, frames, size on disk, compression and return statistics.

    :return: the exit code (0).
    """
    reader = DatasetReader(path, allow_empty=True)
    m = reader.manifest
    index = reader.episode_index()
    step_bytes = sum(
        math.prod(shape) * np.dtype(dtype).itemsize
        for shape, dtype in reader.layout.fields().values()
    )
    frame_bytes = math.prod(reader.frame_shape)
    obs_stored = sum(
        reader.loc.size(SHARDS, f"{s}.zarr", "obs") for s in m.get("shards", [])
    )
    disk = reader.size_on_disk()
    target = m.get("target", {})
    wanted = (f" of {target['episodes']} requested" if target.get("episodes")
              else f" (target {target['frames']} frames)" if target.get("frames") else "")
    state = f"state {list(reader.layout.state_shape)}" if reader.layout.state_shape else "no state"
    shape = "x".join(map(str, reader.frame_shape))
    lines = [
        f"dataset     {reader.loc}",
        f"env         {m.get('env_id')}  frames {shape} uint8  {state}",
        f"action      {m.get('action_space')}",
        f"policy      {m.get('policy')}  seed {m.get('seed')}",
        f"episodes    {reader.num_episodes}{wanted}",
        f"frames      {reader.num_frames}",
        f"shards      {len(m.get('shards', []))}  chunk {reader.layout.chunk_frames} frames",
        f"on disk     {_fmt_bytes(disk)}",
    ]
    if isinstance(m.get("source"), dict):  # imported (worldmodel.minari_io)
        lines.insert(4, f"source      {m['source'].get('summary')}")
    if reader.num_frames:
        n = reader.num_frames
        lines += [
            f"compression {n * step_bytes / max(disk, 1):.1f}x overall; obs "
            f"{_fmt_bytes(obs_stored / n)}/frame vs {_fmt_bytes(frame_bytes)} raw "
            f"({frame_bytes * n / max(obs_stored, 1):.1f}x)",
            f"return      {_stats([float(e['return']) for e in index])}",
            f"length      {_stats([float(e['length']) for e in index])}",
        ]
    print("\n".join(lines))
    return 0


def _check_episode(reader: DatasetReader, entry: dict[str, Any]) -> list[str]:
    """Problems of one episode (empty when it is intact)."""
    problems = []
    try:
        ep = reader._read_entry(entry)
    except DamagedDataError as e:
        return [e.detail]
    length = int(entry["length"])
    for name, (shape, dtype) in reader.layout.fields().items():
        arr = getattr(ep, name)
        if arr.shape != (length, *shape) or str(arr.dtype) != dtype:
            problems.append(f"{name} is {arr.dtype}{arr.shape}, expected {dtype}{(length, *shape)}")
    if problems:
        return problems
    sums = episode_checksums(ep)
    for name, expected in entry.get("crc32", {}).items():
        if sums.get(name) != expected:
            problems.append(f"{name} checksum mismatch")
    done = ep.terminated | ep.truncated
    if length and (not done[-1] or done[:-1].any()):
        problems.append("terminated/truncated do not end the episode exactly at its last step")
    return problems


def _id_ranges(ids: Sequence[int], limit: int = 6) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"`` (at most ``limit`` ranges, then ``...``)."""
    ranges: list[str] = []
    for _, run in itertools.groupby(enumerate(sorted(ids)), key=lambda p: p[1] - p[0]):
        values = [v for _, v in run]
        ranges.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    more = ", ..." if len(ranges) > limit else ""
    return ", ".join(ranges[:limit]) + more


def _committed_ends(reader: DatasetReader) -> dict[str, int]:
    """Per shard with committed episodes, the step after its last one."""
    ends: dict[str, int] = {}
    for entry in reader.episode_index():
        end = int(entry["start"]) + int(entry["length"])
        ends[entry["shard"]] = max(ends.get(entry["shard"], 0), end)
    return ends


def _shard_steps(reader: DatasetReader) -> tuple[dict[str, int], list[str]]:
    """Per shard, the steps its arrays hold (the shortest array), and problems of the lengths.

    An array shorter than the steps the shard's index commits has lost committed data.
    """
    committed = _committed_ends(reader)
    held: dict[str, int] = {}
    problems = []
    for shard in reader.manifest.get("shards", []):
        end = committed.get(shard, 0)
        if not end and not reader.loc.exists(SHARDS, f"{shard}.zarr"):
            continue  # a worker that never committed anything
        lengths = {}
        for name in reader.layout.fields():
            try:
                lengths[name] = int(reader.shard_array(shard, name).shape[0])
            except UserError as e:
                problems.append(f"shard {shard}: {e}".replace(f"{reader.loc}: ", ""))
        if not lengths:
            continue
        held[shard] = min(lengths.values())
        for name, n in lengths.items():
            if n < end:
                problems.append(f"shard {shard}: {name} holds {n} steps but its index commits "
                                f"{end}: committed data is lost")
    return held, problems


def _check_target(reader: DatasetReader, held: dict[str, int]) -> list[str]:
    """Committed episodes against the manifest's target (``collect.episodes`` or ``frames``).

    Episodes missing from the target mean an interrupted collection or a lost episode index;
    steps a shard holds past its committed episodes are named, as they point to the latter.
    """
    target = reader.manifest.get("target") or {}
    ids = reader.episode_ids
    lengths = {int(e["id"]): int(e["length"]) for e in reader.episode_index()}
    if target.get("episodes"):
        wanted = int(target["episodes"])
        missing = sorted(set(range(wanted)) - set(ids))
        if not missing:
            return []
        what = (f"episodes {_id_ranges(missing)} of the {wanted} requested are not committed "
                f"({wanted - len(missing)} are)")
    elif target.get("frames"):
        wanted = int(target["frames"])
        prefix = 0
        while prefix in lengths:
            prefix += 1
        frames = sum(lengths[i] for i in range(prefix))
        gaps = sorted(set(range(max(ids, default=-1) + 1)) - set(ids))
        if frames >= wanted and not [g for g in gaps if g < prefix]:
            return []
        what = (f"episodes 0-{prefix - 1} hold {frames} of the {wanted} frames requested"
                if prefix else f"none of the {wanted} frames requested are committed")
        if gaps:
            what += f" (episodes {_id_ranges(gaps)} are missing)"
    else:
        return []  # no target recorded (a dataset written by hand)
    ends = _committed_ends(reader)
    extra = [f"shard {s} holds {n - ends.get(s, 0)} steps past its last committed episode"
             for s, n in held.items() if n > ends.get(s, 0)]
    why = (f"; {', '.join(extra)}: its episode index has lost episodes"
           if extra else "; the collection was interrupted or an episode index lost them")
    return [f"{what}{why}; re-run `worldmodel collect --config {reader.loc}/config.yaml --out "
            f"{reader.loc}` to collect them again"]


def print_verify(path: PathLike) -> int:
    """Read every episode and check shapes, lengths, overlaps and checksums.

    Also checks each shard's array lengths against its index, and the committed episodes
    against the manifest's target (a deleted or truncated episode index loses episodes).

    :return: 0 when everything is intact, 1 when a problem was found (each bad episode is
        printed with its id, shard and frame range; missing episodes with their ids).
    """
    reader = DatasetReader(path, allow_empty=True)
    held, bad = _shard_steps(reader)
    bad += _check_target(reader, held)
    ends: dict[str, list[tuple[int, int, int]]] = {}
    for entry in reader.episode_index():
        lo, n = int(entry["start"]), int(entry["length"])
        ends.setdefault(entry["shard"], []).append((lo, lo + n, int(entry["id"])))
        where = f"episode {entry['id']} (shard {entry['shard']}, frames {lo}-{lo + n - 1})"
        for problem in _check_episode(reader, entry):
            bad.append(f"{where}: {problem}")
    for shard, spans in ends.items():
        spans.sort()
        for (_, end_a, id_a), (lo_b, _, id_b) in itertools.pairwise(spans):
            if lo_b < end_a:
                bad.append(f"episodes {id_a} and {id_b} overlap in shard {shard}")
    for line in bad:
        print(f"BAD {line}")
    if bad:
        print(f"verify: {len(bad)} problem(s) in {reader.loc}")
        return 1
    print(f"verify: OK, {reader.num_episodes} episodes, {reader.num_frames} frames intact")
    return 0
