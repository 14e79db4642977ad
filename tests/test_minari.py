"""Minari datasets in and out: ``worldmodel data export --format minari`` and ``data import``."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("minari", reason='minari is not installed (pip install "worldmodel[minari]")')
pytest.importorskip("h5py", reason='h5py is not installed (pip install "worldmodel[minari]")')

import minari
from minari.data_collector import EpisodeBuffer

from worldmodel.cli import main
from worldmodel.dataset import open_dataset
from worldmodel.minari_io import export_minari, import_minari, space_from_description

#: The smallest PSNR (dB) of a Reach episode at 32x32 stored as JPEG by Minari (PIL's default
#: quality 75) and decoded again: measured 25.4-29.5 dB per frame, 26.9 on average.
JPEG_MIN_PSNR = 24.0
TINY_VAE = ["vae.widths=[8, 16]", "vae.latent_dim=4", "vae.batch_size=8", "vae.steps=2",
            "vae.val_every=2", "vae.log_every=1", "vae.image_every=2", "vae.val_frames=16",
            "vae.probe_frames=0", "data.val_fraction=0.25", "data.loader_workers=0"]


@pytest.fixture(autouse=True)
def minari_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test writes its Minari datasets to a folder of its own."""
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


@pytest.fixture(autouse=True)
def keep_log_handlers() -> Iterator[None]:
    """``main`` points the root logger at this test's captured stderr: restore it afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def reach32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 Reach episodes of at most 12 steps at 32x32x3 (Minari JPEGs that size), Box actions."""
    from worldmodel.collect import run
    from worldmodel.config import resolve_config

    cfg = resolve_config(None, ["env.image_size=32", "collect.episodes=2", "collect.workers=1",
                                "collect.max_episode_steps=12",
                                "env.kwargs={continuous: true}"])
    return run(cfg, tmp_path_factory.mktemp("reach32") / "data")


def _same_episodes(a: Path, b: Path, frames: bool = True) -> None:
    ra, rb = open_dataset(a), open_dataset(b)
    assert ra.num_episodes == rb.num_episodes and ra.num_frames == rb.num_frames
    for x, y in zip(ra, rb, strict=True):
        names = ["action", "reward", "terminated", "truncated"] + (["obs"] if frames else [])
        for name in names:
            want, got = getattr(x, name), getattr(y, name)
            assert got.dtype == want.dtype and np.array_equal(got, want), name


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_export_writes_a_minari_dataset_with_env_spec_and_scores(reach16: Path) -> None:
    assert main(["-q", "data", "export", str(reach16), "--format", "minari",
                 "--id", "worldmodel/Reach/random-v0"]) == 0
    ds = minari.load_dataset("worldmodel/Reach/random-v0")
    ours = open_dataset(reach16)
    meta = ds.storage.metadata
    assert ds.total_episodes == ours.num_episodes and ds.total_steps == ours.num_frames
    assert ds.env_spec.id == "worldmodel/Reach-v0"
    assert ds.env_spec.max_episode_steps == 30 and ds.env_spec.kwargs["size"] == 16
    assert meta["jpeg_encoding"] is False
    returns = [e["return"] for e in ours.episode_index()]
    assert meta["ref_min_score"] == pytest.approx(np.mean(returns))
    assert '"image_size": 16' in meta["description"]
    assert meta["worldmodel"]["preprocessing"] == ours.manifest["preprocessing"]
    seeds = [m["seed"] for m in ds.storage.get_episode_metadata(range(ds.total_episodes))]
    assert seeds == [e["seed"] for e in ours.episode_index()]
    for ep, want in zip(ds.iterate_episodes(), ours, strict=True):
        assert ep.observations.shape == (want.length + 1, 16, 16, 3)
        assert np.array_equal(ep.observations[:-1], want.obs)
        assert np.array_equal(ep.observations[-1], want.obs[-1])  # repeated: not stored by us
        assert np.array_equal(ep.terminations, want.terminated)
        assert np.array_equal(ep.truncations, want.truncated)
    assert any(ep.truncated.any() for ep in ours) or any(ep.terminated.any() for ep in ours)


