"""`selfdistill run CONFIG.yaml`: the paper's loop as one resumable run.

    evaluate parent -> prune -> distill (per dataset) -> finetune arms (SFT, SDD, SDD+KD, or any in YAML)
    -> merge (per-dataset SDD children, SLERP) -> evaluate children -> drift -> speculate -> profile -> report

Each stage writes into its own folder of the run directory. A stage is complete when its
`manifest.json` carries the stage key: a hash of its resolved config and the keys of the stages
it reads from. A rerun skips complete stages; a changed config changes the key of that stage and
of every stage downstream, so exactly those rerun. `--from STAGE` forces a restart point.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfdistill.arms import ArmSpec, builtin_arms, resolve_arms
from selfdistill.config import dump_yaml, from_dict, key_dict, opt
from selfdistill.distill import DistillConfig, distill
from selfdistill.errors import UserError
from selfdistill.evaluate import EvalConfig, default_data_dir, evaluate
from selfdistill.evaluate.drift import DriftConfig, PromptSet, run_drift
from selfdistill.finetune import FinetuneConfig, finetune
from selfdistill.guard import lock_run_dir
from selfdistill.merge import MergeConfig, merge
from selfdistill.models import DEFAULT_MODEL
from selfdistill.profile import ProfileConfig, profile
from selfdistill.prune import PruneConfig, prune
from selfdistill.rundir import atomic_write_json, atomic_write_text, hash_path, read_manifest, write_manifest
from selfdistill.speculative import SpeculateConfig, speculate

log = logging.getLogger(__name__)

STAGES = ("parent-eval", "prune", "distill", "finetune", "merge", "evaluate", "drift", "speculate", "profile",
          "report")


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


@dataclass(frozen=True)
class PipelineConfig:
    run_dir: str = opt("runs/default", "run directory; one subfolder per stage")
    parent: str = opt(DEFAULT_MODEL, "the unpruned parent: alias, local folder, .gguf or hub id")
    seed: int = opt(0, "one seed, passed to every stage")
    data_dir: str = opt("", "offline data folder (default: $SELFDISTILL_DATA_DIR, else ../shared/data)")
    datasets: list[DatasetSpec] = opt([], "fine-tuning datasets to distill; two or more enable merging")
    # Any, not str | ArmSpec: resolve_arms builds the specs, so a bad arm gets its own error, not the union's.
    arms: list[Any] = opt(["sft", "sdd"], "fine-tuning arms: built-in sft, sdd, sdd-kd, or mappings "
                                    "(name, responses, data, rows, kd_weight, finetune; see selfdistill/arms.py)")
    kd_weight: float = opt(0.5, "KD weight of the built-in sdd-kd arm")
    merge_children: bool = opt(True, "with 2+ datasets: tune one SDD child per dataset and SLERP-merge them")
    drift_prompts: int = opt(50, "held-out prompts per drift set (no arm trained on them) for child-vs-parent KL")
    drift_max_new_tokens: int = opt(128, "parent answer length for the drift metrics")
    drift_general: DatasetSpec | None = opt(None, "general-instruction prompts no arm trains on: drift outside "
                                                  "the training domain (e.g. AlpacaEval)")
    speculate_children: bool = opt(True, "measure every child as a speculative draft of the parent")
    from_stage: str | None = opt(None, f"force a restart from this stage: {', '.join(STAGES)}")
    # Stage sections: any field of the stage's config; the inputs and outputs are filled in per run.
    prune: dict[str, Any] = opt({"num_layers": 6}, "PruneConfig fields (model, calibration, out filled in)")
    distill: dict[str, Any] = opt({}, "DistillConfig fields (teacher, dataset, out filled in)")
    finetune: dict[str, Any] = opt({}, "FinetuneConfig fields shared by every arm (model, data, out filled in)")
    evaluate: dict[str, Any] = opt({}, "EvalConfig fields (model, baseline, out filled in)")
    merge: dict[str, Any] = opt({}, "MergeConfig fields (models, out filled in)")
    speculate: dict[str, Any] = opt({}, "SpeculateConfig fields (target, draft, prompts, out filled in)")
    profile: dict[str, Any] = opt({}, "ProfileConfig fields (model, out filled in)")
    drift: dict[str, Any] = opt({}, "DriftConfig fields (parent, children, sets filled in)")

    FLAG_ALIASES = {"from_stage": "--from"}

    def __post_init__(self) -> None:
        if self.from_stage is not None and self.from_stage not in STAGES:
            raise ValueError(f"--from {self.from_stage}: not a stage ({', '.join(STAGES)})")
        if not self.datasets:
            raise ValueError("give at least one entry under 'datasets'")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError("every dataset needs a unique, non-empty name")
        for name, placeholders in _IO_PLACEHOLDERS.items():  # validate each section now, not mid-run
            stage_config(self, name, **placeholders)
        first, needed = self.datasets[0], max(self.drift_prompts, int(self.speculate.get("limit", 32)))
        if not (first.heldout_local or first.heldout_split or first.reserve):
            raise ValueError(f"dataset '{first.name}': drift and drafts are measured on its held-out rows; give "
                             "heldout_local, heldout_split (its test split) or reserve (rows held out of training)")
        if first.reserve and first.reserve < needed:
            raise ValueError(f"dataset '{first.name}': reserve {first.reserve} is fewer than the {needed} rows "
                             "drift_prompts / speculate.limit measure")
        for d in self.datasets:
            stage_config(self, "distill", d.distill, **_IO_PLACEHOLDERS["distill"])
        for arm in self.resolved_arms():
            stage_config(self, "finetune", arm.finetune, **_IO_PLACEHOLDERS["finetune"])

    def resolved_arms(self) -> list[ArmSpec]:
        defaults = [d.name for d in self.datasets if d.train_by_default]
        return resolve_arms(self.arms, self.kd_weight, [d.name for d in self.datasets], defaults)


_IO_PLACEHOLDERS: dict[str, dict[str, Any]] = {
    "prune": {"out": "-"}, "distill": {"dataset": "-", "out": "-"}, "finetune": {"model": "-", "data": "-", "out": "-"},
    "evaluate": {"model": ["-"], "out": "-"}, "merge": {"models": ["-", "-"], "out": "-"},
    "speculate": {"draft": ["-"], "prompts": "-", "out": "-"}, "profile": {"model": ["-"], "out": "-"},
    "drift": {"children": {"-": "-"}},
}
_SECTION_CLASSES = {"prune": PruneConfig, "distill": DistillConfig, "finetune": FinetuneConfig,
                    "evaluate": EvalConfig, "merge": MergeConfig, "speculate": SpeculateConfig,
                    "profile": ProfileConfig, "drift": DriftConfig}


def stage_config(cfg: PipelineConfig, section: str, section_overrides: dict[str, Any] | None = None,
                 **io: Any) -> Any:
    """The stage's typed config: the YAML section, then a dataset's or arm's overrides of it, then the
    run's inputs/outputs (which win)."""
    data = {**getattr(cfg, section), **(section_overrides or {}),
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in io.items()}}
    return from_dict(_SECTION_CLASSES[section], data, prefix=f"{section}.")


