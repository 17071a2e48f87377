"""Fine-tuning arms as configuration: which answers, which distilled data, how many rows, KD, overrides.

An arm is a recovery recipe the study compares against the others and against the unpruned child. The
short names `sft`, `sdd` and `sdd-kd` are built in; a YAML `arms:` list may mix them with full specs:

    arms:
      - sft
      - {name: sdd-self, responses: distilled, data: [gsm8k, gsm8k-self, alpaca]}
      - {name: sdd-partial-kd, kd_weight: 0.5, finetune: {method: partial, train_layers: after_cut, kd_cache: true}}
      - {name: sdd-250, rows: 250}

Every arm shares the pipeline's `finetune` section; `finetune` under an arm overrides fields of it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from selfdistill.config import from_dict, opt
from selfdistill.stages import BY_NAME, TABLE

# Folder names of other stages in the run directory (and the KD caches' folder), which an arm's must not take.
RESERVED = (*(s.folder for s in TABLE if "{}" not in s.folder), "kd-cache")
_DISTILL_PREFIX = BY_NAME["distill"].folder.split("{}")[0]


@dataclass(frozen=True)
class ArmSpec:
    name: str = opt("", "arm name, also its folder in the run directory")
    responses: Literal["original", "distilled"] = opt(
        "distilled", "original = the dataset's answers (SFT), distilled = the parent's verified answers (SDD)")
    data: list[str] = opt([], "dataset names (under datasets) to train on; empty = every dataset with "
                          "train_by_default")
    rows: int | None = opt(None, "train on the first N rows of each of those datasets (a data-size curve)")
    kd_weight: float = opt(0.0, "weight of logit distillation from the parent (0 = none)")
    finetune: dict[str, Any] = opt({}, "FinetuneConfig fields that override the shared finetune section")

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in RESERVED or self.name.startswith(_DISTILL_PREFIX):
            raise ValueError(f"arm name '{self.name}' must be non-empty, without '/', and not a stage folder")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"arm '{self.name}': kd_weight must be in [0, 1]")
        if self.rows is not None and self.rows < 1:
            raise ValueError(f"arm '{self.name}': rows must be at least 1")
        for key in ("model", "data", "out", "responses", "kd_weight", "teacher", "resume", "seed"):
            if key in self.finetune:
                raise ValueError(f"arm '{self.name}': finetune.{key} is set by the pipeline (use the arm's own "
                                 "fields: responses, data, rows, kd_weight)")


def builtin_arms(kd_weight: float) -> dict[str, ArmSpec]:
    """The short names: the paper's two arms and SDD plus the parent's logits."""
    return {"sft": ArmSpec("sft", "original"), "sdd": ArmSpec("sdd", "distilled"),
            "sdd-kd": ArmSpec("sdd-kd", "distilled", kd_weight=kd_weight)}


def resolve_arms(arms: list[Any], kd_weight: float, datasets: list[str], defaults: list[str]) -> list[ArmSpec]:
    """Every arm as a full spec, its `data` filled in; ValueError on an unknown name or dataset."""
    builtin, out = builtin_arms(kd_weight), []
    for i, arm in enumerate(arms):
        if isinstance(arm, str):
            if arm not in builtin:
                raise ValueError(f"unknown arm '{arm}' (built in: {', '.join(builtin)}; or give a mapping with "
                                 "name, responses, data, rows, kd_weight, finetune)")
            arm = builtin[arm]
        elif isinstance(arm, dict):
            arm = from_dict(ArmSpec, arm, prefix=f"arms[{i}].")
        elif not isinstance(arm, ArmSpec):
            raise ValueError(f"arms[{i}]: expected an arm name or a mapping, got {arm!r}")
        unknown = [d for d in arm.data if d not in datasets]
        if unknown:
            raise ValueError(f"arm '{arm.name}': dataset '{unknown[0]}' is not under datasets "
                             f"({', '.join(datasets)})")
        out.append(replace(arm, data=list(arm.data or defaults)))
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise ValueError(f"two arms are named '{next(n for n in names if names.count(n) > 1)}'")
    return out
