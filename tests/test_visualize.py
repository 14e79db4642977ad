"""worldmodel visualize: every output exists, has the right size and frames, and shows the VAE."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from worldmodel import latents, media, visualize
from worldmodel.config import Config
from worldmodel.dataset import open_dataset
from worldmodel.errors import UserError
from worldmodel.vae import LoadedVAE, build_vae, load_vae

SIZE = 16  # frame side of conftest's tiny configs; the display scale is round(64 / 16) = 4
LATENT = 4  # latent size of conftest's tiny VAE


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, reach16: Path,
          reach16_vae: Path) -> dict[str, Path]:
    """The session's tiny dataset and VAE (conftest), and a folder for this module's output."""
    return {"root": tmp_path_factory.mktemp("vis"), "data": reach16, "vae": reach16_vae}


@pytest.fixture(scope="module")
def result(setup: dict[str, Path]) -> dict[str, Path]:
    """Run the stage once through the CLI, as a user would (t-SNE: PCA is tested below)."""
    from worldmodel.cli import main

    out = setup["root"] / "out"
    assert main(["-q", "visualize", str(setup["vae"]), "--data", str(setup["data"]),
                 "--out", str(out), "--method", "tsne"]) == 0
    return {**setup, "out": out}


def _not_blank(image: np.ndarray) -> None:
    assert image.std() > 5, "image is (nearly) uniform"


def test_all_files_are_written(result: dict[str, Path]) -> None:
    out = result["out"]
    report = json.loads((out / "visualize.json").read_text())
    for name in ("reconstructions.png", "episode.mp4", "kl.png", "traversals.png",
                 "interpolation.png", "projection.png", "visualize.html", "visualize.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 100, name
        assert name in report["files"]
    assert not list(out.glob(".*")), "temporary files left behind"
    for name in ("kl.png", "traversals.png", "interpolation.png", "projection.png"):
        _not_blank(iio.imread(out / name))
    assert report["sample"]["frames"] == open_dataset(result["data"]).num_frames  # all < 2000
    assert len(report["kl_per_dim"]) == LATENT
    assert report["projection"].startswith("t-SNE")
    assert report["run"]["checkpoint"] == "best.pt"


def test_reconstruction_grid_is_originals_over_reconstructions(result: dict[str, Path]) -> None:
    grid = iio.imread(result["out"] / "reconstructions.png")
    cell, pad, scale = SIZE * 4, 2, 4
    assert grid.shape == (4 * (cell + pad) + pad, 8 * (cell + pad) + pad, 3)
    _not_blank(grid)
    vae = load_vae(result["vae"])
    frames = open_dataset(result["data"])
    every = np.concatenate([ep.obs for ep in frames])
    for row in (0, 2):  # rows 0 and 2 hold originals, rows 1 and 3 their reconstructions
        for col in range(8):
            y, x = pad + row * (cell + pad), pad + col * (cell + pad)
            original = grid[y : y + cell : scale, x : x + cell : scale]
            below = grid[y + cell + pad : y + 2 * cell + pad : scale, x : x + cell : scale]
            assert (every == original).all(axis=(1, 2, 3)).any(), "not a dataset frame"
            diff = below.astype(int) - vae.reconstruct(original[None])[0]
            assert np.abs(diff).max() <= 1  # batch size may change float rounding


def test_episode_video_is_original_beside_reconstruction(result: dict[str, Path]) -> None:
    report = json.loads((result["out"] / "visualize.json").read_text())
    episode = open_dataset(result["data"]).episode(report["episode"]["index"])
    video = iio.imread(result["out"] / "episode.mp4", index=None)
    scale = 256 // SIZE
    side = SIZE * scale
    assert video.shape == (episode.length, side, math.ceil((2 * side + 8) / 16) * 16, 3)
    assert report["episode"]["frames"] == episode.length
    left = video[:, :side:scale, :side:scale].astype(np.float32)
    assert np.abs(left - episode.obs).mean() < 12  # H.264 is lossy, but close
    right = video[:, :side:scale, side + 8 : 2 * side + 8 : scale].astype(np.float32)
    recon = load_vae(result["vae"]).reconstruct(episode.obs).astype(np.float32)
    assert np.abs(right - recon).mean() < 12
    _not_blank(video[0])


def test_gif_fallback_without_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media, "ffmpeg_available", lambda: False)
    frames = np.zeros((5, 32, 48, 3), np.uint8)
    frames[:, :, :16] = np.arange(5)[:, None, None, None] * 50
    path = media.write_video(tmp_path / "clip", frames, fps=10)
    assert path == tmp_path / "clip.gif"
    back = iio.imread(path, index=None)
    assert back.shape[:3] == (5, 32, 48)
    assert len({int(f[0, 0, 0]) for f in back}) == 5  # every frame kept, in order


def test_traversals_change_with_the_latent_value(setup: dict[str, Path]) -> None:
    vae = load_vae(setup["vae"])
    frames = np.concatenate([ep.obs for ep in open_dataset(setup["data"])])
    post = latents.posterior(vae, frames)
    kl = latents.kl_per_dim(post.mu, post.logvar)
    top = int(np.argmax(kl))
    grid = latents.latent_traversals(vae, post.mu[0], post.mu.std(0), [top], steps=7)
    assert grid.shape == (1, 7, SIZE, SIZE, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[0, 3], vae.decode(post.mu[:1])[0])  # 0 std = the frame
    first, last = grid[0, 0].astype(int), grid[0, -1].astype(int)
    assert np.abs(first - last).mean() > 1, "sweeping the most informative latent changes nothing"
    # A dimension swept by 0 std gives identical images.
    flat = latents.latent_traversals(vae, post.mu[0], np.zeros(LATENT), [top], steps=3)
    assert (flat[0] == flat[0, :1]).all()


def test_traversal_png_has_one_labelled_row_per_dimension(result: dict[str, Path]) -> None:
    image = iio.imread(result["out"] / "traversals.png")
    cell = SIZE * 4 + 2
    assert image.shape[0] >= LATENT * cell and image.shape[1] >= 7 * cell
    report = json.loads((result["out"] / "visualize.json").read_text())
    assert report["sample"]["active_units"] >= 1


def test_interpolation_ends_at_both_frames(setup: dict[str, Path]) -> None:
    vae = load_vae(setup["vae"])
    z = np.random.default_rng(0).normal(size=(2, LATENT)).astype(np.float32)
    line = latents.interpolate(vae, z[0], z[1], steps=5)
    assert line.shape == (5, SIZE, SIZE, 3)
    np.testing.assert_array_equal(line[[0, -1]], vae.decode(z))


def test_projection_methods() -> None:
    z = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)
    xy, how = latents.project_2d(z, "pca")
    assert xy.shape == (60, 2) and "PCA" in how
    assert np.var(xy[:, 0]) >= np.var(xy[:, 1])  # first component explains the most
    xy, how = latents.project_2d(z, "tsne")
    assert xy.shape == (60, 2) and np.isfinite(xy).all() and "t-SNE" in how
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="umap-learn"):
            latents.project_2d(z, "umap")


def test_projector_loads_in_tensorboard(result: dict[str, Path]) -> None:
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin
    from werkzeug import Client
    from werkzeug.wrappers import Response

    logdir = str(result["out"])
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(logdir)
    mux.Reload()
    ctx = base_plugin.TBContext(logdir=logdir, multiplexer=mux,
                                data_provider=data_provider.MultiplexerDataProvider(mux, logdir))
    apps = ProjectorPlugin(ctx).get_plugin_apps()

    def get(route: str) -> bytes:
        response = Client(apps[route.split("?")[0]], Response).get(route)
        assert response.status_code == 200, (route, response.get_data()[:200])
        return bytes(response.get_data())

    assert json.loads(get("/runs")) == ["projector"]
    info = json.loads(get("/info?run=projector"))
    (embedding,) = info["embeddings"]
    n = open_dataset(result["data"]).num_frames
    assert embedding["tensorShape"] == [n, LATENT]
    assert embedding["sprite"]["singleImageDim"] == [SIZE, SIZE]
    name = embedding["tensorName"]
    tensor = np.frombuffer(get(f"/tensor?run=projector&name={name}"), np.float32)
    assert tensor.shape == (n * LATENT,) and tensor.std() > 0
    meta = get(f"/metadata?run=projector&name={name}").decode().splitlines()
    assert meta[0].split("\t") == ["episode", "t", "reward", "state_0", "state_1", "state_2",
                                   "state_3"]
    assert len(meta) == n + 1
    sprite = iio.imread(get(f"/sprite_image?run=projector&name={name}"), extension=".png")
    assert sprite.shape[0] == math.ceil(math.sqrt(n)) * SIZE
    _not_blank(sprite)


def test_html_embeds_everything_and_shows_metrics(result: dict[str, Path]) -> None:
    out = result["out"]
    page = (out / "visualize.html").read_text()
    for name in ("reconstructions.png", "kl.png", "traversals.png", "interpolation.png",
                 "projection.png"):
        assert base64.b64encode((out / name).read_bytes()).decode() in page, name
    assert "data:video/mp4;base64," in page and 'href="episode.mp4"' in page
    assert "linear-probe R²" in page and "tensorboard --logdir" in page
    verdict = page.index('<p class="verdict')
    assert verdict < page.index("<img") and verdict < page.index("<h2>")
    assert "<details" not in page  # this run has no summary.json
    report = json.loads((out / "visualize.json").read_text())
    rep = report["representation"]  # the dataset has a state and the run has no summary.json
    assert "computed now" in report["representation_source"].lower()
    assert len(rep["probe_r2"]["per_dim"]) == 4 and math.isfinite(rep["knn_mse"])


def test_metrics_come_from_summary_json_when_present(setup: dict[str, Path],
                                                     tmp_path: Path) -> None:
    vae_run = tmp_path / "vae"
    vae_run.mkdir()
    for name in ("config.yaml", "best.pt"):
        (vae_run / name).write_bytes((setup["vae"] / name).read_bytes())
    summary = {"val": {"recon_mse": 0.01}, "warnings": ["KL per dimension is ~0"],
               "representation": {
        "probe_r2": {"per_dim": [0.9, 0.8], "mean": 0.85}, "knn_mse": 0.0123,
        "random_projection": {"probe_r2": {"per_dim": [0.1, 0.2], "mean": 0.15},
                              "knn_mse": 0.5}}}
    (vae_run / "summary.json").write_text(json.dumps(summary))
    page = visualize.run(vae_run, setup["data"], tmp_path / "out", max_frames=40)
    assert page == tmp_path / "out" / "visualize.html"
    text = page.read_text()
    assert "0.0123" in text and "0.85" in text and "val/recon_mse" in text
    assert "KL per dimension is ~0" in text  # train-vae's warnings are shown
    # the page opens with its verdict, then the pictures; the raw summary comes last, collapsed
    verdict = text.index('<p class="verdict')
    assert "probe R² 0.85 vs 0.15 for a random projection" in text
    assert verdict < text.index("<img") < text.index("<details")
    details = text[text.index("<details"):]
    assert details.startswith("<details id=run-summary><summary>Run summary (summary.json)")
    assert "val/recon_mse" in details and "val/recon_mse" not in text[:text.index("<details")]
    assert details.index("</details>") > details.index("<table>")
    assert "<img" not in details and "<section" not in details  # nothing after it
    assert "VAE run summary" not in text
    report = json.loads((tmp_path / "out" / "visualize.json").read_text())
    assert report["sample"]["frames"] <= 40
    assert report["representation"]["knn_mse"] == 0.0123


def test_verdict_says_plainly_whether_the_vae_keeps_the_state() -> None:
    good_rep = {"probe_r2": {"mean": 0.95}, "random_projection": {"probe_r2": {"mean": 0.55}}}
    summary = {"val_mse_per_pixel": 0.002, "mean_image_mse": 0.0092, "active_units": 32}
    assert visualize.verdict(summary, good_rep, {}, 32) == (
        "The VAE keeps the state: probe R² 0.95 vs 0.55 for a random projection; "
        "reconstructions 4.6x better than the mean image; 32 of 32 latent units active.", True)

    bad_rep = {"probe_r2": {"mean": -0.26}, "random_projection": {"probe_r2": {"mean": 0.1}}}
    stuck = {"val_mse_per_pixel": 0.0217, "mean_image_mse": 0.019, "active_units": 0}
    text, good = visualize.verdict(stuck, bad_rep, {}, 4)
    assert not good
    assert text.startswith("The VAE does not keep the state: probe R² -0.26 vs 0.10")
    assert "no better than the mean image (MSE/pixel 0.0217 vs 0.019)" in text
    assert "none of the 4 latent units is active" in text

    partial = {"probe_r2": 0.3, "random_projection": {"probe_r2": 0.1}}
    assert visualize.verdict(None, partial, {"active_units": 2}, 4)[0] == (
        "The VAE keeps only part of the state: probe R² 0.30 vs 0.10 for a random projection; "
        "2 of 4 latent units active.")
    text, good = visualize.verdict(None, None, {"recon_mse_per_pixel": 0.01, "active_units": 3},
                                   4)
    assert good and text.startswith("No probe of the state")


def test_bad_inputs_are_one_line_user_errors(
    setup: dict[str, Path], tmp_path: Path, make_tiny_vae: Callable[..., Path]
) -> None:
    cases = [
        (tmp_path / "missing-run", setup["data"], "not found"),
        (setup["vae"], tmp_path / "missing-data", "not found"),
        (make_tiny_vae(tmp_path / "vae32", None, "env.image_size=32"), setup["data"],
         "expects 32x32x3"),
    ]
    for vae_run, data, match in cases:
        with pytest.raises(UserError, match=match) as info:
            visualize.run(vae_run, data, tmp_path / "out")
        assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_sample_is_bounded_and_seeded(setup: dict[str, Path]) -> None:
    reader = open_dataset(setup["data"])
    a = latents.sample_frames(reader, max_frames=20, seed=1)
    b = latents.sample_frames(reader, max_frames=20, seed=1)
    assert len(a.frames) <= 20 and a.frames.shape[1:] == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(a.frames, b.frames)
    for i in range(len(a.frames)):  # every frame is where the sample says it is
        ep = reader.episode(int(a.episode[i]))
        np.testing.assert_array_equal(a.frames[i], ep.obs[a.t[i]])
        assert ep.state is not None and a.state is not None
        np.testing.assert_array_equal(a.state[i], ep.state[a.t[i]])
    assert len(np.unique(a.episode)) > 1  # spread over episodes


def test_loaded_vae_wrapper_works_without_run_folder(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config("vae.widths=[8]", "vae.latent_dim=3")
    vae = LoadedVAE(build_vae(cfg.vae, cfg.env), cfg)
    post = latents.posterior(vae, np.zeros((3, SIZE, SIZE, 3), np.uint8), batch_size=2)
    assert post.mu.shape == post.logvar.shape == (3, 3)
    np.testing.assert_allclose(post.mu, vae.encode(np.zeros((3, SIZE, SIZE, 3), np.uint8)),
                               atol=1e-6)
    with pytest.raises(UserError, match="expects"):
        latents.posterior(vae, np.zeros((3, 8, 8, 3), np.uint8))


# --------------------------------------------------------------------------------------------
# The dream (--memory)

MEMORY_TINY = [
    "env.image_size=16", "vae.widths=[8, 16]", "vae.latent_dim=4",
    "memory.hidden_size=16", "memory.mixtures=2", "memory.batch_size=2", "memory.seq_len=8",
    "memory.steps=12", "memory.val_every=4", "memory.log_every=2", "memory.lr=3e-3",
    "data.val_fraction=0.25", "memory.device=cpu",
]


@pytest.fixture(scope="module")
def dreamed(setup: dict[str, Path]) -> dict[str, Path]:
    """A tiny M trained on a copy of the session's VAE (as tests/test_memory.py does), and
    ``visualize --memory`` run through the CLI."""
    import shutil

    from worldmodel import train_memory
    from worldmodel.cli import main
    from worldmodel.config import resolve_config

    root = setup["root"] / "dream"
    vae = Path(shutil.copytree(setup["vae"], root / "vae"))
    memory = train_memory.run(resolve_config(None, MEMORY_TINY), setup["data"], vae,
                              root / "memory")
    out = root / "out"
    assert main(["-q", "visualize", str(vae), "-d", str(setup["data"]), "--out", str(out),
                 "--memory", str(memory)]) == 0
    return {**setup, "vae": vae, "memory": memory, "out": out}


def test_dream_files_video_and_error_curve(dreamed: dict[str, Path]) -> None:
    out = dreamed["out"]
    report = json.loads((out / "visualize.json").read_text())
    video_name = report["dream"]["video"]
    for name in ("dream_strip.png", "dream_error.png", video_name):
        assert (out / name).is_file() and (out / name).stat().st_size > 100, name
        assert name in report["files"]
    assert video_name in ("dream.mp4", "dream.gif")
    dream = report["dream"]
    assert dream["memory_run"] == str(dreamed["memory"])
    assert "mixture mean" in dream["prediction"]
    video = iio.imread(out / video_name, index=None)
    scale = 256 // SIZE
    side = SIZE * scale
    # real | dream: two frames side by side, twice the frame width (plus the gap)
    assert video.shape[0] == dream["episode"]["frames"] > 1
    assert video.shape[1:] == (side, math.ceil((2 * side + 8) / 16) * 16, 3)
    episode = open_dataset(dreamed["data"]).episode(dream["episode"]["index"])
    left = video[:, :side:scale, :side:scale].astype(np.float32)
    assert np.abs(left - episode.obs[: len(left)]).mean() < 12  # the real frames on the left
    err = dream["error"]
    assert err["k"] == list(range(1, len(err["k"]) + 1)) and len(err["k"]) >= 5
    assert len(err["memory"]) == len(err["copy_last_z"]) == len(err["count"]) == len(err["k"])
    assert err["count"][0] > 0 and err["episodes"] >= 1
    assert all(v is None or (math.isfinite(v) and v >= 0)
               for v in [*err["memory"], *err["copy_last_z"]])
    assert err["copy_last_z"][0] is not None and err["memory"][0] is not None
    _not_blank(iio.imread(out / "dream_strip.png"))
    _not_blank(iio.imread(out / "dream_error.png"))
    page = (out / "visualize.html").read_text()
    assert "<h2>Dream</h2>" in page and "copy-last-z" in page


def test_no_dream_section_without_memory(result: dict[str, Path]) -> None:
    report = json.loads((result["out"] / "visualize.json").read_text())
    assert "dream" not in report and not (result["out"] / "dream_strip.png").exists()
    assert "<h2>Dream</h2>" not in (result["out"] / "visualize.html").read_text()


def test_dream_open_loop_starts_from_the_encoded_first_frame(dreamed: dict[str, Path]) -> None:
    from worldmodel.dreamviz import check_memory, held_out_episodes, open_loop

    vae = load_vae(dreamed["vae"])
    reader = open_dataset(dreamed["data"])
    memory = check_memory(dreamed["memory"], vae, dreamed["vae"])
    held = held_out_episodes(memory, reader)
    roll = open_loop(vae, memory, reader, held[0], max_steps=10)
    assert roll.real.shape == roll.dream.shape and len(roll.real) <= 10
    np.testing.assert_allclose(roll.z_dream[0], roll.z_real[0])
    np.testing.assert_allclose(roll.z_real, vae.encode(roll.real), atol=1e-5)
    assert not np.allclose(roll.z_dream[1:], roll.z_real[1:])  # open loop, not the real z


def test_dream_refuses_other_vae_and_non_memory_runs(dreamed: dict[str, Path],
                                                     tmp_path: Path) -> None:
    import shutil

    from worldmodel.vae import load_checkpoint, save_checkpoint

    other = Path(shutil.copytree(dreamed["memory"], tmp_path / "other-memory"))
    for name in ("best.pt", "last.pt"):
        if (other / name).is_file():
            state = load_checkpoint(other / name)
            save_checkpoint(other / name, {**state, "vae_hash": "0" * 64})
    cases = [(other, "trained on other VAE weights"), (dreamed["vae"], "--memory")]
    for memory, match in cases:
        with pytest.raises(UserError, match=match) as info:
            visualize.run(dreamed["vae"], dreamed["data"], tmp_path / "out", memory=memory)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
