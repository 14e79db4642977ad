"""The run-folder contract every stage follows: kind, layout version, lock, config, summary.

A run folder is what one stage writes (a VAE run, an agent run, a report...). This module owns
what is the same for all of them:

* ``run.json`` records the folder's ``kind`` (``vae``, ``agent``, ``report``...), the layout
  version, its ``status`` (``running`` until the stage finishes, then ``done``) and the pid and
  times of the last session. A stage refuses an ``--out`` that holds another kind, before it
  touches anything. Folders written before ``run.json`` existed are recognised by their files.
* ``.lock``: an exclusive ``flock`` held for the life of a stage run, released by the kernel
  when the process dies (also by ``kill -9``, which leaves the file: the next writer takes it
  over). A second writer is refused with one line naming the holder's pid.
* Restart: a stage declares its checkpoint file (``last.pt``, ``last.zip``). :meth:`RunFolder.open`
  decides once, for every stage, whether a session resumes or starts over: a folder killed
  before its first checkpoint starts over (its stale files removed); one killed after it resumes
  with the same command; a finished one is only extended with ``--resume``. Never a dead end.
* ``config.yaml`` (the resolved config) and ``summary.json`` are written here, atomically.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> out = Path(tempfile.mkdtemp()) / "run"
    >>> with RunFolder.open(out, "vae", checkpoint="last.pt") as run:
    ...     run.resume, read_kind(out)
    (False, 'vae')
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from worldmodel.errors import RunNotFoundError, UserError
from worldmodel.io import atomic_write_json, read_json

if TYPE_CHECKING:
    from worldmodel.config import Config
    from worldmodel.stages import StageSpec

log = logging.getLogger("worldmodel")

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
#: Version of the run-folder layout that ``run.json`` records.
LAYOUT_VERSION = 1

#: How folders written before ``run.json`` existed are recognised: (kind, a file only it has).
_LEGACY_MARKERS = (
    ("dataset", "manifest.json"),
    ("agent", "last.zip"),
    ("agent", "evaluations.jsonl"),
    ("agent", "vae.json"),
    ("agent", "eval.json"),
    ("vae", "last.pt"),
    ("vae", "best.pt"),
    ("report", "report.md"),
    ("visualize", "visualize.html"),
)


def read_kind(path: Path) -> str | None:
    """The kind of run in ``path`` (``None``: no folder, an empty one, or unrecognised files)."""
    path = Path(path)
    record = _read_record(path)
    if record is not None:
        return str(record.get("kind")) if record.get("kind") else None
    if not path.is_dir():
        return None
    for kind, marker in _LEGACY_MARKERS:
        if (path / marker).exists():
            return kind
    return None


def _read_record(path: Path) -> dict[str, Any] | None:
    file = Path(path) / RUN_FILE
    if not file.is_file():
        return None
    try:
        data = read_json(file)
    except (OSError, ValueError) as e:
        raise UserError(f"{file} is not valid JSON ({e}); restore it or delete the run") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} is not a run record; restore it or delete the run")
    return data


def check_kind(path: Path, kind: str, what: str = "--out") -> None:
    """Refuse ``path`` when it holds a run of another kind (one line; nothing is touched)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file; pass a folder for the run")
    found = read_kind(path)
    if found is not None and found != kind:
        raise UserError(
            f"{what} {path} holds {_a(found)} run, not {_a(kind)} run; pick another {what} folder"
        )


def require_kind(path: Path, kind: str, what: str) -> Path:
    """An input run of the right kind (e.g. ``--vae`` must be a ``vae`` run), or ``UserError``."""
    path = Path(path)
    if not path.is_dir():
        raise RunNotFoundError(f"{what} {path} not found; pass an existing {kind} run folder")
    found = read_kind(path)
    if found != kind:
        shown = f"{_a(found)} run" if found else "not a run folder of this project"
        raise UserError(f"{what} {path} is {shown}; pass {_a(kind)} run folder")
    return path


def _a(kind: str) -> str:
    return f"an {kind}" if kind[:1] in "aeiou" else f"a {kind}"


class FolderLock:
    """An exclusive ``flock`` on ``path``; the pid of the holder is written into it.

    The one lock of the project: run folders, a dataset's collection and each dataset shard.
    Released when the process dies, even by SIGKILL. ``path=None`` (remote storage), file
    systems without ``flock`` and platforms without ``fcntl`` get no lock: one writer is then
    the user's responsibility.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = None if path is None else Path(path)
        self._file: IO[bytes] | None = None

    def acquire(self, what: str = "this folder", timeout: float = 0.0) -> None:
        """Take the lock, waiting up to ``timeout`` s; ``UserError`` naming the holder's pid."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        while True:
            f = open(self.path, "a+b")  # kept open while the lock is held
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().decode(errors="replace").strip() or "unknown"
                f.close()
                if time.monotonic() >= deadline:
                    raise UserError(
                        f"{what} is being written by another process (pid {holder}, lock "
                        f"{self.path}); wait for it to finish or stop it"
                    ) from None
                time.sleep(0.05)
                continue
            except OSError:  # file system without flock support
                f.close()
                return
            if _same_file(f, self.path):
                break
            f.close()  # the holder removed the file as we opened it: lock the new one
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()).encode())
        f.flush()
        self._file = f

    def release(self) -> None:
        """Remove the lock file, then drop the lock (a waiting writer then locks a new file)."""
        if self._file is not None and self.path is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()
            self._file = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(f: IO[bytes], path: Path) -> bool:
    try:
        return os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


