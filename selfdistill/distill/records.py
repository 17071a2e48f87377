"""The distilled JSONL: one row per input in input order, appended as rows complete, resumable.

A row is complete when its line ends with a newline and parses; a rerun keeps the complete
prefix (checking that its ids match the input), drops a torn last line, and goes on from there.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import IO, Any

from selfdistill.data import Example
from selfdistill.errors import UserError

log = logging.getLogger(__name__)


def read_complete(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(complete rows, byte length of the complete prefix) of an existing output; ([], 0) if absent."""
    if not path.is_file():
        return [], 0
    rows, good = [], 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # torn last line of a killed run
            try:
                row = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                if f.read(1):  # a bad line with more after it: not ours to repair
                    raise UserError(f"{path}:{len(rows) + 1}: not a distilled row (invalid JSON); "
                                    "use another --out or remove the file") from None
                break
            if not isinstance(row, dict) or "id" not in row:
                raise UserError(f"{path}:{len(rows) + 1}: not a distilled row (no 'id'); use another --out")
            rows.append(row)
            good += len(line)
    return rows, good


def check_prefix(path: Path, rows: list[dict[str, Any]], examples: list[Example]) -> None:
    """The rows already written must be the first rows of this input, in order."""
    if len(rows) > len(examples):
        raise UserError(f"{path} has {len(rows)} rows but the input gives only {len(examples)}; "
                        "use another --out or the same --limit/--offset as before")
    for i, (row, ex) in enumerate(zip(rows, examples)):
        if str(row["id"]) != ex.id:
            raise UserError(f"{path}:{i + 1}: row id '{row['id']}' does not match input row '{ex.id}' "
                            f"({ex.source}); the file was made from other data — use another --out")


def open_for_append(path: Path, keep_bytes: int) -> IO[str]:
    """Append after the complete prefix, dropping a torn last line if there is one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size != keep_bytes:
        log.warning("%s: dropping an incomplete last line (%d bytes) from an interrupted run",
                    path, path.stat().st_size - keep_bytes)
        with open(path, "rb+") as f:
            f.truncate(keep_bytes)
    return open(path, "a", encoding="utf-8")


def write_row(f: IO[str], row: dict[str, Any]) -> None:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()


def sync(f: IO[str]) -> None:
    f.flush()
    os.fsync(f.fileno())


def make_row(example: Example, rewrite: str, verdicts: dict[str, bool], reason: str | None,
             finish: str, prompt_tokens: int, generated_tokens: int) -> dict[str, Any]:
    used = "rewrite" if reason is None else "original"
    return {
        "id": example.id,
        "messages": example.messages,
        "original": example.reference,
        "rewrite": rewrite,
        "used": used,
        "response": rewrite if used == "rewrite" else example.reference,
        "verdicts": verdicts,
        "reason": reason,
        "finish": finish,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated_tokens,
        "source": example.source,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts over all rows of the output: kept rewrites and rejections per reason."""
    reasons = Counter(str(r["reason"]).split(":")[0] for r in rows if r.get("used") != "rewrite")
    kept = sum(1 for r in rows if r.get("used") == "rewrite")
    return {
        "rows": len(rows),
        "rewrites_kept": kept,
        "rewrites_rejected": len(rows) - kept,
        "kept_fraction": round(kept / len(rows), 4) if rows else 0.0,
        "rejected_by_reason": dict(reasons.most_common()),
        "generated_tokens_total": sum(int(r.get("generated_tokens", 0)) for r in rows),
    }
