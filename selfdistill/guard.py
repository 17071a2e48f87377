"""The output guard: one writer per output, never another's output replaced, resumes that check what they resume.

Every stage calls `claim_output` once, before its first model loads, and holds the returned `Claim` while it
writes. The claim

- refuses an existing path this stage did not write (no record, no manifest naming the stage, not empty,
  not a stage folder of `selfdistill run`) unless the user passed `--overwrite`, and a path whose folder
  cannot be written;
- takes an exclusive `fcntl.flock` on a sibling `.NAME.lock` holding pid, host and command. The kernel drops
  the lock when the process dies, so a `kill -9` leaves no stale lock; a second writer is refused, named;
- for resumable outputs, compares the settings recorded when the output was started with the current ones
  and refuses with a one-line diff unless the user asks to `--restart`; then, as when the output is absent or
  overwritten, `Claim.fresh` is true and the stage starts over.

`Claim.commit()` writes the record (`NAME/.claim.json` in a folder, `.NAME.claim.json` beside a file) once
the stage starts writing; under `torchrun`/`accelerate launch` only rank 0 locks and records.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from selfdistill import console
from selfdistill.errors import UserError
from selfdistill.rundir import atomic_write_json, file_mode, read_manifest

log = logging.getLogger(__name__)

RECORD = ".claim.json"
Recognize = Callable[[Path], bool]


def _rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def record_path(path: Path, folder: bool) -> Path:
    return path / RECORD if folder else path.with_name(f".{path.name}{RECORD}")


def read_record(path: Path, folder: bool) -> dict[str, Any] | None:
    try:
        data = json.loads(record_path(path, folder).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Claim:
    """An output this process may write: locked (rank 0) and checked; a context manager that unlocks."""

    def __init__(self, path: Path, stage: str, folder: bool, settings: dict[str, Any] | None, fresh: bool,
                 lock_fd: int | None) -> None:
        self.path, self.stage, self.folder, self.settings = path, stage, folder, settings
        self.fresh = fresh  # nothing to resume: the output is absent, restarted or overwritten
        self._lock_fd = lock_fd

    def commit(self) -> None:
        """Record that this stage writes the output, with its settings (call once writing starts)."""
        if not _rank_zero():
            return
        record = {"writer": self.stage, "settings": self.settings, "pid": os.getpid(),
                  "host": socket.gethostname(), "command": " ".join(sys.argv),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(record_path(self.path, self.folder), record)

    def release(self) -> None:
        if self._lock_fd is not None:
            release_lock(self.path, self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']} ({info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def acquire_lock(path: Path, what: str) -> int:
    """An exclusive lock on `.NAME.lock` beside `path`, or a UserError naming the process that holds it."""
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{path} is being written by {_holder(lock)}; wait for it to finish or use "
                            f"another {what}") from None
        except OSError as e:  # a filesystem without flock (some network mounts): run, but say so
            log.warning("%s: cannot take the lock (%s); a second writer would not be refused", path, e.strerror)
            return fd
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder released and unlinked it between our open and flock: retry
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    return fd


def release_lock(path: Path, fd: int) -> None:
    # Unlink while still holding the lock; a waiter that opened the old file notices and retries.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock_path(path))
    os.close(fd)


def check_writable(path: Path, what: str) -> None:
    """Fail now, not after the work, if `path` cannot be created: probe its nearest existing folder."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {what} {path}: {parent} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".selfdistill-probe-")
    except OSError as e:
        raise UserError(f"cannot write {what} {path}: folder {parent} is not writable ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def _visible(folder: Path) -> list[Path]:
    """What a folder holds besides hidden files and the run log of a stage killed before it wrote anything."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")
            and not (p.name == console.LOG_NAME and console.is_our_log(p))]


def _manifest_writer(manifest: dict[str, Any], path: Path) -> str | None:
    """The stage a manifest says wrote `path` (the pipeline nests the stage's own manifest)."""
    for m in (manifest, manifest.get("stage_manifest") or {}):
        if m.get("writer"):
            return str(m["writer"])
    for m in (manifest, manifest.get("stage_manifest") or {}):  # written before manifests named a writer
        out = (m.get("config") or {}).get("out") if isinstance(m.get("config"), dict) else None
        if out and Path(str(out)).expanduser().resolve() == path.resolve():
            return "?"  # a selfdistill stage wrote exactly this path; which one is not recorded
    return None


def owner(path: Path, folder: bool, recognize: Recognize | None = None) -> str | None:
    """Which stage wrote an existing `path` ("?" = a selfdistill stage, not named); None = not ours."""
    record = read_record(path, folder) if path.is_dir() == folder else None
    if record and record.get("writer"):
        return str(record["writer"])
    if folder and path.is_dir():
        if (path / ".stage_key").is_file():
            return "?"  # a stage folder of `selfdistill run`: its stage key already decided it may be reused
        manifest = read_manifest(path)
        writer = _manifest_writer(manifest, path) if manifest else None
        if writer or not _visible(path):
            return writer or "?"
    if recognize is not None and recognize(path):
        return "?"
    return None


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse_foreign(path: Path, stage: str, folder: bool, what: str, writer: str | None) -> None:
    if path.exists() and path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "a file"
        raise UserError(f"{what} {path} is {kind}, not the {'folder' if folder else 'file'} that {stage} writes; "
                        "pass --overwrite to replace it, or use another " + what)
    by = f"written by {writer}" if writer and writer != "?" else "not written by " + stage
    raise UserError(f"{what} {path} already exists and was {by}; pass --overwrite to replace it, "
                    f"or use another {what}")


def _resume_or_restart(path: Path, folder: bool, settings: dict[str, Any], restart: bool,
                       what: str, restart_hint: str) -> bool:
    """True when the output must start over: its recorded settings differ and the user asked to restart."""
    record = read_record(path, folder)
    if record is None or not isinstance(record.get("settings"), dict):
        return False  # made before outputs recorded their settings: resumed as before (rows are still checked)
    changed = settings_diff(record["settings"], settings)
    if not changed:
        return False
    shown = "; ".join(f"{k}: {_show(record['settings'].get(k))} in {path.name}, {_show(settings.get(k))} now"
                      for k in changed[:3]) + ("; ..." if len(changed) > 3 else "")
    if restart:
        log.warning("%s: %s; starting over", path, shown)
        return True
    raise UserError(f"{shown}; {restart_hint} or use another {what}")


def claim_output(path: str | Path, stage: str, *, folder: bool, settings: dict[str, Any] | None = None,
                 overwrite: bool = False, restart: bool = False, what: str = "--out",
                 recognize: Recognize | None = None, companions: Iterable[tuple[Path, Recognize | None]] = (),
                 restart_hint: str = "pass --restart to start over") -> Claim:
    """Check and lock the output `path` of `stage` before any work (see the module docstring).

    `settings`: the content-shaping settings of a resumable output (None = the stage rewrites it whole);
    `restart`: when they differ from the recorded ones, start over instead of refusing.
    `recognize`: accepts a path this stage made before records existed. `companions`: files written beside
    the output (stats.json, a .md table), refused when present, not ours, and the output itself is absent.
    """
    path = Path(path).expanduser()
    try:
        check_writable(path, what)
        fd = acquire_lock(path, what) if _rank_zero() else None
    except OSError as e:  # a name too long for the filesystem, a folder that vanished, ...
        raise UserError(f"cannot write {what} {path}: {e.strerror or e}") from None
    try:
        writer = owner(path, folder, recognize) if path.exists() else stage
        ours = writer in (stage, "?") and path.is_dir() == folder if path.exists() else True
        if path.is_dir() and not folder:  # never replace a folder by a file, even with --overwrite
            raise UserError(f"{what} {path} is a folder; give a file name such as {path / (stage + '.json')}")
        if not ours and not overwrite:
            _refuse_foreign(path, stage, folder, what, writer)
        for companion, accepts in companions:
            if companion.exists() and not overwrite and not (path.exists() and ours) \
                    and not (accepts is not None and accepts(companion)):
                raise UserError(f"{companion} already exists and was not written by {stage}; pass --overwrite "
                                f"to replace it, or use another {what}")
        fresh = not path.exists() or not ours
        if not fresh and settings is not None:
            fresh = _resume_or_restart(path, folder, settings, restart, what, restart_hint)
        console.open_output_log(path, folder)  # the output is ours to write: its log may start (console.py)
        return Claim(path, stage, folder, settings, fresh, fd)
    except OSError as e:
        if fd is not None:
            release_lock(path, fd)
        raise UserError(f"cannot write {what} {path}: {e.strerror or e}") from None
    except BaseException:
        if fd is not None:
            release_lock(path, fd)
        raise


def is_run_dir(root: Path) -> bool:
    """A run directory `selfdistill run` wrote: its record says so, or (made before records) it holds the
    run's config.yaml and a stage folder."""
    record = read_record(root, folder=True)
    if record and record.get("writer") == "run":
        return True
    return (root / "config.yaml").is_file() and any(
        (p / ".stage_key").is_file() or (p / "manifest.json").is_file() for p in root.iterdir() if p.is_dir())


def lock_run_dir(root: str | Path, overwrite: bool = False) -> Claim:
    """The pipeline's claim on its run directory: one `selfdistill run` per run directory at a time, and never
    a folder that holds something else unless `overwrite` (commit() then records the run as its writer)."""
    root = Path(root).expanduser()
    try:
        check_writable(root / "config.yaml", "--run-dir")
        fd = acquire_lock(root, "--run-dir") if _rank_zero() else None
    except OSError as e:
        raise UserError(f"cannot write --run-dir {root}: {e.strerror or e}") from None
    try:
        if root.exists() and not root.is_dir():
            raise UserError(f"--run-dir {root} is a file, not a folder")
        if root.is_dir() and _visible(root) and not is_run_dir(root) and not overwrite:
            raise UserError(f"--run-dir {root} is not empty and was not written by selfdistill run; pass "
                            "--overwrite to write into it anyway, or use another --run-dir")
    except BaseException:
        if fd is not None:
            release_lock(root, fd)
        raise
    return Claim(root, "run", True, None, False, fd)
