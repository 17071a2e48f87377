"""Atomic artifacts, stage manifests, and the output guard every stage claims its output with.

A stage folder is complete only when its `manifest.json` exists; every file is written to a
temporary name in the same folder and renamed, so a killed run never leaves a file that looks
finished. The manifest records the resolved config, package versions, seed, input hashes and
wall time, which is what lets a rerun decide whether a stage can be skipped.

Whether a stage may write a path at all is decided in one place, `selfdistill.guard.claim_output`
(docs/guarantees.md): it refuses paths another stage or the user made, takes a per-output lock, and
compares a resumable output's recorded settings with the current ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from selfdistill.console import LOG_NAME, is_our_log

MANIFEST = "manifest.json"
_PACKAGES = ("selfdistill", "torch", "transformers", "peft", "trl", "accelerate", "datasets",
             "lm_eval", "safetensors", "math-verify", "vllm")


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (another thread may be creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open()` gives a new file: 0666 less the umask (mkstemp's 0600 would make outputs private)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode `mkdir` gives a new folder: 0777 less the umask (mkdtemp's 0700 would make outputs private)."""
    return 0o777 & ~_umask()


def follow_umask(folder: Path) -> None:
    """Give what a library wrote private through a temp file (safetensors' model.safetensors: 0600) the mode
    that `open()` would have: an output folder is as readable as the user's umask makes new files."""
    files, folders = file_mode(), dir_mode()
    for entry in folder.rglob("*"):
        mode = entry.lstat().st_mode & 0o777
        if entry.is_file() and not entry.is_symlink() and mode == 0o600 != files:
            os.chmod(entry, files)
        elif entry.is_dir() and not entry.is_symlink() and mode == 0o700 != folders:
            os.chmod(entry, folders)


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` in one rename. The run log in `path`
    (which this command may be writing) moves into the new folder first: an open file survives a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, dir_mode())
        yield tmp
        follow_umask(tmp)
        if is_our_log(path / LOG_NAME) and not (tmp / LOG_NAME).exists():
            os.replace(path / LOG_NAME, tmp / LOG_NAME)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            remove_path(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp file name beside `path` for writers that need a path (savefig, to_json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def remove_path(path: str | Path) -> None:
    """Remove a file or a folder tree, whichever `path` is (an --overwrite may replace either)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def hash_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (names + contents, sorted; not hidden files or a run log,
    which say how the folder was made, not what it holds); '' if it does not exist."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name != LOG_NAME)
    else:
        return ""
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def write_manifest(stage_dir: str | Path, *, config: dict[str, Any], inputs: dict[str, str | Path] = {},
                   seed: int | None = None, started: float, extra: dict[str, Any] | None = None,
                   writer: str | None = None) -> Path:
    """Mark `stage_dir` complete: resolved config, versions, seed, input hashes, wall time.

    `writer` names the stage, so a later run knows whose folder this is (see `claim_output`)."""
    manifest = {
        **({"writer": writer} if writer else {}),
        "config": config,
        "seed": seed,
        "inputs": {k: {"path": str(v), "sha256": hash_path(v)} for k, v in inputs.items()},
        "versions": package_versions(),
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_time_s": round(time.time() - started, 3),
        **(extra or {}),
    }
    return atomic_write_json(Path(stage_dir) / MANIFEST, manifest)


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
