"""The process shards of a distill run: who runs where, the shard files, and putting them back together.

Under `accelerate launch`/`torchrun` each process rewrites one contiguous shard into `<out>.partR-of-N`
and rank 0 appends the shards to `out` in input order; stats are gathered from every process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from selfdistill.distill.records import open_for_append, read_complete, sync, write_row
from selfdistill.models import resolve_device

NO_GENERATION = {"generated_tokens": 0, "prefilled_tokens": 0, "generation_s": 0.0}


def world(device: str, backend: str) -> tuple[Any, int, int]:
    """(accelerate state or None, rank, world size) — one process unless launched distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, 0, 1
    if backend == "vllm":  # vLLM's external launcher sets up torch.distributed itself
        return None, int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    from accelerate import PartialState

    # Without cpu=True accelerate sees no GPU and quietly runs every process alone (gloo needs it).
    state = PartialState(cpu=resolve_device(device) == "cpu")
    return state, state.process_index, state.num_processes


def gather(state: Any, value: dict[str, Any]) -> list[dict[str, Any]]:
    """`value` of every process: through accelerate (hf), or vLLM's CPU process group (external launcher)."""
    if state is not None:
        from accelerate.utils import gather_object

        return gather_object([value])
    import torch.distributed as dist
    from vllm.distributed.parallel_state import get_world_group

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=get_world_group().cpu_group)
    return values


def part_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.part{rank}-of-{world}")


def merge_parts(out: Path, keep_bytes: int, world: int) -> None:
    """Rank 0: append every shard's rows to `out` in rank order (= input order), then drop the shards."""
    parts = [part_path(out, r, world) for r in range(world)]
    with open_for_append(out, keep_bytes) as f:
        for part in parts:
            rows, _ = read_complete(part)
            for row in rows:
                write_row(f, row)
        sync(f)
    for part in parts:
        part.unlink(missing_ok=True)


def combined(shard_stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The generation stats of all shards: tokens add up, the slowest shard's time counts."""
    return {"generated_tokens": sum(g["generated_tokens"] for g in shard_stats),
            "prefilled_tokens": sum(g["prefilled_tokens"] for g in shard_stats),
            "generation_s": max(g["generation_s"] for g in shard_stats)}
