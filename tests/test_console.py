"""The quiet terminal: a command shows its own progress; the libraries' logs, warnings and bars go to run.log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from selfdistill.console import duration

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
CHATTER = ("Loading weights", "FutureWarning", "warnings.warn", "[transformers]", "it/s]")


def _finetune(tmp_path: Path, model: Path, data: Path, out: str, *flags: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "selfdistill", "finetune", "--model", str(model), "--data", str(data),
            "--responses", "original", "--out", str(tmp_path / out), "--max-steps", "1", "--batch-size", "2",
            "--grad-accum", "1", "--dtype", "float32", *flags]
    for key in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        ENV.pop(key, None)  # as a user's shell has them: unset
    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def rows(tmp_path_factory, gsm8k_train) -> Path:
    path = tmp_path_factory.mktemp("rows") / "g.jsonl"
    lines = gsm8k_train.read_text().splitlines()[:4]
    path.write_text("".join(json.dumps(json.loads(line)) + "\n" for line in lines))
    return path


def test_a_stage_shows_its_own_lines_and_logs_the_libraries(tmp_path, tiny_model_dir, rows):
    proc = _finetune(tmp_path, tiny_model_dir, rows, "child")
    assert proc.returncode == 0, proc.stderr
    terminal = proc.stderr
    assert "finetune ..." in terminal and re.search(r"finetune done in \d+ s", terminal)
    assert not [c for c in CHATTER if c in terminal], terminal  # no library chatter on the terminal
    assert json.loads(proc.stdout)["out"] == str(tmp_path / "child")  # the result is still printed, as JSON
    log = (tmp_path / "child" / "run.log").read_text()  # inside --out
    assert "FutureWarning" in log and "gradient_checkpointing" in log  # transformers' warning, kept
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO selfdistill.console: finetune \.\.\.$", log, re.M)


def test_verbose_keeps_the_libraries_on_the_terminal(tmp_path, tiny_model_dir, rows):
    proc = _finetune(tmp_path, tiny_model_dir, rows, "child", "--verbose")
    assert proc.returncode == 0, proc.stderr
    assert "FutureWarning" in proc.stderr and "Loading weights" in proc.stderr
    assert "finetune done in" in proc.stderr and "FutureWarning" in (tmp_path / "child" / "run.log").read_text()


def test_durations_read_as_a_person_would_say_them():
    assert [duration(s) for s in (0.4, 24, 192, 7500)] == ["0 s", "24 s", "3 min 12 s", "2 h 05 min"]
