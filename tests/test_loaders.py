"""Training readers: FrameDataset (bounded-memory shuffle, resume, split) and SequenceDataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from worldmodel.collect import run
from worldmodel.config import resolve_config
from worldmodel.dataset import MANIFEST, Location, ShardWriter, open_dataset
from worldmodel.errors import UserError
from worldmodel.loaders import FrameDataset, SequenceDataset, split_episodes

FRAME_BYTES = 16 * 16 * 3


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = resolve_config(None, ["env.image_size=16", "collect.episodes=24", "collect.workers=2",
                                "collect.chunk_frames=32", "collect.commit_seconds=0.2"])
    return run(cfg, tmp_path_factory.mktemp("data") / "data")


def rows(frames: np.ndarray) -> list[bytes]:
    """Frames as sorted byte strings: equal lists mean equal multisets of frames."""
    return sorted(f.tobytes() for f in frames)


def split_frames(path: Path, ids: list[int]) -> np.ndarray:
    reader = open_dataset(path)
    by_id = {e["id"]: i for i, e in enumerate(reader.episode_index())}
    return np.concatenate([reader.episode(by_id[i]).obs for i in ids])


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_yields_every_frame_once_with_a_small_cache(data: Path, workers: int) -> None:
    reader = open_dataset(data)
    cache = reader.num_frames * FRAME_BYTES // 10  # the dataset is 10x the cache
    ds = FrameDataset(data, "all", batch_size=50, cache_bytes=cache, workers=workers,
                      drop_last=False)
    assert ds.num_frames == reader.num_frames
    plan = ds._stream.plan(0)
    assert len(plan) >= 10
    biggest_block = max(ds._source.nbytes)
    for group in plan:  # bounded memory: each buffer is at most half the cache plus one block
        assert sum(ds._source.nbytes[b] for b in group) < cache // 2 + biggest_block
    batches = list(ds.batches(0))
    assert len(batches) == len(ds) == math.ceil(reader.num_frames / 50)
    assert all(b.shape == (50, 16, 16, 3) and b.dtype == np.uint8 for b in batches[:-1])
    got = np.concatenate(batches)
    assert rows(got) == rows(split_frames(data, reader.episode_ids))
    # shuffled across episodes: a batch mixes frames of several blocks
    assert not np.array_equal(got[:50], split_frames(data, reader.episode_ids)[:50])


def relayout(src: Path, dst: Path) -> Path:
    """The episodes of ``src`` written again into two shards, in a scrambled order."""
    reader = open_dataset(src)
    manifest = json.loads((src / MANIFEST).read_text())
    dst.mkdir()
    (dst / MANIFEST).write_text(json.dumps({**manifest, "shards": ["w0", "w1"]}))
    writers = [ShardWriter(Location(dst), f"w{k}", reader.layout, worker=k) for k in (0, 1)]
    entries = reader.episode_index()
    for n, pos in enumerate(np.random.default_rng(0).permutation(len(entries))):
        meta = {"id": entries[pos]["id"], "seed": entries[pos]["seed"]}
        writers[n % 3 % 2].write([(meta, reader.episode(int(pos)))])
    return dst


def test_order_depends_on_the_episodes_not_on_the_shards(data: Path, tmp_path: Path) -> None:
    """The same episodes laid out differently in the shards: same batches, same sample."""
    other = relayout(data, tmp_path / "other")
    layout = {e["id"]: (e["shard"], e["start"]) for e in open_dataset(data).episode_index()}
    assert layout != {e["id"]: (e["shard"], e["start"])
                      for e in open_dataset(other).episode_index()}
    for split in ("train", "val"):
        a, b = (FrameDataset(p, split, batch_size=16, seed=3, cache_bytes=FRAME_BYTES * 100,
                             val_fraction=0.2) for p in (data, other))
        for epoch in (0, 1):
            assert all(np.array_equal(x, y) for x, y in zip(a.batches(epoch), b.batches(epoch),
                                                            strict=True))
        assert np.array_equal(a.sample(40, seed=5), b.sample(40, seed=5))


def test_batches_mix_episodes(data: Path) -> None:
    reader = open_dataset(data)
    episode_of = {f.tobytes(): e["id"] for e, ep in zip(reader.episode_index(), reader,
                                                        strict=True) for f in ep.obs}
    ds = FrameDataset(data, "all", batch_size=48, cache_bytes=2**30)  # one buffer: full shuffle
    first = next(iter(ds))
    assert len({episode_of[f.tobytes()] for f in first}) >= 12  # of 24 episodes


def test_order_depends_only_on_seed_and_epoch(data: Path) -> None:
    def make(seed: int, workers: int = 1) -> FrameDataset:
        return FrameDataset(data, batch_size=64, cache_bytes=64 * 2**10, seed=seed,
                            workers=workers)

    a, b = make(1, workers=2), make(1, workers=0)
    for epoch in (0, 1):
        for x, y in zip(a.batches(epoch), b.batches(epoch), strict=True):
            np.testing.assert_array_equal(x, y)
    first = next(iter(a.batches(0)))
    assert not np.array_equal(first, next(iter(a.batches(1))))
    assert not np.array_equal(first, next(iter(make(2).batches(0))))


def test_batches_from_start_equal_the_tail_of_the_epoch(data: Path) -> None:
    ds = FrameDataset(data, batch_size=40, cache_bytes=48 * 2**10, workers=1)
    full = list(ds.batches(3))
    assert len(full) == len(ds) == ds.num_frames // 40
    for start in (0, 1, 7, len(full) // 2, len(full) - 1, len(full)):
        tail = list(ds.batches(3, start))
        assert len(tail) == len(full) - start
        for x, y in zip(tail, full[start:], strict=True):
            np.testing.assert_array_equal(x, y)


def test_split_is_by_episode_and_seeded(data: Path) -> None:
    train = FrameDataset(data, "train", batch_size=8, seed=5, val_fraction=0.25)
    val = FrameDataset(data, "val", batch_size=8, seed=5, val_fraction=0.25, drop_last=False)
    ids = open_dataset(data).episode_ids
    assert sorted(train.episode_ids + val.episode_ids) == ids
    assert len(val.episode_ids) == 6 and not set(train.episode_ids) & set(val.episode_ids)
    assert val.episode_ids == FrameDataset(data, "val", batch_size=8, seed=5,
                                           val_fraction=0.25).episode_ids
    assert val.episode_ids != FrameDataset(data, "val", batch_size=8, seed=6,
                                           val_fraction=0.25).episode_ids
    assert rows(np.concatenate(list(val))) == rows(split_frames(data, val.episode_ids))
    assert train.num_frames + val.num_frames == open_dataset(data).num_frames
    assert split_episodes(range(10), 0.0, 0) == (list(range(10)), [])
    with pytest.raises(UserError, match="val split is empty"):
        FrameDataset(data, "val", batch_size=8, val_fraction=0.0)
    with pytest.raises(UserError, match="less than one batch"):
        FrameDataset(data, "val", batch_size=100_000)
    sample = train.sample(10, seed=0)
    assert sample.shape == (10, 16, 16, 3)
    np.testing.assert_array_equal(sample, train.sample(10, seed=0))


def test_sequence_windows_are_exact_slices_of_episodes(data: Path) -> None:
    reader = open_dataset(data)
    seq_len, stride = 12, 5
    ds = SequenceDataset(data, "all", seq_len=seq_len, stride=stride, batch_size=16,
                         cache_bytes=96 * 2**10, drop_last=False)
    want = []
    for ep in reader:
        done = ep.terminated | ep.truncated
        for s in range(0, len(ep.reward) - seq_len + 1, stride):
            w = slice(s, s + seq_len)
            want.append((ep.obs[w].tobytes(), ep.action[w].tobytes(), ep.reward[w].tobytes(),
                         done[w].tobytes()))
    assert ds.num_windows == len(want)
    got = []
    for batch in ds.batches(0):
        assert batch.obs.shape[1:] == (seq_len, 16, 16, 3) and batch.obs.dtype == np.uint8
        assert batch.reward.shape[1:] == (seq_len,) and batch.done.dtype == bool
        assert not batch.done[:, :-1].any()  # windows never run past an episode's end
        for i in range(len(batch.reward)):
            got.append((batch.obs[i].tobytes(), batch.action[i].tobytes(),
                        batch.reward[i].tobytes(), batch.done[i].tobytes()))
    assert sorted(got) == sorted(want)
    tail = list(ds.batches(0, 3))
    np.testing.assert_array_equal(tail[0].obs, list(ds.batches(0))[3].obs)
