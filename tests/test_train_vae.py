"""``worldmodel train-vae``: run folder, determinism, resume, bad input, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from worldmodel import train_vae, training
from worldmodel.cli import main as cli_main
from worldmodel.config import Config, resolve_config
from worldmodel.errors import UserError
from worldmodel.io import read_jsonl
from worldmodel.vae import load_checkpoint, load_vae

TINY = [
    "env.image_size=16", "vae.widths=[8, 16]", "vae.latent_dim=4", "vae.batch_size=16",
    "vae.steps=12", "vae.val_every=4", "vae.log_every=2", "vae.image_every=4",
    "vae.val_frames=64", "vae.probe_frames=200", "data.val_fraction=0.25", "data.loader_workers=0",
]


def _cfg(*extra: str) -> Config:
    return resolve_config(None, [*TINY, *extra])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 Reach episodes of 25 steps at 16x16x3, with the true state."""
    from worldmodel import collect

    cfg = resolve_config(None, [
        "env.image_size=16", "collect.episodes=8", "collect.workers=1",
        "collect.max_episode_steps=25",
    ])
    return collect.run(cfg, tmp_path_factory.mktemp("data") / "reach16")


def _weights(run: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return load_checkpoint(run / f"{name}.pt")["model"]


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_folder_explains_itself(dataset: Path, tmp_path: Path) -> None:
    out = train_vae.run(_cfg(), dataset, tmp_path / "run")
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "last.pt", "best.pt", "metrics.jsonl", "summary.json"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12
    assert summary["frames_per_second"] > 0 and summary["wall_seconds"] > 0
    assert 0 < summary["val_mse_per_pixel"] < 1
    assert summary["active_units"] == sum(k > 0.01 for k in summary["kl_per_dim"])
    assert 0 < summary["mean_image_mse"] < 1
    assert summary["dataset"]["train_episodes"] == 6  # 8 episodes, a quarter held out
    rep = summary["representation"]
    assert len(rep["probe_r2"]["per_dim"]) == 4  # agent x, y, target x, y
    assert rep["knn_mse"] >= 0 and rep["random_projection"]["knn_mse"] >= 0
    assert isinstance(summary["warnings"], list)

    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if "vae/loss" in r]
    val = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in val] == [4, 8, 12]
    assert len(train[0]["vae/kl_per_dim"]) == 4
    assert "repr/probe_r2" in val[-1] and "repr/random_knn_mse" in val[-1]

    vae = load_vae(out)
    assert vae.image_shape == (16, 16, 3) and vae.latent_dim == 4
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["step"] == summary["best"]["step"]


def test_tensorboard_has_scalars_and_images(dataset: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train_vae.run(_cfg("vae.steps=4"), dataset, tmp_path / "run")
    events = EventAccumulator(str(out))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"vae/loss", "vae/recon", "vae/kl", "vae/active_units", "val/loss",
            "val/mse_per_pixel", "kl_per_dim/00", "repr/probe_r2"} <= scalars
    assert events.Tags()["images"] == ["vae/reconstructions"]
    image = events.Images("vae/reconstructions")[0]
    assert (image.height, image.width) == (32, 16 * train_vae.IMAGES_IN_GRID)


def test_loss_decreases(dataset: Path, tmp_path: Path) -> None:
    out = train_vae.run(_cfg("vae.steps=40", "vae.val_every=40", "vae.lr=3e-3"), dataset,
                        tmp_path / "run")
    losses = [r["vae/loss"] for r in read_jsonl(out / "metrics.jsonl") if "vae/loss" in r]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_same_seed_gives_the_same_weights(dataset: Path, tmp_path: Path) -> None:
    a = train_vae.run(_cfg(), dataset, tmp_path / "a")
    b = train_vae.run(_cfg(), dataset, tmp_path / "b")
    c = train_vae.run(_cfg("seed=1"), dataset, tmp_path / "c")
    assert _same_weights(_weights(a), _weights(b))
    assert not _same_weights(_weights(a), _weights(c))
    assert load_vae(a).weights_hash == load_vae(b).weights_hash


def test_resume_gives_the_same_result_as_an_uninterrupted_run(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg("vae.steps=14")  # 6 batches per epoch: the interruption and the end mid-epoch
    whole = train_vae.run(cfg, dataset, tmp_path / "whole")

    real_stream = train_vae.batch_stream

    def interrupted(dataset: Any, step: int) -> Iterator[np.ndarray]:
        for i, batch in enumerate(real_stream(dataset, step)):
            if step + i == 10:  # killed during step 11; last.pt is from step 8
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(train_vae, "batch_stream", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_vae.run(cfg, dataset, tmp_path / "cut")
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 8
    monkeypatch.setattr(train_vae, "batch_stream", real_stream)

    resumed = train_vae.run(cfg, dataset, tmp_path / "cut", resume=True)
    assert _same_weights(_weights(whole), _weights(resumed))
    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"] == 14
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])
    steps = [r["step"] for r in read_jsonl(resumed / "metrics.jsonl") if "vae/loss" in r]
    assert steps == sorted(set(steps))  # the interrupted session's extra records were dropped
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(resumed))
    events.Reload()  # the checkpoint's own validation (step 8) is kept, the lost step 10 is not
    assert [e.step for e in events.Scalars("val/loss")] == [4, 8, 12, 14]
    assert [e.step for e in events.Scalars("vae/loss")] == [2, 4, 6, 8, 10, 12, 14]

    # Resuming a finished run trains nothing more; extending it continues.
    train_vae.run(cfg, dataset, tmp_path / "cut", resume=True)
    assert _same_weights(_weights(whole), _weights(tmp_path / "cut"))
    train_vae.run(_cfg("vae.steps=16"), dataset, tmp_path / "cut", resume=True)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 16


