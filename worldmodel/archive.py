"""``worldmodel archive SRC -o DEST``: the small files of finished runs, kept for a repository.

A long experiment (hours of CPU) outlives the machine it ran on only in what is committed. This
copies, from every finished run at or under ``SRC`` (a run folder, or a pipeline folder holding
many), the small text files that describe it and that ``worldmodel compare`` reads: its resolved
``config.yaml``, ``run.json``, ``summary.json``, evaluations, metrics, the ``vae.json`` /
``memory.json`` hashes of the parts it was trained on, ``features.json``, SB3's
``progress*.csv``. Weights, TensorBoard events, datasets, latent caches and videos stay behind.
The copies keep their paths relative to ``SRC``, so ``worldmodel compare DEST/agents/*``
regenerates the report from the repository alone.

A run counts as finished when its ``run.json`` says ``done``; unfinished runs are skipped (and
listed), so the command can be re-run as more runs finish: each copy is written atomically and
replaces an older copy of the same file.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO

from worldmodel.errors import RunNotFoundError, UserError
from worldmodel.io import atomic_write, read_json

log = logging.getLogger(__name__)

#: The files kept from a finished run, by name (each also at most :data:`MAX_BYTES`).
KEPT_NAMES = frozenset({
    "run.json", "config.yaml", "summary.json", "eval.json", "evaluations.jsonl",
    "metrics.jsonl", "vae.json", "memory.json", "features.json", "visualize.json",
    "report.json", "report.md",
})
#: Name patterns also kept (SB3's CSV log: one file per resumed session).
KEPT_PATTERNS = ("progress*.csv",)
#: A kept file larger than this is skipped with a warning (the repository is not a data store).
MAX_BYTES = 4 * 2**20


@dataclass
class Archived:
    """What :func:`archive` did: the runs copied, the files written, the runs skipped."""

    runs: list[Path] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    unfinished: list[Path] = field(default_factory=list)


def _status(folder: Path) -> str | None:
    """``run.json``'s status of ``folder``; ``None`` when it has none (not a run folder)."""
    record = folder / "run.json"
    if not record.is_file():
        return None
    try:
        data = read_json(record)
    except ValueError as e:
        raise UserError(f"{record} is not valid JSON ({e}); fix or delete it") from None
    return str(data.get("status")) if isinstance(data, dict) else None


def _kept(path: Path) -> bool:
    return path.is_file() and (path.name in KEPT_NAMES
                               or any(path.match(p) for p in KEPT_PATTERNS))


def _copy(source: Path, f: IO[bytes]) -> None:
    with open(source, "rb") as g:
        shutil.copyfileobj(g, f)


def archive(src: Path, dest: Path) -> Archived:
    """Copy the small files of every finished run at or under ``src`` into ``dest``.

    :param src: a run folder, or a folder holding run folders (a pipeline's, any depth).
    :param dest: where the copies go, at the same paths relative to ``src``.
    :raises RunNotFoundError: ``src`` does not exist.
    :raises UserError: ``dest`` is inside ``src`` or a file, or ``src`` holds no run folder.
    """
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise RunNotFoundError(f"{src} not found; pass a run folder or a pipeline folder")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"-o {dest} is a file; pass a folder")
    if dest.resolve().is_relative_to(src.resolve()):
        raise UserError(f"-o {dest} is inside {src}; pass a folder outside it")
    done = Archived()
    folders = sorted({p.parent for p in src.rglob("run.json")})
    if not folders:
        raise UserError(f"{src} holds no run folder (no run.json): pass a run or pipeline folder")
    for folder in folders:
        status = _status(folder)
        if status != "done":
            if status is not None:
                done.unfinished.append(folder)
            continue
        done.runs.append(folder)
        for file in sorted(folder.iterdir()):
            if not _kept(file):
                continue
            if file.stat().st_size > MAX_BYTES:
                log.warning("%s: %d bytes, more than %d: not archived", file,
                            file.stat().st_size, MAX_BYTES)
                continue
            target = dest / file.relative_to(src)

            atomic_write(target, partial(_copy, file))
            done.files.append(target)
    return done