class RunFolder:
    """One stage session's hold on its run folder; use :meth:`open` as a context manager.

    :param path: the run folder.
    :param kind: the kind of run the stage writes.
    :param resume: whether this session continues a checkpoint (decided by :meth:`open`).
    """

    def __init__(self, path: Path, kind: str, resume: bool) -> None:
        self.path = Path(path)
        self.kind = kind
        self.resume = resume
        self._lock = FolderLock(self.path / LOCK_FILE)
        self._record: dict[str, Any] = {}
        self._created = False
        self._finished = False

    @classmethod
    def open(
        cls,
        path: Path,
        kind: str,
        *,
        resume: bool | None = False,
        checkpoint: str | None = None,
        stale: Iterable[str] = (),
    ) -> RunFolder:
        """Check, lock and prepare ``path`` for a session of a stage writing ``kind`` runs.

        :param resume: ``True`` (``--resume``): continue the run; a run killed before its first
            checkpoint starts over. ``False``: start a run; a folder whose run was interrupted
            after a checkpoint is resumed (the same command continues), a finished one is
            refused. ``None`` (the pipeline): resume whenever there is a checkpoint.
        :param checkpoint: the file whose presence makes a run resumable (``None``: the stage
            has no checkpoints and always starts over).
        :param stale: files (glob patterns) of an earlier attempt that a fresh start removes.
        :raise UserError: a file or another kind of run at ``path``; another process writing it;
            ``--resume`` of a folder that holds no run; a fresh run into a finished one.
        """
        path = Path(path)
        check_kind(path, kind)
        run = cls(path, kind, resume=False)
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        try:
            run._lock.acquire(f"{kind} run {path}")
            run.resume = run._decide(resume, checkpoint)
            if not run.resume:
                run._clear(stale)
            run._write_record("running")
            run._created = created
        except BaseException:
            run._lock.release()
            if created:  # a refused run leaves no folder behind
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise
        return run

    def _decide(self, resume: bool | None, checkpoint: str | None) -> bool:
        record = _read_record(self.path)
        has_checkpoint = checkpoint is not None and (self.path / checkpoint).is_file()
        started = record is not None or any(
            not p.name.startswith(".") for p in self.path.iterdir())
        finished = (record or {}).get("status") == "done" or (
            record is None and (self.path / "summary.json").is_file()
        )
        if resume is None:
            return has_checkpoint
        if resume:
            if has_checkpoint:
                return True
            if not started:
                raise UserError(
                    f"nothing to resume: {self.path} holds no {self.kind} run; drop --resume "
                    "to start one there"
                )
            log.info("%s: killed before its first checkpoint; starting over", self.path)
            return False
        if has_checkpoint and finished:
            raise UserError(
                f"{self.path} already holds a finished {self.kind} run; pass --resume to "
                "continue it, or pick another --out"
            )
        if has_checkpoint:
            log.info("%s: resuming the interrupted run from %s", self.path, checkpoint)
            return True
        return False

    def _clear(self, stale: Iterable[str]) -> None:
        for pattern in stale:
            for file in self.path.glob(pattern):
                if file.is_file():
                    file.unlink()

    def _write_record(self, status: str) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        old = _read_record(self.path) or {}
        self._record = {
            "kind": self.kind,
            "layout_version": LAYOUT_VERSION,
            "status": status,
            "created": old.get("created", now) if self.resume or status == "done" else now,
            "updated": now,
            "pid": os.getpid(),
            "sessions": int(old.get("sessions", 0)) + (status == "running"),
        }
        atomic_write_json(self.path / RUN_FILE, self._record)

    def refuse_changed_settings(self, cfg: Config, spec: StageSpec) -> None:
        """On a resume: refuse ``output`` settings ``spec`` reads that differ from the run's.

        Budgets may grow and runtime settings may change
        (:func:`worldmodel.stages.resume_mismatches`).

        :raise UserError: one line naming each changed key, its old and its new value.
        """
        from worldmodel.config import load_run_config
        from worldmodel.stages import config_effects, resume_mismatches

        if not self.resume:
            return
        changed = resume_mismatches(load_run_config(self.path), cfg, spec)
        if changed:
            effects = config_effects()
            budgets = ", ".join(k for k in spec.keys() if effects[k] == "budget") or "none"
            raise UserError(
                f"cannot resume {self.path}: these settings differ from its config.yaml: "
                f"{'; '.join(changed)}; only budgets ({budgets}) and runtime settings may "
                f"change: restore them (--config {self.path}/config.yaml) or pick another --out"
            )

    def save_config(self, cfg: Config) -> None:
        """Write the resolved config as ``config.yaml``."""
        cfg.save(self.path / "config.yaml")

    def save_summary(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json``."""
        atomic_write_json(self.path / "summary.json", summary)

    def finish(self) -> None:
        """Mark the run ``done`` (the stage completed)."""
        self._write_record("done")
        self._finished = True

    def close(self) -> None:
        """Release the lock (the run stays ``running`` unless :meth:`finish` was called).

        A session that created the folder and failed before writing anything but its records
        removes it again: a refused or failed run leaves no empty run folder behind.
        """
        if self._created and not self._finished and self.path.is_dir():
            names = {p.name for p in self.path.iterdir()} - {LOCK_FILE}
            if names <= {RUN_FILE, "config.yaml"}:
                for name in names:
                    (self.path / name).unlink(missing_ok=True)
                self._lock.release()
                with contextlib.suppress(OSError):
                    self.path.rmdir()
                return
        self._lock.release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
