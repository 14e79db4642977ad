"""``worldmodel visualize``: pictures of what a trained VAE keeps and loses.

``run(VAE_RUN, DATA, OUT)`` samples a bounded number of frames from the dataset (whole
episodes drawn in a seeded order, at most ``max_frames`` frames), encodes them, and writes into
``OUT`` (every file atomically):

``reconstructions.png``
    originals (upper row of each pair) over their reconstructions (lower row).
``episode.mp4`` (``episode.gif`` when ffmpeg is missing)
    one episode, original | reconstruction side by side, upscaled (nearest) for viewing.
``kl.png``
    the KL of each latent dimension (mean over the sample), sorted; dimensions near 0 nats are
    unused ("inactive") by the decoder.
``traversals.png``
    rows = latent dimensions sorted by KL (most informative first, at most ``max_dims``),
    columns = ``z_d = mu_d(frame) + k * std_d`` for ``k`` in ``-3 .. +3``, where ``std_d`` is
    the standard deviation of ``mu_d`` over the sample and the other dimensions stay at the
    real frame's ``mu``.
``interpolation.png``
    frame A, decodings of ``(1 - a) * mu_A + a * mu_B`` for ``a`` in ``[0, 1]``, frame B.
``projection.png``
    a 2-D projection of the latent means (PCA, t-SNE or UMAP), one panel per colouring:
    reward, time step within the episode, and each true-state component when the dataset has
    a state.
``projector/``
    a TensorBoard embedding-projector run (latents, sprite of the frames, metadata TSV):
    ``tensorboard --logdir OUT`` shows it under the PROJECTOR tab.
``visualize.json``
    the numbers: sample size, KL per dimension, reconstruction error, representation metrics.
``visualize.html``
    one page with all of the above (images embedded as data URIs) and the VAE run's metrics.

With a memory run (``memory=MEMORY_RUN``, ``--memory``), trained on this VAE's weights, the
"Dream" section adds (:mod:`worldmodel.dreamviz` computes them; M feeds back its mixture mean):

``dream.mp4`` (``dream.gif`` when ffmpeg is missing)
    one held-out episode, real (left) | dream (right): M runs open loop from the encoded first
    frame with the recorded actions, each predicted ``z`` decoded by the VAE.
``dream_strip.png``
    every ``k``-th step of that episode, real over dream.
``dream_error.png``
    the ``k``-step open-loop latent MSE of M against copy-last-z on held-out episodes (the
    numbers are in ``visualize.json`` under ``dream.error``).

The latent computations (sampling, posteriors, traversals, projections) are in
:mod:`worldmodel.latents`, shared with ``worldmodel explore``; PNG and video encoding in
:mod:`worldmodel.media`. This module draws the pictures and writes the page.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from worldmodel.errors import UserError
from worldmodel.io import atomic_write, atomic_write_json, atomic_write_text, read_json
from worldmodel.latents import (
    Method,
    Posterior,
    Sample,
    checkpoint_name,
    held_out_representation,
    interpolate,
    kl_per_dim,
    latent_traversals,
    load_inputs,
    posterior,
    project_2d,
    sample_frames,
)
from worldmodel.media import png_bytes, write_video
from worldmodel.metrics import ACTIVE_KL_NATS
from worldmodel.runfolder import RunFolder, require_kind
from worldmodel.stages import StageSpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from worldmodel.dataset import DatasetReader
    from worldmodel.vae import LoadedVAE

log = logging.getLogger("worldmodel")

__all__ = [
    "export_projector",
    "labeled_grid_png",
    "run",
    "side_by_side",
]

#: Sample frames that are also decoded (reconstruction grid and error).
RECON_FRAMES = 512
#: Grey used between tiles.
PAD_VALUE = 128
#: A sprite larger than this (pixels per side) is not shown by TensorBoard's projector.
SPRITE_MAX_PX = 8192
#: Video and HTML files up to this size are embedded into visualize.html as data URIs.
EMBED_MAX_BYTES = 12 * 2**20


# --------------------------------------------------------------------------------------------
# Images


def _rgb(images: np.ndarray) -> np.ndarray:
    """``(..., H, W, 1 or 3)`` uint8 -> ``(..., H, W, 3)``."""
    return np.repeat(images, 3, -1) if images.shape[-1] == 1 else images


def _upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of ``(..., H, W, C)`` by an integer factor."""
    if scale == 1:
        return image
    return image.repeat(scale, -3).repeat(scale, -2)