def test_round_trip_is_exact_and_train_vae_runs_on_the_import(
    reach16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export_minari(reach16, "worldmodel/Reach/random-v0")
    out = tmp_path / "imported"
    assert main(["-q", "data", "import", "worldmodel/Reach/random-v0", "-o", str(out)]) == 0
    _same_episodes(reach16, out)
    manifest = open_dataset(out).manifest
    assert manifest["source"]["lossy_frames"] is False
    assert manifest["preprocessing"] == open_dataset(reach16).manifest["preprocessing"]
    assert manifest["policy"] == "random"
    capsys.readouterr()
    assert main(["data", "verify", str(out)]) == 0
    assert main(["data", "info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "source      Minari worldmodel/Reach/random-v0" in shown and "frames exact" in shown
    run = tmp_path / "vae"
    sets = [a for s in TINY_VAE for a in ("--set", s)]
    assert main(["-q", "train-vae", "--config", str(out / "config.yaml"), "--data", str(out),
                 "--out", str(run), *sets]) == 0
    assert (run / "best.pt").is_file()


def test_frames_minari_would_jpeg_stay_exact(reach32: Path, tmp_path: Path) -> None:
    export_minari(reach32, "worldmodel/Reach/random32-v0")
    ds = minari.load_dataset("worldmodel/Reach/random32-v0")
    assert ds.storage.metadata["jpeg_encoding"] is False
    assert ds.action_space.shape == (2,) and ds.env_spec.kwargs["continuous"] is True
    out = import_minari("worldmodel/Reach/random32-v0", tmp_path / "imported")
    _same_episodes(reach32, out)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_jpeg_minari_dataset_imports_within_the_stated_psnr(
    reach32: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gymnasium import spaces

    reader = open_dataset(reach32)
    buffers = [EpisodeBuffer(observations=np.concatenate([ep.obs, ep.obs[-1:]]),
                             actions=ep.action, rewards=ep.reward,
                             terminations=ep.terminated, truncations=ep.truncated)
               for ep in reader]
    minari.create_dataset_from_buffers(
        "other/Reach/jpeg-v0", buffers, observation_space=spaces.Box(0, 255, (32, 32, 3), np.uint8),
        action_space=space_from_description(reader.manifest["action_space"]), jpeg_encoding=True,
        algorithm_name="random", author="x", author_email="x", code_permalink="x", description="x",
    )
    out = tmp_path / "imported"
    with caplog.at_level(logging.WARNING, logger="worldmodel"):
        import_minari("other/Reach/jpeg-v0", out)
    assert "JPEG" in caplog.text
    _same_episodes(reach32, out, frames=False)
    for want, got in zip(reader, open_dataset(out), strict=True):
        assert _psnr(want.obs, got.obs) >= JPEG_MIN_PSNR
    manifest = open_dataset(out).manifest
    assert manifest["source"]["lossy_frames"] is True
    assert manifest["env_id"] == "minari:other/Reach/jpeg-v0"  # no env spec recorded
    assert manifest["policy"] == "minari:random"
    capsys.readouterr()
    assert main(["data", "info", str(out)]) == 0
    assert "JPEG-decoded (lossy)" in capsys.readouterr().out


def test_a_policy_other_than_random_leaves_ref_min_score_unset(
    reach16: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    shutil.copytree(reach16, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["policy"] = "brownian"
    (data / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="worldmodel"):
        export_minari(data, "worldmodel/Reach/brownian-v0")
    assert "ref_min_score is left unset" in caplog.text
    meta = minari.load_dataset("worldmodel/Reach/brownian-v0").storage.metadata
    assert "ref_min_score" not in meta


def _error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_one_line_errors(
    reach16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gymnasium import spaces

    out = str(tmp_path / "out")
    assert "no local Minari dataset nope/Reach/x-v0" in _error(
        capsys, "data", "import", "nope/Reach/x-v0", "-o", out)
    assert "not a Minari dataset id" in _error(capsys, "data", "import", "bad id!", "-o", out)
    assert "not a Minari dataset id" in _error(
        capsys, "data", "export", str(reach16), "--id", "no version")
    export_minari(reach16, "worldmodel/Reach/random-v0")
    assert "already exists" in _error(
        capsys, "data", "export", str(reach16), "--id", "worldmodel/Reach/random-v0")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not empty" in _error(capsys, "data", "import", "worldmodel/Reach/random-v0", "-o",
                                 str(tmp_path / "full"))
    steps = 3
    minari.create_dataset_from_buffers(
        "other/Vector/x-v0",
        [EpisodeBuffer(observations=np.zeros((steps + 1, 4), np.float32),
                       actions=np.zeros(steps, np.int64), rewards=np.zeros(steps),
                       terminations=np.eye(steps, dtype=bool)[-1],
                       truncations=np.zeros(steps, bool))],
        observation_space=spaces.Box(-1, 1, (4,), np.float32), action_space=spaces.Discrete(2),
        algorithm_name="x", author="x", author_email="x", code_permalink="x", description="x",
    )
    assert "image observations only" in _error(
        capsys, "data", "import", "other/Vector/x-v0", "-o", out)
    assert not Path(out).exists()
    monkeypatch.setitem(sys.modules, "minari", None)  # `import minari` raises ImportError
    err = _error(capsys, "data", "import", "worldmodel/Reach/random-v0", "-o", out)
    assert 'pip install "worldmodel[minari]"' in err
    assert 'pip install "worldmodel[minari]"' in _error(
        capsys, "data", "export", str(reach16), "--id", "worldmodel/Reach/again-v0")