def test_fresh_run_refuses_a_folder_with_checkpoints(dataset: Path, tmp_path: Path) -> None:
    out = train_vae.run(_cfg("vae.steps=4"), dataset, tmp_path / "run")
    with pytest.raises(UserError, match="pass --resume to continue it, or pick another --out"):
        train_vae.run(_cfg("vae.steps=4"), dataset, out)
    with pytest.raises(UserError, match=r"differ from its config.yaml: vae.lr: 0.001 -> 0.01;"):
        train_vae.run(_cfg("vae.steps=4", "vae.lr=0.01"), dataset, out, resume=True)
    # the buffer size decides the batch order: a resume must keep it
    with pytest.raises(UserError, match=r"data.cache_bytes: 536870912 -> 2097152"):
        train_vae.run(_cfg("vae.steps=8", "data.cache_bytes=2097152"), dataset, out, resume=True)


def test_resume_refuses_a_dataset_whose_validation_episodes_changed(
    dataset: Path, tmp_path: Path
) -> None:
    import shutil

    from worldmodel import collect

    out = train_vae.run(_cfg("vae.steps=4"), dataset, tmp_path / "run")
    grown = tmp_path / "grown"
    shutil.copytree(dataset, grown)
    collect.run(resolve_config(grown / "config.yaml", ["collect.episodes=10"]), grown)
    with pytest.raises(UserError, match=r"validation episodes differ .* gained or lost"):
        train_vae.run(_cfg("vae.steps=8"), grown, out, resume=True)
    assert load_checkpoint(out / "last.pt")["step"] == 4
    train_vae.run(_cfg("vae.steps=8"), dataset, out, resume=True)  # its own dataset: fine
    from worldmodel.loaders import split_episodes

    assert load_checkpoint(out / "last.pt")["val_episodes"] == split_episodes(range(8), 0.25, 0)[1]