def resolve_dataset(spec: DatasetSpec, data_dir: Path | None) -> str:
    """The local copy when it exists, else the hub id: the same config works offline and online."""
    if spec.local:
        local = Path(spec.local).expanduser()
        for candidate in (local, (data_dir / local) if data_dir else None):
            if candidate is not None and candidate.is_file():
                return str(candidate.resolve())
    if spec.hub:
        return spec.hub
    where = f" under {data_dir}" if data_dir else " (no data_dir found)"
    raise UserError(f"dataset '{spec.name}': local file '{spec.local}' not found{where} and no hub id given")


class Stages:
    """Runs stage functions with skip-if-complete bookkeeping."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg, self.root, self.keys = cfg, Path(cfg.run_dir), {}
        self.forced_from = STAGES.index(cfg.from_stage) if cfg.from_stage else None

    def run(self, name: str, kind: str, config: Any, fn: Callable[[Any], Any], after: tuple[str, ...] = (),
            external: dict[str, str] = {}) -> Any:
        folder = self.root / name
        payload = {"config": key_dict(config),
                   "after": [self.keys[a] for a in after], "external": {k: hash_path(v) for k, v in external.items()}}
        key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.keys[name] = key
        forced = self.forced_from is not None and STAGES.index(kind) >= self.forced_from
        manifest = read_manifest(folder)
        if manifest and manifest.get("stage_key") == key and not forced and (folder / "result.json").is_file():
            log.info("[%s] complete, skipped", name)
            return json.loads((folder / "result.json").read_text())
        marker = folder / ".stage_key"
        if forced or manifest or (marker.is_file() and marker.read_text() != key):
            shutil.rmtree(folder, ignore_errors=True)  # outputs of another config: never resume from them
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(key)
        log.info("[%s] running", name)
        started = time.time()
        result = fn(config)
        atomic_write_json(folder / "result.json", result)
        old = read_manifest(folder) or {}
        write_manifest(folder, config=payload["config"], inputs=external, seed=self.cfg.seed, started=started,
                       extra={"stage": kind, "stage_key": key, "after": list(after),
                              **({"stage_manifest": old} if old else {})})
        return result


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run (or resume) the whole method; returns the paths of the report and of every child."""
    with lock_run_dir(cfg.run_dir):  # one `selfdistill run` per run directory; a second is refused, named
        return _run_locked(cfg)


