"""The zarr dataset store: reading, crash safety of shard writes, info/verify (also via the CLI)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from worldmodel.collect import run
from worldmodel.config import resolve_config
from worldmodel.dataset import (
    DatasetReader,
    Episode,
    Layout,
    Location,
    ShardWriter,
    open_dataset,
    print_info,
    print_verify,
    read_shard_index,
)
from worldmodel.errors import UserError

CHUNK = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = resolve_config(None, ["env.image_size=16", "collect.episodes=6", "collect.workers=2",
                                f"collect.chunk_frames={CHUNK}", "collect.commit_seconds=0"])
    return run(cfg, tmp_path_factory.mktemp("ds") / "data")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worldmodel", *args], capture_output=True,
                          text=True, timeout=60)


def test_reader_shapes_and_index(data: Path) -> None:
    reader = open_dataset(data)
    assert reader.num_episodes == 6 and reader.frame_shape == (16, 16, 3)
    assert reader.manifest["layout"]["chunk_frames"] == CHUNK
    total = 0
    for i, entry in enumerate(reader.episode_index()):
        assert set(entry) >= {"id", "start", "length", "seed", "return", "worker", "crc32"}
        ep = reader.episode(i)
        n = entry["length"]
        assert ep.obs.shape == (n, 16, 16, 3) and ep.obs.dtype == np.uint8
        assert ep.action.shape == (n,) and ep.action.dtype == np.int64
        assert ep.reward.dtype == np.float32 and ep.state is not None
        assert ep.state.shape == (n, 4)
        assert ep.reward.sum() == pytest.approx(entry["return"], abs=1e-4)
        assert (ep.terminated | ep.truncated)[-1] and not (ep.terminated | ep.truncated)[:-1].any()
        total += n
    assert reader.num_frames == total
    obs = reader.shard_array("w0", "obs")
    assert obs.chunks == (CHUNK, 16, 16, 3)


def test_info_and_verify_through_the_cli(data: Path) -> None:
    info = cli("data", "info", str(data))
    assert info.returncode == 0, info.stderr
    assert "episodes    6 of 6 requested" in info.stdout
    assert "compression" in info.stdout and "return" in info.stdout
    verify = cli("data", "verify", str(data))
    assert verify.returncode == 0 and "OK, 6 episodes" in verify.stdout
    missing = cli("data", "info", str(data / "nope"))
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "no such dataset" in missing.stderr


def _episodes_in_chunk(reader: DatasetReader, shard: str, chunk: int) -> set[int]:
    lo, hi = chunk * CHUNK, (chunk + 1) * CHUNK
    return {e["id"] for e in reader.episode_index()
            if e["shard"] == shard and e["start"] < hi and e["start"] + e["length"] > lo}


def test_verify_names_the_episode_of_a_corrupted_chunk(data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    reader = open_dataset(bad)
    shard = max(("w0", "w1"), key=lambda s: sum(e["shard"] == s for e in reader.episode_index()))
    obs = bad / "shards" / f"{shard}.zarr" / "obs"
    chunk_file = obs / zarr.open_array(str(obs), mode="r").metadata.encode_chunk_key((1, 0, 0, 0))
    size = chunk_file.stat().st_size
    chunk_file.write_bytes(np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes())
    hit = _episodes_in_chunk(reader, shard, 1)
    assert hit
    result = cli("data", "verify", str(bad))
    assert result.returncode == 1
    named = {int(line.split()[2]) for line in result.stdout.splitlines() if line.startswith("BAD")}
    assert named == hit, result.stdout


def test_verify_detects_rewritten_values_by_checksum(data: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    entry = open_dataset(bad).episode_index()[2]
    reward = zarr.open_array(str(bad / "shards" / f"{entry['shard']}.zarr" / "reward"), mode="a")
    pos = entry["start"] + 1
    reward[pos] = float(np.asarray(reward[pos])) + 1.0  # a valid chunk with a wrong value
    assert print_verify(bad) == 1
    out = capsys.readouterr().out
    assert f"episode {entry['id']} " in out and "reward checksum mismatch" in out
    assert out.count("BAD") == 1


def test_reads_an_fsspec_url(data: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    fs.put(str(data), "/copied", recursive=True)
    remote, local = open_dataset("memory://copied"), open_dataset(data)
    assert remote.episode_index() == local.episode_index()
    for got, want in zip(remote.episode(4), local.episode(4), strict=True):
        np.testing.assert_array_equal(got, want)
    assert print_verify("memory://copied") == 0
    fs.rm("/copied", recursive=True)


def test_open_errors_are_one_line_user_errors(data: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such dataset"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not a worldmodel dataset"):
        open_dataset(tmp_path / "plain")
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        open_dataset(broken)
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = json.loads((data / "manifest.json").read_text())
    (empty / "manifest.json").write_text(json.dumps({**manifest, "shards": ["w0"]}))
    with pytest.raises(UserError, match="no complete episodes"):
        open_dataset(empty)
    assert print_info(empty) == 0  # info still describes an empty dataset
    index = broken / "shards" / "w0.episodes.jsonl"
    shutil.copy(data / "manifest.json", broken / "manifest.json")
    index.write_text("{not an episode\n" + index.read_text())
    with pytest.raises(UserError, match=r"w0\.episodes\.jsonl is unreadable \(line 1"):
        open_dataset(broken)


def _small_layout() -> Layout:
    return Layout(frame_shape=(4, 4, 1), action_shape=(), action_dtype="int64",
                  state_shape=None, chunk_frames=8)


def _episode(n: int, value: int) -> Episode:
    done = np.zeros(n, bool)
    done[-1] = True
    return Episode(np.full((n, 4, 4, 1), value, np.uint8), np.arange(n), np.ones(n, np.float32),
                   done, np.zeros(n, bool))


def test_uncommitted_tail_is_dropped_when_a_shard_is_reopened(tmp_path: Path) -> None:
    loc = Location(tmp_path)
    layout = _small_layout()
    writer = ShardWriter(loc, "w0", layout, worker=0)
    writer.write([({"id": 0, "seed": 1}, _episode(5, 1)), ({"id": 1, "seed": 2}, _episode(7, 2))])
    assert writer.end == 12
    # A writer killed mid-episode: arrays grown and partly written, index not rewritten.
    obs = writer.arrays["obs"]
    obs.resize((40, 4, 4, 1))
    obs[12:40] = 9
    index = tmp_path / "shards" / "w0.episodes.jsonl"
    with open(index, "a") as f:  # ... and an index append cut short
        f.write('{"id": 2, "start": 12, "len')
    assert [e["id"] for e in read_shard_index(loc, "w0")] == [0, 1]  # readers skip the torn line
    reopened = ShardWriter(loc, "w0", layout, worker=0)
    assert reopened.end == 12 and reopened.arrays["obs"].shape[0] == 12
    assert index.read_text().endswith("}\n")  # the torn line is gone
    assert not (tmp_path / "shards" / "w0.zarr" / "obs" / "c" / "4").exists() or not any(
        (tmp_path / "shards" / "w0.zarr" / "obs" / "c" / "4").rglob("*.*"))
    entries = reopened.write([({"id": 2, "seed": 3}, _episode(3, 3))])
    assert entries[0]["start"] == 12
    assert [e["id"] for e in read_shard_index(loc, "w0")] == [0, 1, 2]
    np.testing.assert_array_equal(reopened.arrays["obs"][:], np.concatenate(
        [np.full((5, 4, 4, 1), 1), np.full((7, 4, 4, 1), 2), np.full((3, 4, 4, 1), 3)]))


def _write_small_dataset(root: Path) -> Location:
    """Two committed episodes (5 + 7 steps) in shard w0, with a manifest that lists it."""
    layout = _small_layout()
    loc = Location(root)
    ShardWriter(loc, "w0", layout, worker=0).write(
        [({"id": 0, "seed": 1}, _episode(5, 1)), ({"id": 1, "seed": 2}, _episode(7, 2))])
    loc.write_json({"format": "worldmodel-dataset", "format_version": 1, "shards": ["w0"],
                    "layout": layout.to_json()}, "manifest.json")
    return loc


def test_commit_fsyncs_every_file_it_wrote_before_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the fsynced files")
    import os

    loc = _write_small_dataset(tmp_path)
    writer = ShardWriter(loc, "w0", _small_layout(), worker=0)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    before = time.time_ns() - 1
    time.sleep(0.01)
    writer.write([({"id": 2, "seed": 3}, _episode(10, 3))])  # steps 12-21: chunks 1 and 2
    index = str(tmp_path / "shards" / "w0.episodes.jsonl")
    assert synced[-1] == index  # the commit comes last ...
    shard = tmp_path / "shards" / "w0.zarr"
    touched = {str(p) for p in shard.rglob("*") if p.stat().st_mtime_ns > before}
    assert str(shard / "obs" / "c.2.0.0.0") in touched  # chunk keys are flat (dataset.py)
    missing = touched - set(synced[:-1])
    assert not missing, missing  # ... after every file and folder the write changed


def test_short_arrays_are_damaged_data_not_zeros(tmp_path: Path) -> None:
    from worldmodel.dataset import DamagedDataError

    loc = _write_small_dataset(tmp_path)
    # Committed steps 0-11, but the array lost its last 4 (e.g. zarr.json of an OS crash).
    zarr.open_array(str(tmp_path / "shards" / "w0.zarr" / "obs"), mode="a").resize((8, 4, 4, 1))
    reader = open_dataset(tmp_path)
    np.testing.assert_array_equal(reader.episode(0).obs, np.full((5, 4, 4, 1), 1))
    with pytest.raises(DamagedDataError, match=r"obs\[5:12\] is cut short"):
        reader.episode(1)
    assert print_verify(tmp_path) == 1
    with pytest.raises(DamagedDataError, match="holds 8 steps but its index commits 12"):
        ShardWriter(loc, "w0", _small_layout(), worker=0)
    obs = zarr.open_array(str(tmp_path / "shards" / "w0.zarr" / "obs"), mode="r")
    assert obs.shape[0] == 8  # not silently grown back with zeros


def test_shard_arrays_are_opened_once(data: Path) -> None:
    reader = open_dataset(data)
    assert reader.shard_array("w0", "obs") is reader.shard_array("w0", "obs")
