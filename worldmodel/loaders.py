"""Training loaders: streaming readers of a collected dataset, with bounded memory.

:class:`FrameDataset` yields shuffled ``uint8`` frame minibatches for the VAE;
:class:`SequenceDataset` yields shuffled windows of ``(obs, action, reward, done)`` for sequence
models. Both shuffle the same way, so that a dataset many times larger than memory still
trains and a resumed trainer sees the same data order:

1. The split's data is cut into blocks: ``BLOCK_CHUNKS * chunk_frames`` consecutive frames of
   the split's episodes taken in id order (``FrameDataset``), or one episode
   (``SequenceDataset``). Blocks follow episode ids, not the shards' layout, so the order does
   not depend on which worker collected what.
2. Each epoch visits the blocks in a random order drawn from ``(seed, epoch)``, loads them into
   a buffer of at most ``cache_bytes / 2`` (one block more at worst), shuffles the items of
   the buffer (again from ``(seed, epoch, buffer)``) and cuts consecutive minibatches; a batch
   may span two buffers. While the trainer consumes one buffer, ``workers`` threads decompress
   the next one (zstd releases the GIL), so at most two buffers are in memory.
3. The whole order is index arithmetic known before any data is read, so
   ``batches(epoch, start)`` skips the first ``start`` batches without decompressing them.

The order is a function of ``seed``, ``epoch``, ``cache_bytes`` (which blocks share a buffer)
and the split's episodes (a dataset that gains episodes changes the split, see
:func:`split_episodes`, and the blocks); a resumed trainer must keep all of them.

Train and validation sets are split by episode (:func:`split_episodes`), never by frame.
The store these readers read (writing, opening, checking a dataset) is
:mod:`worldmodel.dataset`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import numpy as np

from worldmodel.dataset import DatasetReader
from worldmodel.errors import UserError

Split = Literal["train", "val", "all"]
#: FrameDataset blocks hold this many zarr chunks' worth of frames: larger blocks decompress
#: fewer chunks twice (measured: 1 chunk, 0.45x the speed of chunk-aligned blocks; 4, 0.8-1.1x)
#: but give a buffer fewer distinct stretches of data to shuffle.
BLOCK_CHUNKS = 4
B = TypeVar("B")  # a batch type


def split_episodes(
    episode_ids: Sequence[int], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split episode ids into train and validation ids, by a seeded shuffle.

    The validation set holds ``round(val_fraction * n)`` episodes, at least one when
    ``val_fraction > 0`` and there are two or more episodes.

    Example:
        >>> split_episodes(range(10), 0.2, seed=0) == split_episodes(range(10), 0.2, seed=0)
        True
        >>> [len(s) for s in split_episodes(range(10), 0.2, seed=0)]
        [8, 2]
    """
    ids = sorted(int(i) for i in episode_ids)
    n_val = round(val_fraction * len(ids))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = {ids[i] for i in order[:n_val]}
    return [i for i in ids if i not in val], sorted(val)


