"""The Trainer's checkpoints in OUT.checkpoints/: which one a resumed run continues from, the clean slate a
fresh run starts on (so two runs' loss logs never mix), and the run totals each checkpoint carries."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

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


class RunTotals(TrainerCallback, ExportableState):
    """The whole run's answer tokens and training seconds, kept in every checkpoint's trainer_state.json.

    A resumed run counts only its own steps; without these, its result.json would understate what the arm
    trained on. The totals are taken in on_step_end when a save is due (DefaultFlowCallback, first in the
    list, has decided by then), because that runs on every process, so the count can be summed across them;
    the Trainer's save then writes `state()` into the checkpoint."""

    def __init__(self, count_tokens: Callable[[], int], before: dict[str, float]) -> None:
        self.count_tokens, self.before = count_tokens, before
        self.totals = dict(before)
        self.started = time.time()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.time()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save:
            self.totals = self.now()

    def now(self) -> dict[str, float]:
        """Totals as of this moment: the checkpoint's plus this process's since it started training (a collective under DDP)."""
        return {"answer_tokens": int(self.before["answer_tokens"] + self.count_tokens()),
                "train_s": round(self.before["train_s"] + time.time() - self.started, 1)}

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"totals": self.totals}}


def totals_at(checkpoint: str | None) -> dict[str, float]:
    """The run totals a checkpoint recorded (zeros for a fresh run)."""
    zeros = {"answer_tokens": 0, "train_s": 0.0}
    if checkpoint is None:
        return zeros
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    saved = state.get("stateful_callbacks", {}).get(RunTotals.__name__)
    if not isinstance(saved, dict):
        log.warning("%s records no run totals (an older selfdistill wrote it): answer_tokens and train_s in "
                    "result.json count only the steps after it", checkpoint)
        return zeros
    return dict(saved["attributes"]["totals"])
