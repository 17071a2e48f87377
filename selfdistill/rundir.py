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

MANIFEST = "manifest.json"
_PACKAGES = ("selfdistill", "torch", "transformers", "peft", "trl", "accelerate", "datasets",
             "lm_eval", "safetensors", "math-verify", "vllm")


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
    """Yield a temp folder beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
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
    """sha256 of a file, or of a folder's files (names + contents, sorted); '' if it does not exist."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
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
