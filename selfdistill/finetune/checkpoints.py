"""The Trainer's checkpoints in OUT.checkpoints/: which one a resumed run continues from, and the clean
slate a fresh run starts on (so two runs' loss logs never mix)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from selfdistill.finetune.trainer import truncate_log

log = logging.getLogger(__name__)
LOG_NAME = "train_log.jsonl"


def _last_complete_checkpoint(ckpt: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing (trainer_state.json is its last file).

    A run killed while saving leaves a newer, half-written folder; resuming from it fails, so it is removed."""
    if not ckpt.is_dir():
        return None
    folders = sorted((p for p in ckpt.glob("checkpoint-*") if p.name.rsplit("-", 1)[-1].isdigit()),
                     key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    while folders and not (folders[-1] / "trainer_state.json").is_file():
        log.warning("removing the half-written %s", folders[-1])
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(folders[-1], ignore_errors=True)
        folders.pop()
    return str(folders[-1]) if folders else None


def prepare_checkpoints(ckpt: Path, resume: bool) -> str | None:
    """The checkpoint to resume from; a fresh run clears old checkpoints so logs never mix."""
    if not resume:
        if ckpt.exists() and int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(ckpt)
        return None
    last = _last_complete_checkpoint(ckpt)
    if last is None:
        log.warning("--resume: no checkpoint in %s, starting from step 0", ckpt)
        return None
    step = int(Path(last).name.rsplit("-", 1)[-1])
    log.info("resuming from %s (step %d)", last, step)
    if int(os.environ.get("RANK", "0")) == 0:
        truncate_log(ckpt / LOG_NAME, step)
    return last
