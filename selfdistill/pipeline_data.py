"""The datasets of a pipeline run: where each is read from, which rows no arm trains on, and the training
file an arm reads when it trains on several datasets or on a few rows of each."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfdistill.config import opt
from selfdistill.errors import UserError
from selfdistill.evaluate.drift import PromptSet
from selfdistill.rundir import atomic_write_text


@dataclass(frozen=True)
class DatasetSpec:
    name: str = opt("", "short name, used in folder names (e.g. gsm8k)")
    local: str | None = opt(None, "file under data_dir (used when it exists)")
    hub: str | None = opt(None, "hub dataset id, used when the local file is absent")
    subset: str | None = opt(None, "hub dataset config (e.g. 'main' for openai/gsm8k)")
    split: str = opt("train", "split, for hub datasets")
    recipe: str | None = opt(None, "recipe: gsm8k, dolly, alpaca, openmathinstruct, ...")
    limit: int | None = opt(None, "rows to distill and train on")
    offset: int = opt(0, "skip this many rows first")
    distill: dict[str, Any] = opt({}, "DistillConfig fields for this dataset only (e.g. mode: answer, samples: 8)")
    train_by_default: bool = opt(True, "part of the data of arms that name no datasets")
    heldout_local: str | None = opt(None, "file under data_dir with rows no arm trains on (the recipe's test split)")
    heldout_split: str | None = opt(None, "hub split with rows no arm trains on, when heldout_local is absent")
    reserve: int = opt(0, "without a test split: hold out the first N rows (after offset); training starts after")

    @property
    def train_offset(self) -> int:
        return self.offset + self.reserve


def _local_file(name: str | None, data_dir: Path | None) -> str | None:
    """`name` as given, else under `data_dir`; None when neither is a file."""
    if not name:
        return None
    local = Path(name).expanduser()
    for candidate in (local, (data_dir / local) if data_dir else None):
        if candidate is not None and candidate.is_file():
            return str(candidate.resolve())
    return None


def resolve_dataset(spec: DatasetSpec, data_dir: Path | None) -> str:
    """The local copy when it exists, else the hub id: the same config works offline and online."""
    found = _local_file(spec.local, data_dir) or spec.hub
    if found:
        return found
    where = f" under {data_dir}" if data_dir else " (no data_dir found)"
    raise UserError(f"dataset '{spec.name}': local file '{spec.local}' not found{where} and no hub id given")


def heldout_rows(spec: DatasetSpec, data_dir: Path | None, limit: int) -> PromptSet:
    """Rows of `spec` that no arm trains on: its reserved slice, else its test split (local, then hub)."""
    name = f"{spec.name}-heldout"
    if spec.reserve:
        return PromptSet(name=name, source=resolve_dataset(spec, data_dir), recipe=spec.recipe, offset=spec.offset,
                         limit=min(limit, spec.reserve), split=spec.split, subset=spec.subset)
    local = _local_file(spec.heldout_local, data_dir)
    if local:
        return PromptSet(name=name, source=local, recipe=spec.recipe, limit=limit)
    if spec.hub and spec.heldout_split:
        return PromptSet(name=name, source=spec.hub, recipe=spec.recipe, limit=limit, split=spec.heldout_split,
                         subset=spec.subset)
    raise UserError(f"dataset '{spec.name}': held-out file '{spec.heldout_local}' not found and no hub split given")


def measured_sets(cfg: Any, data_dir: Path | None) -> list[PromptSet]:
    """Where children are measured beside accuracy (drift, drafts): the first dataset's held-out rows, then
    the general-instruction prompts (`cfg.drift_general`), which must not be a training file."""
    sets = [heldout_rows(cfg.datasets[0], data_dir, cfg.drift_prompts)]
    general = cfg.drift_general
    if general is not None:
        source = resolve_dataset(general, data_dir)
        if source in {resolve_dataset(d, data_dir) for d in cfg.datasets}:
            raise UserError(f"drift_general '{general.name}': {source} is a training dataset; pick prompts no arm "
                            "trains on")
        sets.append(PromptSet(name=general.name, source=source, recipe=general.recipe, offset=general.offset,
                              limit=cfg.drift_prompts, split=general.split, subset=general.subset))
    return sets


def training_file_name(datasets: list[str], rows: int | None, all_default: bool) -> str:
    """The combined file's name: `distill-all` for every default dataset, else `train-a+b`; `-N` for N rows."""
    name = "distill-all" if all_default and len(datasets) > 1 else "train-" + "+".join(datasets)
    return f"{name}{f'-{rows}' if rows else ''}.jsonl"


def write_training_file(out: Path, distilled: dict[str, Path], rows: int | None) -> None:
    """One training file over the distilled datasets (ids prefixed by the dataset name), the first `rows` of each."""
    lines = []
    for name, path in distilled.items():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:rows]
        for line in kept:
            row = json.loads(line)
            row["id"] = f"{name}/{row['id']}"
            lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(out, "\n".join(lines) + "\n")