def _run_locked(cfg: PipelineConfig) -> dict[str, Any]:
    root = Path(cfg.run_dir)
    data_dir = default_data_dir(cfg.data_dir)
    sources = {d.name: resolve_dataset(d, data_dir) for d in cfg.datasets}  # fail before any stage starts
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "config.yaml", dump_yaml(cfg))
    s = Stages(cfg)
    local = {k: v for k, v in sources.items() if Path(v).is_file()}
    evaluation = {"data_dir": str(data_dir or ""), "seed": cfg.seed}

    # 1. The parent's scores (cached by model hash, so the final evaluation reuses them).
    s.run("parent-eval", "parent-eval", stage_config(cfg, "evaluate", **evaluation, model=[cfg.parent], baseline="",
                                                     out=root / "parent-eval"), evaluate)
    # 2. Prune: score blocks on the first dataset's text (unless the section names other calibration data).
    s.run("pruned", "prune", stage_config(
        cfg, "prune", model=cfg.parent, calibration=cfg.prune.get("calibration") or sources[cfg.datasets[0].name],
        recipe=cfg.prune.get("recipe") or cfg.datasets[0].recipe, seed=cfg.seed, out=root / "pruned"), prune, external=local)
    # 3. Self-data distillation: the *unpruned* parent rewrites each dataset's answers.
    distilled = {}
    for d in cfg.datasets:
        out = root / f"distill-{d.name}" / "distilled.jsonl"
        s.run(f"distill-{d.name}", "distill", stage_config(
            cfg, "distill", d.distill, teacher=cfg.parent, dataset=sources[d.name], recipe=d.recipe, limit=d.limit,
            offset=d.train_offset, split=d.split, subset=d.subset, seed=cfg.seed, out=out), distill,
            external={d.name: sources[d.name]} if d.name in local else {})
        distilled[d.name] = out
    # 4. Recovery: the arms share the finetune section but for what each arm sets (selfdistill/arms.py).
    children = {"pruned": str(root / "pruned")}
    for arm in cfg.resolved_arms():
        data = _combined(root, {n: distilled[n] for n in arm.data}, arm.rows,
                         all_default=arm.data == [d.name for d in cfg.datasets if d.train_by_default])
        children[arm.name] = _finetune(s, cfg, arm, data, tuple(f"distill-{n}" for n in arm.data))
    # 5. Merge: one SDD child per dataset, SLERP-merged (the paper's merging of differently distilled children).
    if cfg.merge_children and len(cfg.datasets) >= 2:
        pair = cfg.datasets[:2]
        sdd = builtin_arms(cfg.kd_weight)["sdd"]
        per_data = [_finetune(s, cfg, sdd, distilled[d.name], (f"distill-{d.name}",), suffix=f"-{d.name}")
                    for d in pair]
        # A t grid is scored off the reported items: the merge gets the evaluation's preset, tasks, limit, seed.
        reported = stage_config(cfg, "evaluate", **evaluation, model=["-"], out="-")
        s.run("merged", "merge", stage_config(
            cfg, "merge", models=per_data, out=root / "merged", eval_preset=reported.preset,
            eval_tasks=list(reported.tasks), eval_limit=reported.limit, eval_seed=reported.seed,
            eval_data_dir=reported.data_dir), merge,
              after=tuple(f"sdd-{d.name}" for d in pair))
        children["merged"] = str(root / "merged")
    child_stages = tuple(Path(p).name for p in children.values())
    # 6. Evaluate every child against the parent: retention, chance-corrected, paired bootstrap.
    s.run("evaluate", "evaluate", stage_config(cfg, "evaluate", **evaluation, model=list(children.values()),
                                               baseline=cfg.parent, out=root / "evaluate"), evaluate, after=child_stages)
    # 7. Drift: how far each child moved from its parent, on rows no arm trained on (in and out of domain).
    sets = measured_sets(cfg, data_dir)
    s.run("drift", "drift", stage_config(
        cfg, "drift", parent=cfg.parent, children={Path(p).name: p for p in children.values()}, seed=cfg.seed,
        sets=[dataclasses.asdict(x) for x in sets], max_new_tokens=cfg.drift_max_new_tokens), run_drift,
        after=child_stages)
    # 8. Speculative decoding: each child as a draft of its parent.
    if cfg.speculate_children:
        rows = sets[0]
        s.run("speculate", "speculate", stage_config(
            cfg, "speculate", target=cfg.parent, draft=list(children.values()), prompts=rows.source,
            recipe=rows.recipe, offset=rows.offset, split=rows.split, subset=rows.subset,
            out=root / "speculate" / "speculate.json"), speculate, after=child_stages)
    # 9. Cost: parameters, FLOPs and latency of the parent and of the pruned shape (every child shares it).
    s.run("profile", "profile", stage_config(cfg, "profile", model=[cfg.parent, children["pruned"]],
                                             out=root / "profile" / "profile.json"), profile, after=("pruned",))
    # 10. One report.
    from selfdistill.report import ReportConfig, report

    result = s.run("report", "report", ReportConfig(run_dir=str(root)), report,
                   after=tuple(k for k in s.keys if k != "report"))
    return {"run_dir": str(root), "children": children, **result}


