"""Frames to image and video files: PNG bytes and the one video writer (MP4, GIF fallback).

Used by ``worldmodel visualize`` (its episode video and pictures), ``worldmodel explore``
(decoded frames as PNG) and ``worldmodel evaluate`` (an agent's episode video).

Example:
    >>> import numpy as np
    >>> png_bytes(np.zeros((4, 4, 3), np.uint8))[1:4]
    b'PNG'
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from worldmodel.io import atomic_write

log = logging.getLogger("worldmodel")

__all__ = ["ffmpeg_available", "png_bytes", "write_video"]


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of an ``(H, W, C)`` uint8 image (``C`` 1, 3 or 4)."""
    import imageio.v3 as iio

    img = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    return bytes(iio.imwrite("<bytes>", img, extension=".png"))


def ffmpeg_available() -> bool:
    """Whether imageio can find an ffmpeg executable (``imageio-ffmpeg`` ships one)."""
    try:
        import imageio_ffmpeg

        return bool(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError, OSError):
        return False


def write_video(stem: Path, frames: np.ndarray, fps: float = 15) -> Path:
    """Write frames as ``stem.mp4`` (H.264), or ``stem.gif`` when ffmpeg is missing.

    The file is written atomically (temporary file, then rename): a reader never sees half a
    video, and an existing file is replaced.

    :param stem: output path without suffix (its folder is created when missing).
    :param frames: ``(T, H, W, 3)`` uint8, ``H`` and ``W`` even for the MP4 (H.264 stores
        colour at half resolution); frames are not resized to macro blocks.
    :param fps: frames per second.
    :return: the file written.
    """
    import imageio.v3 as iio

    stem = Path(stem)
    if ffmpeg_available():
        path = stem.with_suffix(".mp4")
        data = iio.imwrite("<bytes>", frames, extension=".mp4", fps=fps, codec="libx264",
                           macro_block_size=1, ffmpeg_log_level="error")
    else:
        log.warning("ffmpeg is not available (pip install imageio-ffmpeg); writing %s as a GIF "
                    "instead of an MP4", stem.name)
        path = stem.with_suffix(".gif")
        data = iio.imwrite("<bytes>", frames, extension=".gif", duration=1000 / fps, loop=0)
    atomic_write(path, lambda f: f.write(bytes(data)))
    return path