def _tile(grid: np.ndarray, pad: int = 2) -> np.ndarray:
    """Tile ``(R, K, H, W, C)`` images into one ``(R*(H+pad)+pad, K*(W+pad)+pad, C)`` image."""
    rows, cols, h, w, c = grid.shape
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), PAD_VALUE, np.uint8)
    for r in range(rows):
        for k in range(cols):
            y, x = pad + r * (h + pad), pad + k * (w + pad)
            out[y : y + h, x : x + w] = grid[r, k]
    return out


def _display_scale(size: int, target: int = 64) -> int:
    """Integer factor that brings an image side up to about ``target`` pixels."""
    return max(1, round(target / size))


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def _figure(width_px: int, height_px: int, dpi: int = 100) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _figure_png(fig: Figure) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


def labeled_grid_png(
    grid: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    scale: int = 1,
) -> bytes:
    """A tiled image grid with row labels on the left and column labels on top, as PNG.

    The tiles are drawn pixel for pixel (upscaled by ``scale``, nearest), with margins for text.

    :param grid: ``(R, K, H, W, C)`` uint8 images.
    """
    rows, cols = grid.shape[:2]
    image = _tile(_upscale(_rgb(grid), scale))
    label_w = 8 * max((len(s) for s in row_labels), default=0) + 16
    top = 48 if col_labels else 28
    width, height = image.shape[1] + label_w + 8, image.shape[0] + top + 8
    fig = _figure(width, height)
    ax = fig.add_axes((label_w / width, 8 / height, image.shape[1] / width,
                       image.shape[0] / height))
    ax.imshow(image, interpolation="nearest", aspect="auto")
    cell_h, cell_w = (image.shape[0] - 2) / rows, (image.shape[1] - 2) / cols
    ax.set_yticks([1 + cell_h * (r + 0.5) for r in range(rows)], list(row_labels), fontsize=8)
    ax.set_xticks([1 + cell_w * (k + 0.5) for k in range(cols)], list(col_labels), fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(title, fontsize=9, y=1 - 4 / height, va="top")
    return _figure_png(fig)


def _kl_png(kl: np.ndarray) -> bytes:
    order = np.argsort(-kl)
    fig = _figure(max(360, 14 * len(kl) + 120), 260)
    ax = fig.add_subplot()
    ax.bar(range(len(kl)), kl[order], color="tab:blue")
    ax.set_xticks(range(len(kl)), [str(d) for d in order], fontsize=6, rotation=90)
    ax.set_xlabel("latent dimension (sorted by KL)")
    ax.set_ylabel("mean KL (nats)")
    ax.set_title(f"KL per dimension, total {kl.sum():.2f} nats", fontsize=9)
    fig.tight_layout()
    return _figure_png(fig)


def _projection_png(xy: np.ndarray, colours: dict[str, np.ndarray], title: str) -> bytes:
    n = len(colours)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _figure(360 * cols, 320 * rows + 30)
    size = float(np.clip(6000 / max(len(xy), 1), 4, 30))
    for i, (name, values) in enumerate(colours.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        points = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=size, cmap="viridis",
                            linewidths=0)
        fig.colorbar(points, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(f"coloured by {name}", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _figure_png(fig)


# --------------------------------------------------------------------------------------------
# Video


def side_by_side(left: np.ndarray, right: np.ndarray, scale: int, gap: int = 8,
                 block: int = 16) -> np.ndarray:
    """Frames ``left | right``, upscaled and padded so both sides are multiples of ``block``.

    :param left: ``(T, H, W, C)`` uint8; :param right: same shape.
    :return: ``(T, H', W', 3)`` uint8.
    """
    t, h, w, _ = left.shape
    hs, ws = h * scale, w * scale
    height = math.ceil(hs / block) * block
    width = math.ceil((2 * ws + gap) / block) * block
    out = np.full((t, height, width, 3), PAD_VALUE, np.uint8)
    out[:, :hs, :ws] = _upscale(_rgb(left), scale)
    out[:, :hs, ws + gap : 2 * ws + gap] = _upscale(_rgb(right), scale)
    return out


# --------------------------------------------------------------------------------------------
# TensorBoard projector


def export_projector(
    folder: Path,
    latents: np.ndarray,
    images: np.ndarray,
    metadata: dict[str, np.ndarray],
    tag: str = "vae_latents",
) -> Path:
    """Write a TensorBoard embedding-projector run into ``folder`` (replaced as a whole).

    The run is written by ``SummaryWriter.add_embedding`` into a temporary sibling folder that
    is then renamed over ``folder``, so readers never see a half-written projector.

    :param latents: ``(N, Z)`` float32 points.
    :param images: ``(N, H, W, C)`` uint8 thumbnails (the sprite).
    :param metadata: column name -> ``(N,)`` values, written as ``metadata.tsv``.
    :return: ``folder``.
    """
    import torch
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        writer = SummaryWriter(log_dir=str(tmp))
        label_img = torch.from_numpy(np.ascontiguousarray(_rgb(images))).permute(0, 3, 1, 2)
        header = list(metadata)
        rows = [[_fmt_meta(metadata[k][i]) for k in header] for i in range(len(latents))]
        writer.add_embedding(torch.from_numpy(np.asarray(latents, np.float32)),
                             metadata=rows, metadata_header=header,
                             label_img=label_img.float() / 255.0, tag=tag, global_step=0)
        writer.close()
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the files inside follow the umask
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _fmt_meta(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{float(value):.4g}"
    return str(value)


# --------------------------------------------------------------------------------------------
# Metrics


def _find_representation(summary: Any) -> dict[str, Any] | None:
    """The first dict (depth <= 2) of ``summary`` holding ``probe_r2`` (metrics' format)."""
    if not isinstance(summary, dict):
        return None
    if "probe_r2" in summary:
        return summary
    for value in summary.values():
        if isinstance(value, dict) and "probe_r2" in value:
            return value
    return None


def _flatten(data: Any) -> dict[str, Any]:
    """Scalar leaves (and short numeric lists) of a summary as ``a/b/c`` keys, for its table."""
    from worldmodel.config import flatten_dotted

    def shown(value: Any) -> bool:
        if isinstance(value, str | int | float | bool) or value is None:
            return True
        return isinstance(value, list) and len(value) <= 8 and all(
            isinstance(v, int | float) for v in value)

    flat = flatten_dotted(data) if isinstance(data, dict) else {"": data}
    return {k.replace(".", "/"): v for k, v in flat.items() if shown(v)}


# --------------------------------------------------------------------------------------------
# HTML

def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _table(rows: dict[str, Any]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in rows.items())
    return f"<table>{body}</table>"


def _representation_html(rep: dict[str, Any] | None, source: str) -> str:
    if rep is None:
        return ("<p>No representation metrics: the dataset has no true state, or the VAE run "
                "has none recorded.</p>")
    base = rep.get("random_projection") or {}
    rows = ["<tr><th></th><th>VAE latents</th><th>random projection of pixels</th></tr>"]
    for key, label in (("probe_r2", "linear-probe R² (mean, held-out episodes; higher is "
                                    "better)"),
                       ("knn_mse", "KNN-MSE of the true state (lower is better)")):
        ours, theirs = rep.get(key), base.get(key)
        if isinstance(ours, dict):
            ours, theirs = ours.get("mean"), (theirs or {}).get("mean")
        rows.append(f"<tr><th>{html.escape(label)}</th><td>{_fmt(ours)}</td>"
                    f"<td>{_fmt(theirs)}</td></tr>")
    per_dim = (rep.get("probe_r2") or {}).get("per_dim")
    if per_dim:
        rows.append(f"<tr><th>R² per state component</th><td colspan=2>{_fmt(per_dim)}</td></tr>")
    return f"<p>{html.escape(source)}</p><table>{''.join(rows)}</table>"


def _section(title: str, body: str, note: str = "") -> str:
    note_html = f"<p class=note>{note}</p>" if note else ""
    return f"<section><h2>{html.escape(title)}</h2>{note_html}{body}</section>"


def _img(data: bytes, alt: str, pixelated: bool = False) -> str:
    cls = " class=pixelated" if pixelated else ""
    return f'<img{cls} alt="{html.escape(alt)}" src="{_data_uri(data, "image/png")}">'


def _video_html(path: Path) -> str:
    size = path.stat().st_size
    mime = "video/mp4" if path.suffix == ".mp4" else "image/gif"
    src = (_data_uri(path.read_bytes(), mime) if size <= EMBED_MAX_BYTES
           else html.escape(path.name))
    if path.suffix == ".gif":
        return f'<img alt="episode" src="{src}">'
    return (f'<video controls autoplay loop muted playsinline src="{src}"></video>'
            f'<p class=note>File: <a href="{html.escape(path.name)}">{path.name}</a></p>')


# --------------------------------------------------------------------------------------------
# The stage


class _Step:
    """Numbered progress lines: ``visualize [3/9] latent traversals (1.2 s)``."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.start = total, 0, time.monotonic()

    def __call__(self, what: str) -> None:
        self.n += 1
        log.info("visualize [%d/%d] %s (%.1f s)", self.n, self.total, what,
                 time.monotonic() - self.start)


class _Encoded(NamedTuple):
    """The sample and what the VAE makes of it."""

    sample: Sample
    post: Posterior
    shown: np.ndarray  # (M,) indices of the sample frames that are reconstructed (M <= 512)
    recon: np.ndarray  # (M, H, W, C) uint8, decoded posterior means of those frames
    kl: np.ndarray  # (Z,) mean KL per dimension
    std: np.ndarray  # (Z,) std of mu over the sample


def _colours(sample: Sample, max_state: int = 6) -> dict[str, np.ndarray]:
    colours = {"reward": sample.reward, "time step": sample.t.astype(np.float32)}
    if sample.state is not None:
        for j in range(min(sample.state.shape[1], max_state)):
            colours[f"state[{j}]"] = sample.state[:, j]
    return colours


def _projector_subset(n: int, h: int, seed: int) -> np.ndarray:
    """Indices of at most as many points as fit a sprite of :data:`SPRITE_MAX_PX`."""
    per_side = max(1, SPRITE_MAX_PX // h)
    limit = per_side * per_side
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def _reconstruction_grid(enc: _Encoded, pick: np.ndarray, scale: int) -> bytes:
    """Rows of up to 8 originals, each over its reconstructions.

    :param pick: positions in ``enc.shown`` / ``enc.recon``.
    """
    cols = min(8, len(pick))
    rows = []
    for lo in range(0, len(pick) - cols + 1, cols):
        chunk = pick[lo : lo + cols]
        rows += [enc.sample.frames[enc.shown[chunk]], enc.recon[chunk]]
    return png_bytes(_tile(_upscale(_rgb(np.stack(rows)), scale)))


def _traversal_png(vae: LoadedVAE, enc: _Encoded, centre: int, max_dims: int,
                   scale: int) -> bytes:
    order = [int(d) for d in np.argsort(-enc.kl, kind="stable")[:max_dims]]
    grid = latent_traversals(vae, enc.post.mu[centre], enc.std, order)
    offsets = np.linspace(-3, 3, grid.shape[1])
    shown = f"top {len(order)} of {len(enc.kl)}" if len(order) < len(enc.kl) else "all"
    return labeled_grid_png(
        grid,
        [f"z{d}  KL {enc.kl[d]:.2f}" for d in order],
        [f"{k:+.0f}σ" for k in offsets],
        f"traversals ({shown} dims, by KL)",
        scale,
    )


def _interpolation_png(vae: LoadedVAE, enc: _Encoded, a: int, rng: np.random.Generator,
                       scale: int) -> tuple[bytes, int]:
    """Interpolate from frame ``a`` to the farthest (in latent space) of 64 random frames."""
    mu, frames = enc.post.mu, enc.sample.frames
    candidates = rng.choice(len(frames), min(64, len(frames)), replace=False)
    b = int(candidates[np.argmax(np.linalg.norm(mu[candidates] - mu[a], axis=1))])
    line = interpolate(vae, mu[a], mu[b], steps=8)
    strip = np.concatenate([frames[[a]], line, frames[[b]]])[None]
    labels = ["A", *(f"{x:.2f}" for x in np.linspace(0, 1, 8)), "B"]
    return labeled_grid_png(strip, [""], labels, "A -> B in latent space", scale), b


def _export_sample_projector(out: Path, enc: _Encoded, image_size: int, seed: int) -> Path:
    sample = enc.sample
    subset = _projector_subset(len(sample.frames), image_size, seed)
    meta: dict[str, np.ndarray] = {
        "episode": sample.episode[subset], "t": sample.t[subset], "reward": sample.reward[subset],
    }
    if sample.state is not None:
        for j in range(sample.state.shape[1]):
            meta[f"state_{j}"] = sample.state[subset, j]
    return export_projector(out, enc.post.mu[subset], sample.frames[subset], meta)


def _metrics(vae_run: Path, vae: LoadedVAE, reader: DatasetReader, max_frames: int,
             seed: int) -> tuple[Any, dict[str, Any] | None, str]:
    """``summary.json`` of the run, the representation metrics, and where they came from."""
    path = vae_run / "summary.json"
    summary = None
    if path.is_file():
        try:
            summary = read_json(path)
        except (OSError, ValueError) as e:
            log.warning("visualize: %s is unreadable (%s); ignoring it", path, e)
    rep = _find_representation(summary)
    if rep is not None:
        return summary, rep, (f"From {path} (train-vae's final model; the pictures below use "
                              f"{checkpoint_name(vae_run)}).")
    if reader.has_state:
        rep = held_out_representation(vae, reader, max_frames, seed)
        if rep is not None:
            return summary, rep, ("Computed now on held-out episodes of the dataset "
                                  "(worldmodel.metrics: 20% of the episodes held out).")
    return summary, None, ""


def _sample_stats(enc: _Encoded) -> dict[str, Any]:
    frames = enc.sample.frames[enc.shown].astype(np.float32) / 255.0
    mse = float(np.mean((frames - enc.recon.astype(np.float32) / 255.0) ** 2))
    return {
        "frames": len(enc.sample.frames),
        "episodes": len(np.unique(enc.sample.episode)),
        "recon_mse_per_pixel": mse,
        "recon_frames": len(frames),
        "kl_total": float(enc.kl.sum()),
        "active_units": int((enc.kl > ACTIVE_KL_NATS).sum()),
        "dims_with_var_mu_above_0.01": int((enc.post.mu.var(0) > 0.01).sum()),
    }


def _mean_r2(value: Any) -> float | None:
    """A probe R² as ``metrics`` records it (``{"mean": ...}`` or a number), or ``None``."""
    if isinstance(value, dict):
        value = value.get("mean")
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def verdict(summary: Any, rep: dict[str, Any] | None, stats: Mapping[str, Any],
            latent_dim: int) -> tuple[str, bool]:
    """One plain sentence on the VAE, and whether it is good news.

    It puts the linear-probe R² of the latents against a random projection of the pixels, the
    reconstruction error against predicting the dataset's mean image (both from train-vae's
    ``summary.json`` when it has them) and the active latent units side by side.
    """
    from worldmodel.train_vae import MEAN_IMAGE_RATIO

    info = summary if isinstance(summary, dict) else {}
    clauses: list[str] = []
    good = True
    ours = _mean_r2((rep or {}).get("probe_r2"))
    base = _mean_r2(((rep or {}).get("random_projection") or {}).get("probe_r2"))
    if ours is None:
        lead = "No probe of the state (the dataset records no true state)"
    else:
        than = f" vs {base:.2f} for a random projection" if base is not None else ""
        if ours >= 0.5 and (base is None or ours > base):
            lead = f"The VAE keeps the state: probe R² {ours:.2f}{than}"
        elif ours > 0 and (base is None or ours > base):
            lead, good = f"The VAE keeps only part of the state: probe R² {ours:.2f}{than}", False
        else:
            lead, good = f"The VAE does not keep the state: probe R² {ours:.2f}{than}", False
    mse, mean_mse = info.get("val_mse_per_pixel"), info.get("mean_image_mse")
    if isinstance(mse, int | float) and isinstance(mean_mse, int | float) and mse > 0:
        if mse <= MEAN_IMAGE_RATIO * mean_mse:
            clauses.append(f"reconstructions {mean_mse / mse:.1f}x better than the mean image")
        else:
            good = False
            clauses.append(f"reconstructions no better than the mean image (MSE/pixel "
                           f"{mse:.3g} vs {mean_mse:.3g}): small objects are probably lost")
    elif isinstance(stats.get("recon_mse_per_pixel"), int | float):
        clauses.append(f"reconstruction MSE/pixel {stats['recon_mse_per_pixel']:.3g} on the "
                       "sample (no mean-image reference recorded)")
    active = info.get("active_units", stats.get("active_units"))
    if isinstance(active, int):
        if active == 0:
            good = False
            clauses.append(f"none of the {latent_dim} latent units is active (posterior "
                           "collapse: the latents carry nothing)")
        else:
            clauses.append(f"{active} of {latent_dim} latent units active")
    return "; ".join([lead, *clauses]) + ".", good


def _page(report: dict[str, Any], files: dict[str, bytes], video: Path, summary: Any,
          out: Path, dream_video: Path | None = None) -> str:
    """The HTML of ``visualize.html``: verdict, warnings, pictures, numbers, raw summary."""
    rep, stats = report["representation"], report["sample"]
    vae_run, data = html.escape(report["vae_run"]), html.escape(report["data"])
    text, good = verdict(summary, rep, stats, int(report["run"]["latent_dim"]))
    parts = [f'<p class="verdict{"" if good else " warn"}"><strong>{html.escape(text)}'
             "</strong></p>"]
    warnings = summary.get("warnings") if isinstance(summary, dict) else None
    if warnings:
        items = "".join(f"<li>{html.escape(str(w))}</li>" for w in warnings)
        parts.append(_section("Warnings from train-vae", f"<ul class=warn>{items}</ul>"))
    parts += [
        _section("Reconstructions", _img(files["reconstructions.png"], "grid", True),
                 "Each pair of rows: originals over their reconstructions."),
        _section(f"Episode {report['episode']['index']}: original | reconstruction",
                 _video_html(video)),
        _section("KL per latent dimension", _img(files["kl.png"], "kl"),
                 "Mean KL over the sample; dimensions near 0 nats carry no information."),
        _section("Latent traversals", _img(files["traversals.png"], "traversals"),
                 f"Each row sweeps one latent dimension over mu ± 3 std (std of that "
                 f"dimension's mu over the sample) around frame {report['traversal_frame']}; "
                 "the other dimensions keep that frame's mu. Rows that do not change are "
                 "dimensions the decoder ignores."),
        _section("Interpolation", _img(files["interpolation.png"], "interpolation"),
                 "Frame A, the decodings of (1 - a) mu_A + a mu_B, frame B."),
        _section("2-D projection", _img(files["projection.png"], "projection"),
                 html.escape(report["projection"])),
        *([_dream_section(report["dream"], files, dream_video)]
          if dream_video is not None and "dream" in report else []),
        _section("Representation metrics",
                 _representation_html(rep, report["representation_source"] or "")),
        _section(f"On the sample ({stats['frames']} frames)", _table(stats),
                 f"active_units: latent dimensions whose mean KL exceeds {ACTIVE_KL_NATS} "
                 "nats (as in train-vae); dims_with_var_mu_above_0.01: those whose posterior "
                 "mean varies over the sample (Burda et al.'s activity)."),
        _section("Run", _table(report["run"])),
        _section("Interactive",
                 f"<pre>tensorboard --logdir {html.escape(str(out))}</pre><p>shows these "
                 "latents with their frames and metadata in the PROJECTOR tab, and</p>"
                 f"<pre>worldmodel explore {vae_run} --data {data}</pre>"
                 "<p>decodes latents live in the browser.</p>"),
    ]
    if summary is not None:
        parts.append("<details id=run-summary><summary>Run summary (summary.json)</summary>"
                     f"{_table(_flatten(summary))}</details>")
    template = Template(_static_text("visualize.html"))
    env = report.get("run", {}).get("env") or "a dataset"
    title = f"VAE run {Path(report['vae_run']).name} on {env}"
    return template.substitute(title=html.escape(title),
                               content="\n".join(parts))


def _dream_section(dream: dict[str, Any], files: dict[str, bytes], video: Path) -> str:
    err = dream["error"]
    rows = "".join(
        f"<tr><td>{k}</td><td>{_fmt(m)}</td><td>{_fmt(c)}</td><td>{n}</td></tr>"
        for k, m, c, n in zip(err["k"], err["memory"], err["copy_last_z"], err["count"],
                              strict=True))
    table = ("<table><tr><th>k</th><th>M open loop</th><th>copy-last-z</th><th>starts</th>"
             f"</tr>{rows}</table>")
    body = (f"{_video_html(video)}{_img(files['dream_strip.png'], 'dream strip')}"
            f"{_img(files['dream_error.png'], 'dream error')}"
            "<details><summary>k-step open-loop latent MSE</summary>"
            f"{table}</details>")
    note = (f"Memory run {html.escape(dream['memory_run'])}. Episode {dream['episode']['index']}"
            " (held out from M's training): real (left) | dream (right). M starts from the "
            "encoded first frame and runs open loop with the recorded actions, feeding back "
            f"its own prediction ({html.escape(dream['prediction'])}); each z is decoded by "
            f"the VAE. The strip shows every {dream['strip_every']}th step, real over dream. "
            f"The curve: MSE per latent dimension of M's k-step open-loop z against the "
            f"encoded real z, from starts every {err['stride']} steps of "
            f"{err['episodes']} held-out episode(s), beside copy-last-z.")
    return _section("Dream", body, note)


def _dream_error_png(err: dict[str, Any]) -> bytes:
    fig = _figure(480, 300)
    ax = fig.add_subplot()
    for key, label in (("memory", "M open loop (mixture mean)"),
                       ("copy_last_z", "copy-last-z")):
        ks = [k for k, v in zip(err["k"], err[key], strict=True) if v is not None]
        vs = [v for v in err[key] if v is not None]
        ax.plot(ks, vs, marker="o", markersize=3, label=label)
    ax.set_xlabel("k (steps open loop)")
    ax.set_ylabel("latent MSE per dimension")
    ax.set_title("k-step open-loop latent error (held-out episodes)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _figure_png(fig)


def _dream(vae: LoadedVAE, memory: Any, memory_run: Path, reader: DatasetReader, out: Path,
           scale: int, fps: int) -> tuple[dict[str, Any], dict[str, bytes], Path]:
    """The dream's numbers, its pictures and its video (see the module docstring)."""
    from worldmodel.dreamviz import PREDICTION, error_curve, held_out_episodes, open_loop

    held = held_out_episodes(memory, reader)
    roll = open_loop(vae, memory, reader, held[0])
    video = write_video(out / "dream", side_by_side(
        roll.real, roll.dream, max(1, 256 // vae.image_shape[0])), fps)
    n = len(roll.real)
    every = max(1, math.ceil(n / 12))
    ts = list(range(0, n, every))
    strip = labeled_grid_png(np.stack([roll.real[ts], roll.dream[ts]]), ["real", "dream"],
                             [f"t={t}" for t in ts], "real over dream (M open loop)", scale)
    err = error_curve(vae, memory, reader, held[:8])
    files = {"dream_strip.png": strip, "dream_error.png": _dream_error_png(err)}
    dream = {
        "memory_run": str(memory_run), "prediction": PREDICTION,
        "episode": {"index": held[0], "id": reader.episode_ids[held[0]], "frames": n},
        "strip_every": every, "video": video.name,
        "open_loop_mse_episode": float(np.mean((roll.z_dream - roll.z_real) ** 2)),
        "error": err,
    }
    return dream, files, video


def _static_text(name: str) -> str:
    """A file shipped in ``worldmodel/static``."""
    from importlib.resources import files

    return files("worldmodel").joinpath("static", name).read_text(encoding="utf-8")


def run(
    vae_run: Path,
    data: Path,
    out: Path,
    *,
    max_frames: int = 2000,
    method: Method = "pca",
    seed: int = 0,
    max_dims: int = 32,
    fps: int = 15,
    memory: Path | None = None,
) -> Path:
    """Write the visualizations of a VAE run on a dataset into ``out``.

    :param vae_run: a ``worldmodel train-vae`` run folder.
    :param data: a dataset whose frames have the VAE's shape.
    :param out: the output folder (created when missing; files in it are replaced).
    :param max_frames: frames sampled from the dataset for everything but the video.
    :param method: 2-D projection: ``pca``, ``tsne`` or ``umap``.
    :param seed: which frames are sampled and shown.
    :param max_dims: latent dimensions shown in the traversal grid (highest KL first).
    :param fps: frame rate of the episode video.
    :param memory: a ``train-memory`` run trained on ``vae_run``'s weights: adds the dream
        video, strip and open-loop error curve.
    :return: the path of ``visualize.html`` in ``out``.
    :raise UserError: ``vae_run`` is not a VAE run, ``out`` holds another kind of run or is
        being written by another process, the data does not fit, ``memory`` is not a memory
        run or was trained on other VAE weights.
    """
    vae_run, out = require_kind(Path(vae_run), "vae", "VAE run"), Path(out)
    if memory is not None:
        memory = require_kind(Path(memory), "memory", "--memory")
    if max_frames < 2:
        raise UserError(f"max_frames must be at least 2, got {max_frames}")
    with RunFolder.open(out, STAGE.kind) as folder:
        page = _write(vae_run, data, out, max_frames, method, seed, max_dims, fps, memory)
        folder.finish()
    return page


def _write(vae_run: Path, data: Path, out: Path, max_frames: int, method: Method, seed: int,
           max_dims: int, fps: int, memory_run: Path | None = None) -> Path:
    if max_frames < 2:
        raise UserError(f"max_frames must be at least 2, got {max_frames}")
    step = _Step(9 if memory_run is None else 10)
    vae, reader = load_inputs(vae_run, Path(data))
    assert reader is not None
    memory = None
    if memory_run is not None:
        from worldmodel.dreamviz import check_memory

        memory = check_memory(memory_run, vae, vae_run)
    step(f"sampling up to {max_frames} of {reader.num_frames} frames from {data}")
    sample = sample_frames(reader, max_frames, seed)
    if len(sample.frames) < 2:
        raise UserError(f"{data} holds {len(sample.frames)} frame(s); visualize needs at "
                        "least 2 (collect more episodes)")
    step(f"encoding {len(sample.frames)} frames")
    post = posterior(vae, sample.frames)
    rng = np.random.default_rng(seed)
    n = len(sample.frames)
    shown = np.sort(rng.choice(n, min(n, RECON_FRAMES), replace=False))
    enc = _Encoded(sample, post, shown, vae.decode(post.mu[shown]),
                   kl_per_dim(post.mu, post.logvar), post.mu.std(0))
    scale = _display_scale(vae.image_shape[0])
    pick = np.sort(rng.choice(len(shown), min(16, len(shown)), replace=False))
    centre = int(shown[pick[0]])
    files: dict[str, bytes] = {}

    step("reconstruction grid")
    files["reconstructions.png"] = _reconstruction_grid(enc, pick, scale)
    step("episode video")
    ep_index = int(sample.episode[0])
    obs = reader.episode(ep_index).obs[:1000]
    video = write_video(out / "episode", side_by_side(
        obs, vae.reconstruct(obs), max(1, 256 // vae.image_shape[0])), fps)
    step("KL per dimension and latent traversals")
    files["kl.png"] = _kl_png(enc.kl)
    files["traversals.png"] = _traversal_png(vae, enc, centre, max_dims, scale)
    step("interpolation")
    files["interpolation.png"], other = _interpolation_png(vae, enc, centre, rng, scale)
    step(f"2-D projection ({method})")
    xy, how = project_2d(post.mu, method, seed)
    files["projection.png"] = _projection_png(xy, _colours(sample), f"latent means: {how}")
    for name, content in files.items():
        _write_bytes(out / name, content)
    step("TensorBoard projector")
    _export_sample_projector(out / "projector", enc, vae.image_shape[0], seed)
    step("representation metrics and report")
    summary, rep, source = _metrics(vae_run, vae, reader, max_frames, seed)
    dream: dict[str, Any] | None = None
    dream_video: Path | None = None
    if memory is not None and memory_run is not None:
        step("the dream: M open loop beside the real episode, k-step latent error")
        dream, dream_files, dream_video = _dream(vae, memory, memory_run, reader, out, scale,
                                                 fps)
        for name, content in dream_files.items():
            _write_bytes(out / name, content)
        files.update(dream_files)

    def where(i: int) -> str:
        return f"(episode {sample.episode[i]}, t={sample.t[i]})"

    extra = [dream_video.name] if dream_video is not None else []
    files_out = sorted([*files, video.name, *extra, "projector/", "visualize.html",
                        "visualize.json"])
    report: dict[str, Any] = {
        "vae_run": str(vae_run), "data": str(data), "weights_hash": vae.weights_hash,
        "run": {"VAE run": str(vae_run), "checkpoint": checkpoint_name(vae_run),
                "weights (sha256)": vae.weights_hash[:16],
                "dataset": str(data), "env": reader.manifest.get("env_id"),
                "frames": "x".join(map(str, vae.image_shape)), "latent_dim": vae.latent_dim},
        "sample": _sample_stats(enc), "kl_per_dim": [float(v) for v in enc.kl],
        "projection": how, "video": video.name,
        "episode": {"index": ep_index, "frames": len(obs)},
        "traversal_frame": where(centre), "interpolation": [where(centre), where(other)],
        "representation": rep, "representation_source": source or None,
        "files": files_out,
    }
    if dream is not None:
        report["dream"] = dream
    atomic_write_json(out / "visualize.json", report)
    atomic_write_text(out / "visualize.html", _page(report, files, video, summary, out,
                                                       dream_video))
    log.info("visualize: wrote %d files to %s", len(files_out), out)
    return out / "visualize.html"


def _run_stage(cfg: Any, out: Path, inputs: Mapping[str, Any], resume: bool | None) -> Path:
    run(inputs["train-vae"], inputs["collect"], out)
    return out


#: ``visualize`` reads no setting of its own: its pictures follow from the VAE run and dataset.
STAGE = StageSpec(
    "visualize", "visualize",
    reads=(),
    needs=("train-vae", "collect"),
    run=_run_stage,
    folder="visualize",
    switch="pipeline.visualize",
)