def _finetune(s: Stages, cfg: PipelineConfig, arm: ArmSpec, data: Path, after: tuple[str, ...],
              suffix: str = "") -> str:
    name = f"{arm.name}{suffix}"
    kd = {"kd_weight": arm.kd_weight, "teacher": cfg.parent if arm.kd_weight > 0 else None}
    section = {**cfg.finetune, **arm.finetune}
    if arm.kd_weight > 0 and section.get("kd_cache") and not section.get("kd_cache_dir"):
        # One cache per training file and answer column, shared by every KD arm on it; named by the distill
        # stages' keys so a redistilled dataset gets a fresh cache instead of a mismatch error.
        key = hashlib.sha256("".join(s.keys[a] for a in after).encode()).hexdigest()[:12]
        k, t = section.get("kd_top_k", 64), section.get("kd_temperature", 1.0)
        section["kd_cache_dir"] = str(s.root / "kd-cache" / f"{data.stem}-{arm.responses}-k{k}-t{t:g}-{key}")
    cache = {"kd_cache_dir": section["kd_cache_dir"]} if section.get("kd_cache_dir") else {}
    config = stage_config(cfg, "finetune", arm.finetune | cache,
                          model=s.root / "pruned", data=data, responses=arm.responses, seed=cfg.seed,
                          out=s.root / name, resume=True, restart=True, **kd)  # restart: checkpoints of another key
    s.run(name, "finetune", config, finetune, after=("pruned", *after))
    return str(s.root / name)


def _combined(root: Path, distilled: dict[str, Path], rows: int | None = None, all_default: bool = True) -> Path:
    """One training file over the given datasets (ids prefixed by the dataset name), first `rows` of each."""
    if len(distilled) == 1 and rows is None:
        return next(iter(distilled.values()))
    name = "distill-all" if all_default and len(distilled) > 1 else "train-" + "+".join(distilled)
    out = root / f"{name}{f'-{rows}' if rows else ''}.jsonl"
    lines = []
    for name, path in distilled.items():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:rows]
        for line in kept:
            row = json.loads(line)
            row["id"] = f"{name}/{row['id']}"
            lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def _heldout(spec: DatasetSpec, data_dir: Path | None, limit: int) -> PromptSet:
    """Rows of `spec` that no arm trains on: its reserved slice, else its test split (local, then hub)."""
    name = f"{spec.name}-heldout"
    if spec.reserve:
        return PromptSet(name=name, source=resolve_dataset(spec, data_dir), recipe=spec.recipe, offset=spec.offset,
                         limit=min(limit, spec.reserve), split=spec.split, subset=spec.subset)
    local = Path(spec.heldout_local).expanduser() if spec.heldout_local else None
    for candidate in (local, (data_dir / local) if data_dir and local else None):
        if candidate is not None and candidate.is_file():
            return PromptSet(name=name, source=str(candidate.resolve()), recipe=spec.recipe, limit=limit)
    if spec.hub and spec.heldout_split:
        return PromptSet(name=name, source=spec.hub, recipe=spec.recipe, limit=limit, split=spec.heldout_split,
                         subset=spec.subset)
    raise UserError(f"dataset '{spec.name}': held-out file '{spec.heldout_local}' not found and no hub split given")


def measured_sets(cfg: PipelineConfig, data_dir: Path | None) -> list[PromptSet]:
    """Where children are measured beside accuracy (drift, drafts): the first dataset's held-out rows, then
    the general-instruction prompts, which must not be a training file."""
    sets = [_heldout(cfg.datasets[0], data_dir, cfg.drift_prompts)]
    general = cfg.drift_general
    if general is not None:
        source = resolve_dataset(general, data_dir)
        if source in {resolve_dataset(d, data_dir) for d in cfg.datasets}:
            raise UserError(f"drift_general '{general.name}': {source} is a training dataset; pick prompts no arm "
                            "trains on")
        sets.append(PromptSet(name=general.name, source=source, recipe=general.recipe, offset=general.offset,
                              limit=cfg.drift_prompts, split=general.split, subset=general.subset))
    return sets
