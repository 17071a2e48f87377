"""What a distill output records and checks so that a resumed run writes what the uninterrupted run writes.

Rows are generated in fixed blocks of `BLOCK_BATCHES x batch_size` input rows counted from the first row,
each block one call of the engine seeded by its block number. A block's batches (which rows share a
forward, how they are padded, when slots refill, the sampling stream) then depend only on the block's rows,
never on where a run started, so a resume restarts at the first unfinished block and its regenerated rows
equal the uninterrupted run's: exactly in fp32 and in bf16 alike, on the same hardware, thread count and
batch size (docs/guarantees.md). Rows of that block already in the file are kept, not rewritten.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from selfdistill.distill.records import read_complete
from selfdistill.errors import UserError

log = logging.getLogger(__name__)

BLOCK_BATCHES = 8  # the engine refills slots within a block of 8 batches; only each block's tail runs thinner

# Config fields that do not shape a row: how many rows, where they go, and throughput knobs.
NOT_SHAPING = ("out", "limit", "device", "batch_size", "refill", "overwrite", "restart")


def settings(cfg: Any, dtype: str) -> dict[str, Any]:
    """The settings a distill output records; a resume with other values is refused (or restarted)."""
    from selfdistill.config import to_dict

    values = {k: v for k, v in to_dict(cfg).items() if k not in NOT_SHAPING}
    return {**values, "dtype": dtype}  # resolved: "auto" is bf16 on one machine and fp32 on another


ROW_FIELDS = ("id", "messages", "original", "rewrite", "used", "response")


def recognize_output(path: Path) -> bool:
    """A distill JSONL written before outputs carried a record: every complete line is a distilled row.

    The contract fields are required, not just an `id`: a dataset file given as --out has ids too."""
    try:
        rows, _ = read_complete(path)
    except UserError:
        return False
    if not rows:
        return path.stat().st_size == 0
    return all(all(k in row for k in ROW_FIELDS) for row in rows)


def recognize_stats(path: Path) -> bool:
    import json

    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(stats, dict) and "rows_this_run" in stats


def block_rows(batch_size: int) -> int:
    return BLOCK_BATCHES * batch_size


def resume_start(done: int, block: int) -> int:
    """The first row of the first unfinished block: a resume regenerates that whole block."""
    return done - done % block


def block_seed(seed: int, block_number: int) -> int:
    return (seed * 1_000_003 + block_number) % (2 ** 63)


def in_blocks(generate: Any, prompts: list[tuple[int, list[int]]], params: Any, block: int,
              **kwargs: Any) -> Iterator[Any]:
    """`generate` over `prompts` (index, ids), one engine call per block of input rows, seeded per block.

    Best-of-k hands it one block's wave per call, its attempts numbered from 0: the grouping then only
    splits a wave larger than a block, and either way depends on nothing but that block's rows."""
    groups: dict[int, list[tuple[int, list[int]]]] = {}
    for index, ids in prompts:
        groups.setdefault(index // block, []).append((index, ids))
    for number, group in groups.items():
        yield from generate(group, dataclasses.replace(params, seed=block_seed(params.seed, number)), **kwargs)


def same_row(written: dict[str, Any], row: dict[str, Any], line: int, path: Path) -> None:
    """A row regenerated on resume must equal the one in the file; the written one is kept either way."""
    if written.get("rewrite") != row.get("rewrite"):
        log.warning("%s:%d: regenerated differently on resume (other hardware, threads or batch size?); "
                    "the row written before is kept", path, line)
