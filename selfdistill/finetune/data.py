"""Training rows for recovery fine-tuning: chat prompt -> one assistant answer.

Two inputs are accepted. The distill stage's JSONL (`messages` + `original` + `rewrite` + `response`)
gives the method's arm (`responses="distilled"`: the verified rewrite or its fallback) and the SFT
baseline (`responses="original"`) from the same file, so both arms share every other line of code.
Any plain dataset that `selfdistill.data.load_examples` reads gives its reference answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfdistill.data import load_examples, read_rows
from selfdistill.errors import UserError
from selfdistill.paths import looks_like_hub_dataset

log = logging.getLogger(__name__)

# --responses value -> the distill-output column that holds the answer to train on
RESPONSE_COLUMNS = {"distilled": "response", "original": "original"}


@dataclass(frozen=True)
class TrainData:
    rows: list[dict[str, Any]]  # TRL conversational prompt/completion rows
    format: str  # "distilled" (distill-stage output) or the plain dataset's recipe
    column: str  # where the answers came from
    rewrites_used: int | None  # rows whose answer is the parent's rewrite (distill output only)


def _first_row(path: Path) -> tuple[str, dict[str, Any]] | None:
    """("file:line", row) of the first row, or None for an empty file; a bad first row is its UserError."""
    for where, row in read_rows(path):
        if isinstance(row, UserError):
            raise row
        return where, row
    return None


def _is_distill_row(row: dict[str, Any]) -> bool:
    return "messages" in row and "original" in row


def is_distill_output(source: str | Path) -> bool:
    """Distill output rows carry `messages` plus an `original` answer; anything else is a plain dataset."""
    path = Path(str(source)).expanduser()
    first = _first_row(path) if path.is_file() else None
    return first is not None and _is_distill_row(first[1])


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    if not ok:
        raise UserError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} turns")
    if messages[-1]["role"] != "user":
        raise UserError(f"{where}: the last turn of 'messages' must be the user's (got '{messages[-1]['role']}')")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _distilled_rows(path: Path, responses: str, limit: int | None) -> TrainData:
    column = RESPONSE_COLUMNS[responses]
    rows, used = [], 0
    for where, row in read_rows(path):
        if isinstance(row, UserError):
            raise row
        if column not in row:
            raise UserError(f"{where}: no '{column}' field, which --responses {responses} trains on")
        answer = row[column]
        if not isinstance(answer, str) or not answer.strip():
            raise UserError(f"{where}: field '{column}' is empty")
        messages = _check_messages(row.get("messages"), where)
        rows.append({"prompt": messages, "completion": [{"role": "assistant", "content": answer.strip()}]})
        used += row.get("used") == "rewrite"
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise UserError(f"{path}: no rows to train on")
    return TrainData(rows, "distilled", column, used if responses == "distilled" else 0)


def load_train_data(source: str | Path, responses: str, recipe: str | None = None,
                    limit: int | None = None) -> TrainData:
    """Rows to train on; a one-line UserError names the file and line of any bad row."""
    if responses not in RESPONSE_COLUMNS:
        raise UserError(f"--responses must be one of {', '.join(RESPONSE_COLUMNS)}, not '{responses}'")
    path = Path(str(source)).expanduser()
    if path.is_dir():  # both --responses paths say so (a folder is neither distill output nor a dataset file)
        raise UserError(f"--data {path} is a folder; give a data file (.jsonl, .json, .csv, .parquet)")
    if not path.exists() and not looks_like_hub_dataset(source):
        raise UserError(f"--data {source}: file not found")
    first = _first_row(path) if path.is_file() else None
    if path.is_file() and first is None:
        raise UserError(f"{path}: the dataset is empty")
    if recipe is None and first is not None and _is_distill_row(first[1]):
        return _distilled_rows(path, responses, limit)
    if responses == "distilled":
        where = first[0] if first is not None else str(source)  # the row that shows it: file and line
        raise UserError(f"{where}: not distill output (no 'messages'/'original'/'response' fields), so it has "
                        "no rewrites; use --responses original to train on a plain dataset's answers")
    examples = load_examples(source, recipe, limit=limit)
    rows = [{"prompt": e.messages, "completion": [{"role": "assistant", "content": e.reference}]}
            for e in examples if e.kind != "text"]
    if not rows:
        raise UserError(f"{source}: plain text rows have no prompt/answer split; use a recipe with answers")
    name = recipe or "detected"
    return TrainData(rows, name, "reference", None)