def _select(reader: DatasetReader, split: Split, val_fraction: float, seed: int) -> list[int]:
    """Positions (in ``reader.episode_index()``) of the episodes of ``split``."""
    if split not in ("train", "val", "all"):
        raise UserError(f"split must be train, val or all, got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = reader.episode_ids
    if split == "all":
        chosen = set(ids)
    else:
        train, val = split_episodes(ids, val_fraction, seed)
        chosen = set(train if split == "train" else val)
    if not chosen:
        raise UserError(
            f"{reader.loc}: the {split} split is empty ({len(ids)} episodes, val_fraction "
            f"{val_fraction}); collect more episodes or change data.val_fraction"
        )
    return [pos for pos, eid in enumerate(ids) if eid in chosen]


def _ordered_map(fn: Callable[[int], Any], items: Sequence[int],
                 pool: ThreadPoolExecutor | None, depth: int) -> Iterator[Any]:
    """``map(fn, items)`` in order, with at most ``depth`` calls running ahead in ``pool``."""
    if pool is None:
        yield from map(fn, items)
        return
    futures: list[Future[Any]] = []
    it = iter(items)
    for item in it:
        futures.append(pool.submit(fn, item))
        if len(futures) >= depth:
            break
    while futures:
        result = futures.pop(0).result()
        nxt = next(it, None)
        if nxt is not None:
            futures.append(pool.submit(fn, nxt))
        yield result


class _Source(Generic[B]):
    """Blocks of items, how to load them into a buffer, and how to gather batches from it."""

    items: list[int]  # items per block
    nbytes: list[int]  # decompressed bytes per block

    def load(self, block: int) -> Any:
        """Decompress one block."""
        raise NotImplementedError

    def buffer(self, loaded: Iterable[Any], blocks: Sequence[int]) -> Any:
        """Assemble loaded blocks (in order) into one buffer."""
        raise NotImplementedError

    def gather(self, buf: Any, idx: np.ndarray) -> B:
        """Items ``idx`` of a buffer as a batch."""
        raise NotImplementedError

    def concat(self, parts: list[B]) -> B:
        """Join partial batches."""
        raise NotImplementedError


class _Stream(Generic[B]):
    """The shuffled, buffered, resumable batch order shared by both datasets."""

    def __init__(self, source: _Source[B], batch_size: int, seed: int, cache_bytes: int,
                 workers: int, drop_last: bool) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if workers < 0:
            raise UserError(f"workers must be >= 0, got {workers}")
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.buffer_bytes = max(1, cache_bytes // 2)  # one buffer in use, one loading
        self.workers, self.drop_last = workers, drop_last
        self.num_items = int(sum(source.items))
        full, rest = divmod(self.num_items, batch_size)
        self.num_batches = full + (1 if rest and not drop_last else 0)

    def plan(self, epoch: int) -> list[list[int]]:
        """The blocks of each buffer of ``epoch``, in visiting order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source.items))
        groups: list[list[int]] = []
        current: list[int] = []
        size = 0
        for b in order.tolist():
            if self.source.items[b] == 0:
                continue
            current.append(b)
            size += self.source.nbytes[b]
            if size >= self.buffer_bytes:
                groups.append(current)
                current, size = [], 0
        if current:
            groups.append(current)
        return groups

    def _load(self, blocks: list[int], pool: ThreadPoolExecutor | None) -> Any:
        loaded = _ordered_map(self.source.load, blocks, pool, depth=2 * max(self.workers, 1))
        return self.source.buffer(loaded, blocks)

    def _buffers(self, groups: list[list[int]], first: int) -> Iterator[Any]:
        """Load buffers ``first, first + 1, ...``, the next one while the current is used."""
        if self.workers == 0:
            for k in range(first, len(groups)):
                yield self._load(groups[k], None)
            return
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="decompress")
        ahead = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        try:
            future = ahead.submit(self._load, groups[first], pool)
            for k in range(first, len(groups)):
                buf = future.result()
                if k + 1 < len(groups):
                    future = ahead.submit(self._load, groups[k + 1], pool)
                yield buf
        finally:
            ahead.shutdown(wait=False, cancel_futures=True)
            pool.shutdown(wait=False, cancel_futures=True)

    def batches(self, epoch: int, start: int = 0) -> Iterator[B]:
        """Batches ``start, start + 1, ...`` of ``epoch`` (see the module docstring)."""
        if start >= self.num_batches:
            return
        groups = self.plan(epoch)
        counts = [sum(self.source.items[b] for b in g) for g in groups]
        cum = np.concatenate([[0], np.cumsum(counts)])
        pos = start * self.batch_size  # first item wanted, in the epoch's order
        first = int(np.searchsorted(cum, pos, side="right")) - 1
        left = self.num_batches - start
        parts: list[B] = []
        have = 0
        bs = self.batch_size
        for k, buf in enumerate(self._buffers(groups, first), start=first):
            perm = np.random.default_rng([self.seed, epoch, k]).permutation(counts[k])
            i = pos - int(cum[k]) if k == first else 0
            while i < len(perm) and left > 0:
                take = perm[i : i + bs - have]
                parts.append(self.source.gather(buf, take))
                have += len(take)
                i += len(take)
                if have == bs:
                    yield parts[0] if len(parts) == 1 else self.source.concat(parts)
                    parts, have, left = [], 0, left - 1
            if left == 0:
                return
        if parts and left > 0:  # the last, partial batch (drop_last=False)
            yield self.source.concat(parts)


# --------------------------------------------------------------------------------------------
# Frames


class _FrameSource(_Source[np.ndarray]):
    """Blocks = :data:`BLOCK_CHUNKS` chunks' worth of consecutive frames, episodes in id order.

    Blocks follow the episodes, not where they lie in the shards, so the data order depends only
    on the dataset's episodes: which worker wrote an episode, and when, does not change it (two
    collections of one config train the same VAE). A block is read with one range per shard
    (episodes of one worker lie back to back); the chunks at a block's ends are decompressed
    again by the neighbouring block, which costs 1-2 extra chunks per block.
    """

    def __init__(self, reader: DatasetReader, positions: list[int]) -> None:
        self.reader = reader
        index = reader.episode_index()
        size = BLOCK_CHUNKS * reader.layout.chunk_frames  # the dataset's setting, not a shard's
        self.blocks: list[list[tuple[str, int, int]]] = [[]]
        room = size
        for pos in positions:
            e = index[pos]
            shard, lo, end = e["shard"], int(e["start"]), int(e["start"]) + int(e["length"])
            while lo < end:
                if room == 0:
                    self.blocks.append([])
                    room = size
                hi = min(end, lo + room)
                pieces = self.blocks[-1]
                if pieces and pieces[-1][0] == shard and pieces[-1][2] == lo:
                    pieces[-1] = (shard, pieces[-1][1], hi)  # contiguous in the shard: one read
                else:
                    pieces.append((shard, lo, hi))
                room -= hi - lo
                lo = hi
        self.frame_shape = reader.frame_shape
        frame_bytes = math.prod(self.frame_shape)
        self.items = [sum(hi - lo for _, lo, hi in p) for p in self.blocks]
        self.nbytes = [n * frame_bytes for n in self.items]

    def load(self, block: int) -> np.ndarray:
        pieces = self.blocks[block]
        if len(pieces) == 1:
            shard, lo, hi = pieces[0]
            return self.reader.read_range(shard, "obs", lo, hi)
        out = np.empty((self.items[block], *self.frame_shape), np.uint8)
        # one read per shard (its pieces' span: episodes of one worker lie back to back), then
        # each piece copied to its place in the block's order
        places: dict[str, list[tuple[int, int, int]]] = {}
        pos = 0
        for shard, lo, hi in pieces:
            places.setdefault(shard, []).append((lo, hi, pos))
            pos += hi - lo
        for shard, spans in places.items():
            first, last = min(lo for lo, _, _ in spans), max(hi for _, hi, _ in spans)
            if sum(hi - lo for lo, hi, _ in spans) * 2 < last - first:  # sparse: read apart
                for lo, hi, at in spans:
                    out[at : at + hi - lo] = self.reader.read_range(shard, "obs", lo, hi)
                continue
            data = self.reader.read_range(shard, "obs", first, last)
            for lo, hi, at in spans:
                out[at : at + hi - lo] = data[lo - first : hi - first]
        return out

    def buffer(self, loaded: Iterable[np.ndarray], blocks: Sequence[int]) -> np.ndarray:
        out = np.empty((sum(self.items[b] for b in blocks), *self.frame_shape), np.uint8)
        pos = 0
        for data in loaded:
            out[pos : pos + len(data)] = data
            pos += len(data)
        return out

    def gather(self, buf: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return buf[idx]

    def concat(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts)


def _open_split(
    path: Path, split: Split, val_fraction: float, seed: int
) -> tuple[DatasetReader, list[int], list[int]]:
    """The dataset, and the positions and ids of the split's episodes (both datasets' start)."""
    reader = DatasetReader(path)
    positions = _select(reader, split, val_fraction, seed)
    ids = reader.episode_ids
    return reader, positions, [ids[p] for p in positions]


class FrameDataset:
    """Shuffled ``uint8`` minibatches of frames across episodes, with bounded memory.

    :param path: the dataset folder.
    :param split: ``train`` or ``val`` (split by episode with ``val_fraction`` and ``seed``),
        or ``all``.
    :param batch_size: frames per batch ``B``.
    :param seed: seeds the split and every epoch's order.
    :param val_fraction: fraction of episodes held out for ``val``.
    :param cache_bytes: decompressed frames held at once (two buffers of half of it, plus at
        most one zarr chunk each and the blocks being decompressed).
    :param workers: threads decompressing the next buffer while the current one is used
        (0: load in the caller's thread, no read-ahead).
    :param drop_last: drop the last batch of an epoch when it has fewer than ``B`` frames.

    Usage::

        ds = FrameDataset(path, batch_size=256, seed=0)
        for epoch in range(epochs):
            for frames in ds.batches(epoch):  # uint8 (256, H, W, C)
                ...
    """

    def __init__(
        self,
        path: Path,
        split: Split = "train",
        *,
        batch_size: int,
        seed: int = 0,
        val_fraction: float = 0.1,
        cache_bytes: int = 512 * 2**20,
        workers: int = 1,
        drop_last: bool = True,
    ) -> None:
        self.split = split
        self.reader, positions, self.episode_ids = _open_split(path, split, val_fraction, seed)
        self.frame_shape: tuple[int, int, int] = self.reader.frame_shape
        self._source = _FrameSource(self.reader, positions)
        self._stream = _Stream(self._source, batch_size, seed, cache_bytes, workers, drop_last)
        self.num_frames: int = self._stream.num_items
        self.batch_size = batch_size
        if len(self) == 0:
            raise UserError(
                f"{self.reader.loc}: the {split} split has {self.num_frames} frames, less than one "
                f"batch of {batch_size}; lower the batch size or collect more"
            )

    def __len__(self) -> int:
        """Batches per epoch."""
        return self._stream.num_batches

    def batches(self, epoch: int, start: int = 0) -> Iterator[np.ndarray]:
        """Epoch ``epoch``'s batches, uint8 ``(B, H, W, C)``, from batch index ``start`` on.

        The order depends on ``(seed, epoch)``, on ``cache_bytes`` (buffers hold
        ``cache_bytes // 2``) and on the split's episodes: a resumed trainer with the same
        dataset and settings sees the same data (``workers`` does not change it).
        """
        return self._stream.batches(epoch, start)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.batches(0)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` frames spread over the split (e.g. a fixed grid to show reconstructions).

        :return: uint8 ``(n, H, W, C)``, the same for the same ``seed``.
        """
        rng = np.random.default_rng(seed)
        picks = np.sort(rng.choice(self.num_frames, size=min(n, self.num_frames), replace=False))
        bounds = np.cumsum([0, *self._source.items])
        out = []
        for block in np.unique(np.searchsorted(bounds, picks, side="right") - 1):
            data = self._source.load(int(block))
            inside = picks[(picks >= bounds[block]) & (picks < bounds[block + 1])]
            out.append(data[inside - bounds[block]])
        return np.concatenate(out)


# --------------------------------------------------------------------------------------------
# Sequences


class SequenceBatch(NamedTuple):
    """A batch of ``B`` windows of ``L`` consecutive steps from single episodes.

    :param obs: ``(B, L, H, W, C)`` uint8, the frame before each action.
    :param action: ``(B, L, *A)`` the actions (dtype of the dataset).
    :param reward: ``(B, L)`` float32, the reward of each action.
    :param done: ``(B, L)`` bool, ``terminated | truncated`` after each action (only the last
        step of an episode).
    """

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    done: np.ndarray


class _Windows(NamedTuple):
    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    done: np.ndarray
    starts: np.ndarray  # buffer offset of each window


class _WindowSource(_Source[SequenceBatch]):
    """Blocks = episodes; items = windows ``[s, s + L)`` with ``s = 0, stride, 2 stride, ...``."""

    def __init__(self, reader: DatasetReader, positions: list[int], seq_len: int,
                 stride: int) -> None:
        self.reader, self.seq_len, self.stride = reader, seq_len, stride
        index = reader.episode_index()
        self.entries = [index[p] for p in positions]
        self.items = [max(0, (int(e["length"]) - seq_len) // stride + 1) for e in self.entries]
        step_bytes = sum(math.prod(shape) * np.dtype(dtype).itemsize
                         for shape, dtype in reader.layout.fields().values())
        self.span = [0 if n == 0 else (n - 1) * stride + seq_len for n in self.items]
        self.nbytes = [s * step_bytes for s in self.span]

    def load(self, block: int) -> tuple[np.ndarray, ...]:
        e = self.entries[block]
        shard, lo = e["shard"], int(e["start"])
        hi = lo + self.span[block]
        read = self.reader.read_range
        done = read(shard, "terminated", lo, hi) | read(shard, "truncated", lo, hi)
        return (read(shard, "obs", lo, hi), read(shard, "action", lo, hi),
                read(shard, "reward", lo, hi), done)

    def buffer(self, loaded: Iterable[tuple[np.ndarray, ...]], blocks: Sequence[int]) -> _Windows:
        fields = list(zip(*loaded, strict=True))
        starts, offset = [], 0
        for b in blocks:
            starts.append(offset + self.stride * np.arange(self.items[b]))
            offset += self.span[b]
        obs, action, reward, done = (np.concatenate(f) for f in fields)
        return _Windows(obs, action, reward, done, np.concatenate(starts))

    def gather(self, buf: _Windows, idx: np.ndarray) -> SequenceBatch:
        rows = buf.starts[idx][:, None] + np.arange(self.seq_len)
        return SequenceBatch(buf.obs[rows], buf.action[rows], buf.reward[rows], buf.done[rows])

    def concat(self, parts: list[SequenceBatch]) -> SequenceBatch:
        return SequenceBatch(*(np.concatenate(f) for f in zip(*parts, strict=True)))


class SequenceDataset:
    """Shuffled minibatches of windows of ``seq_len`` consecutive steps inside single episodes.

    Windows start every ``stride`` steps of an episode (default ``seq_len``: non-overlapping);
    episodes shorter than ``seq_len`` contribute none.

    :param path: the dataset folder.
    :param split: ``train`` / ``val`` (by episode, as :class:`FrameDataset`) or ``all``.
    :param seq_len: steps per window ``L``.
    :param batch_size: windows per batch ``B``.
    :param stride: steps between window starts (default ``seq_len``).
    :param seed, val_fraction, cache_bytes, workers, drop_last: as :class:`FrameDataset`.
    """

    def __init__(
        self,
        path: Path,
        split: Split = "train",
        *,
        seq_len: int,
        batch_size: int,
        stride: int | None = None,
        seed: int = 0,
        val_fraction: float = 0.1,
        cache_bytes: int = 512 * 2**20,
        workers: int = 1,
        drop_last: bool = True,
    ) -> None:
        if seq_len < 1 or (stride is not None and stride < 1):
            raise UserError(f"seq_len and stride must be >= 1, got {seq_len} and {stride}")
        self.reader, positions, self.episode_ids = _open_split(path, split, val_fraction, seed)
        self.seq_len = seq_len
        self.frame_shape: tuple[int, int, int] = self.reader.frame_shape
        self._source = _WindowSource(self.reader, positions, seq_len, stride or seq_len)
        self._stream = _Stream(self._source, batch_size, seed, cache_bytes, workers, drop_last)
        self.num_windows: int = self._stream.num_items
        if len(self) == 0:
            raise UserError(
                f"{self.reader.loc}: the {split} split has {self.num_windows} windows of "
                f"{seq_len} steps, less than one batch of {batch_size}"
            )

    def __len__(self) -> int:
        """Batches per epoch."""
        return self._stream.num_batches

    def batches(self, epoch: int, start: int = 0) -> Iterator[SequenceBatch]:
        """Epoch ``epoch``'s batches from index ``start`` on (order: as :class:`FrameDataset`)."""
        return self._stream.batches(epoch, start)

    def __iter__(self) -> Iterator[SequenceBatch]:
        return self.batches(0)