def test_resume_without_a_checkpoint_is_an_error(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nothing to resume: .* holds no vae run"):
        train_vae.run(_cfg("vae.steps=4"), dataset, tmp_path / "run", resume=True)
    # What a kill between best.pt and the first last.pt leaves: a fresh run starts over.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"partial")
    out = train_vae.run(_cfg("vae.steps=4"), dataset, tmp_path / "run")
    assert load_checkpoint(out / "best.pt")["step"] == 4


def test_best_is_written_before_last(dataset: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[tuple[str, int]] = []
    import worldmodel.vae as vae_module

    real = vae_module.save_checkpoint

    def save(path: Path, data: dict[str, Any]) -> None:
        written.append((path.name, data["step"]))
        real(path, data)

    monkeypatch.setattr(vae_module, "save_checkpoint", save)  # what training.py writes with
    train_vae.run(_cfg("vae.steps=4", "vae.val_every=2", "vae.lr=3e-3"), dataset,
                  tmp_path / "run")
    assert written[:2] == [("best.pt", 2), ("last.pt", 2)]  # the first validation improves
    for i, (name, step) in enumerate(written):
        if name == "best.pt":
            assert written[i + 1] == ("last.pt", step)


def test_images_follow_image_every_not_log_every(dataset: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train_vae.run(_cfg("vae.steps=6", "vae.image_every=3"), dataset, tmp_path / "run")
    events = EventAccumulator(str(out))
    events.Reload()
    assert [e.step for e in events.Images("vae/reconstructions")] == [3, 6]  # log_every=2


def test_epochs_set_the_number_of_steps(dataset: Path, tmp_path: Path) -> None:
    out = train_vae.run(_cfg("vae.epochs=2", "vae.steps=null"), dataset, tmp_path / "run")
    assert json.loads((out / "summary.json").read_text())["steps"] == 2 * (150 // 16)


def test_dataset_that_does_not_fit_the_config(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"16x16x3 frames .* gives 32x32x3.*env.image_size=16"):
        train_vae.run(_cfg("env.image_size=32"), dataset, tmp_path / "run")
    with pytest.raises(UserError, match="gives 16x16x1"):
        train_vae.run(_cfg("env.grayscale=true"), dataset, tmp_path / "run")
    with pytest.raises(UserError, match="no such dataset"):
        train_vae.run(_cfg(), tmp_path / "missing", tmp_path / "run")
    with pytest.raises(UserError, match="less than one batch"):
        train_vae.run(_cfg("vae.batch_size=1000"), dataset, tmp_path / "run")
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("log_every", [2, 4])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_every: int
) -> None:
    real_loss = train_vae.vae_loss
    calls = {"n": 0}

    def poisoned(out: Any, x: torch.Tensor, *args: Any) -> Any:
        terms = real_loss(out, x, *args)
        if torch.is_grad_enabled():  # training steps only
            calls["n"] += 1
            if calls["n"] == 6:
                return terms._replace(loss=terms.loss * float("nan"))
        return terms

    monkeypatch.setattr(train_vae, "vae_loss", poisoned)
    with pytest.raises(UserError, match=r"NaN/inf at step 5; .* last good checkpoint is") as info:
        # log_every=4: the NaN of step 5 is found at step 8's log line, before its checkpoint
        train_vae.run(_cfg(f"vae.log_every={log_every}"), dataset, tmp_path / "run")
    assert info.value.exit_code == 1 and "\n" not in str(info.value)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 4


def test_prefetch_keeps_the_order_and_hands_over_errors() -> None:
    def items() -> Iterator[int]:
        yield from range(5)
        raise ValueError("broken chunk")

    got = []
    prefetch = training.Prefetch(items(), depth=2)
    with pytest.raises(ValueError, match="broken chunk"):
        for item in prefetch:
            got.append(item)
    assert got == [0, 1, 2, 3, 4]
    endless = training.Prefetch(iter(int, 1), depth=3)  # never ends
    assert next(endless) == 0
    endless.close()
    assert not endless._thread.is_alive()
    assert training.prefetch_depth(64 * 64 * 64 * 3) == 64
    assert training.prefetch_depth(256 * 96 * 96 * 3) == 9


def test_kl_warmup_ramps_the_kl_weight_to_beta() -> None:
    cfg = _cfg("vae.beta=2.0", "vae.kl_warmup_steps=4")
    assert [train_vae.kl_weight(cfg, s) for s in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert train_vae.kl_weight(_cfg("vae.beta=2.0"), 0) == 2.0


def test_quality_warnings() -> None:
    good = {"val/active_units": 3.0, "val/mse_per_pixel": 0.002}
    assert train_vae.quality_warnings(good, mean_image_mse=0.02) == []
    stuck = {"val/active_units": 0.0, "val/mse_per_pixel": 0.019}
    warnings = train_vae.quality_warnings(stuck, mean_image_mse=0.02)
    assert len(warnings) == 2
    assert "no active latent units" in warnings[0] and "stuck near" in warnings[1]
    # far worse than the mean image (Pong after 200 steps: 0.019 vs 0.0003) is undertraining
    worse = {"val/active_units": 2.0, "val/mse_per_pixel": 0.019}
    (warning,) = train_vae.quality_warnings(worse, mean_image_mse=0.0003)
    assert "worse than the dataset's mean image" in warning and "undertrained" in warning


def test_no_held_out_episodes_validates_on_training_frames(dataset: Path, tmp_path: Path) -> None:
    out = train_vae.run(_cfg("data.val_fraction=0", "vae.steps=2"), dataset, tmp_path / "run")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["representation"] is None
    assert any("no held-out episodes" in w for w in summary["warnings"])


def _cli_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    sets = [arg for s in TINY for arg in ("--set", s)]
    return ["-q", "train-vae", *sets, "--data", str(dataset), "--out", str(out), *extra]


@pytest.mark.slow
def test_cli_end_to_end_in_a_subprocess(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "worldmodel", *_cli_args(dataset, out, "--set", "vae.steps=4")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert load_vae(out).latent_dim == 4
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"worldmodel train-vae: error: {out} already holds a finished vae run; pass "
        "--resume to continue it, or pick another --out"
    ]


@pytest.mark.parametrize(
    ("extra", "data", "message"),
    [
        (["--set", "env.image_size=32"], None, "16x16x3 frames"),
        ([], "missing", "no such dataset"),
        (["--set", "vae.bogus=1"], None, "vae.bogus: unknown key"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
    data: str | None, message: str,
) -> None:
    path = tmp_path / data if data else dataset
    code = cli_main(_cli_args(path, tmp_path / "run", *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("worldmodel train-vae: error: ")
    assert message in err[0]


def test_constant_state_components_are_named_and_not_logged() -> None:
    result = {
        "state_names": ["agent_x", "target_x"],
        "probe_r2": {"per_dim": [0.9, 0.0], "mean": 0.9, "constant": [1]},
        "knn_mse": 0.1,
        "random_projection": {"probe_r2": {"per_dim": [0.1, 0.0], "mean": 0.1}, "knn_mse": 0.2},
    }
    scalars = train_vae._repr_scalars(result)
    assert scalars["repr/probe_r2"] == 0.9 and "repr/probe_r2_agent_x" in scalars
    assert "repr/probe_r2_target_x" not in scalars
    (warning,) = train_vae._constant_state_warning(result)
    assert "target_x" in warning and "left out of the mean probe R^2" in warning
    assert train_vae._constant_state_warning(None) == []
