"""`selfdistill run CONFIG.yaml`: the paper's loop as one resumable run.

    prune (and any prune variants) -> distill (per dataset) -> finetune arms (SFT, SDD, SDD+KD, or any in YAML)
    -> merge (per-dataset SDD children, SLERP) -> evaluate parent and children -> drift -> speculate -> profile
    -> report

The stages, their folders and their YAML sections are rows of the stage table (selfdistill/stages.py).
`_method` lays out one run's steps; each step is keyed by its config and the keys of the steps it reads,
so a rerun skips complete steps and a changed config reruns that step and everything downstream.
`--from STAGE` forces a restart point.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfdistill.arms import ArmSpec, builtin_arms, resolve_arms
from selfdistill.config import dump_yaml, opt
from selfdistill.console import open_run_log, say
from selfdistill.guard import lock_run_dir
from selfdistill.models import DEFAULT_MODEL
from selfdistill.overlap import refuse_overlap
from selfdistill.paths import default_data_dir
from selfdistill.pipeline_cuts import child_labels, cut_folder, variant_names, variant_settings
from selfdistill.pipeline_data import DatasetSpec, measured_sets, resolve_dataset, training_file_name, write_training_file
from selfdistill.rundir import atomic_write_text
from selfdistill.stages import BY_NAME, NAMES, TABLE, Plan, Step, section_config, stage_dir, stage_output
from selfdistill.tables import fmt

__all__ = ["DatasetSpec", "PipelineConfig", "measured_sets", "resolve_dataset", "run", "stage_config"]


@dataclass(frozen=True)
class _Settings:
    """The run's own settings; the stage sections are added from the stage table (`PipelineConfig`)."""

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
    speculate_only: list[str] = opt([], "the children measured as drafts (default: every child)")
    prune_variants: list[Any] = opt([], "more children cut from the parent beside the plain one: mappings of a "
                                        "name and prune settings, e.g. {name: linear, replace: linear}; folder "
                                        "pruned-NAME")
    recover_from: str = opt("", "the cut the fine-tuning arms start from: '' (the plain one) or a prune "
                                "variant's name")
    from_stage: str | None = opt(None, f"force a restart from this stage: {', '.join(NAMES)}")
    overwrite: bool = opt(False, "write into an existing --run-dir that selfdistill run did not write", keyed=False)

    FLAG_ALIASES = {"from_stage": "--from"}

    def __post_init__(self) -> None:
        if self.from_stage is not None and self.from_stage not in NAMES:
            raise ValueError(f"--from {self.from_stage}: not a stage ({', '.join(NAMES)})")
        if not self.datasets:
            raise ValueError("give at least one entry under 'datasets'")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError("every dataset needs a unique, non-empty name")
        for stage in TABLE:  # validate every section now, not mid-run
            if stage.yaml_section:
                stage_config(self, stage.name, **stage.fills)
        for d in self.datasets:
            stage_config(self, "distill", d.distill, **BY_NAME["distill"].fills)
        self._check_variants()
        for arm in self.resolved_arms():
            stage_config(self, "finetune", arm.finetune, **BY_NAME["finetune"].fills)
        self._check_heldout()

    def _check_heldout(self) -> None:
        first, needed = self.datasets[0], max(self.drift_prompts, int(self.section("speculate").get("limit", 32)))
        if not (first.heldout_local or first.heldout_split or first.reserve):
            raise ValueError(f"dataset '{first.name}': drift and drafts are measured on its held-out rows; give "
                             "heldout_local, heldout_split (its test split) or reserve (rows held out of training)")
        if first.reserve and first.reserve < needed:
            raise ValueError(f"dataset '{first.name}': reserve {first.reserve} is fewer than the {needed} rows "
                             "drift_prompts / speculate.limit measure")

    def _check_variants(self) -> None:
        names = variant_names(self.prune_variants)
        for variant in self.prune_variants:
            stage_config(self, "prune", variant_settings(variant), **BY_NAME["prune"].fills)
        if self.recover_from and self.recover_from not in names:
            raise ValueError(f"recover_from '{self.recover_from}' is not a prune variant ({', '.join(names) or 'none'})")
        children = child_labels(self)
        unknown = [c for c in self.speculate_only if c not in children]
        if unknown:
            raise ValueError(f"speculate_only: '{unknown[0]}' is not a child of this run ({', '.join(children)})")

    def section(self, name: str) -> dict[str, Any]:
        return getattr(self, name)

    def resolved_arms(self) -> list[ArmSpec]:
        defaults = [d.name for d in self.datasets if d.train_by_default]
        return resolve_arms(self.arms, self.kd_weight, [d.name for d in self.datasets], defaults)


def _section_fields() -> list[tuple[str, Any, Any]]:
    """One YAML section per distinct `section` of the stage table: any field of that stage's config."""
    fields: dict[str, tuple[str, Any, Any]] = {}
    for stage in TABLE:
        if stage.yaml_section and stage.yaml_section not in fields:
            text = f"{stage.config} fields ({', '.join(stage.fills)} filled in by the run)"
            fields[stage.yaml_section] = (stage.yaml_section, dict[str, Any], opt(dict(stage.defaults), text))
    return list(fields.values())


PipelineConfig = dataclasses.make_dataclass("PipelineConfig", _section_fields(), bases=(_Settings,), frozen=True)
PipelineConfig.__module__ = __name__
PipelineConfig.__doc__ = "A whole run: the run's settings, then one section per stage of the stage table."


def stage_config(cfg: Any, name: str, overrides: dict[str, Any] | None = None, **io: Any) -> Any:
    """Stage `name`'s typed config in this run: its section, then `overrides` (a dataset's or an arm's), then
    the run's inputs and outputs `io` (which win)."""
    stage = BY_NAME[name]
    return section_config(stage, cfg.section(stage.yaml_section) if stage.yaml_section else {}, overrides, **io)


@dataclass
class _Steps:
    """What the step builders share: the config, the plan being laid out, and the resolved data sources."""

    cfg: Any
    plan: Plan
    sources: dict[str, str]
    data_dir: Path | None
    base: str = "pruned"  # the folder of the cut the arms fine-tune

    @property
    def root(self) -> Path:
        return self.plan.root

    def add(self, name: str, folder: str = "", overrides: dict[str, Any] | None = None, *, after: tuple[str, ...] = (),
            external: dict[str, str] | None = None, prepare: Any = None, **io: Any) -> str:
        step = Step(BY_NAME[name], folder or BY_NAME[name].folder, stage_config(self.cfg, name, overrides, **io),
                    after, external or {}, prepare)
        return self.plan.add(step)


def run(cfg: Any) -> dict[str, Any]:
    """Run (or resume) the whole method; returns the paths of the report and of every child."""
    data_dir = default_data_dir(cfg.data_dir)
    sources = {d.name: resolve_dataset(d, data_dir) for d in cfg.datasets}  # fail before any stage starts
    inputs = {"parent": cfg.parent, "data_dir": data_dir, **{f"dataset {k}": v for k, v in sources.items()}}
    refuse_overlap(cfg.run_dir, inputs, "--run-dir")  # the stages' own folders are checked again as they run
    # One `selfdistill run` per run directory (a second is refused, named), and never a folder of something else.
    with lock_run_dir(cfg.run_dir, cfg.overwrite) as claim:
        root = Path(cfg.run_dir)
        root.mkdir(parents=True, exist_ok=True)
        claim.commit()
        open_run_log(root)
        atomic_write_text(root / "config.yaml", dump_yaml(cfg))
        steps = _Steps(cfg, Plan(root, cfg.seed, cfg.from_stage), sources, data_dir)
        children = _method(steps)
        results = steps.plan.execute()
    _headline(root, results["report"])
    return {"run_dir": str(root), "children": children, **results["report"]}


def _method(s: _Steps) -> dict[str, str]:
    """The paper's method as the steps of one run; returns the children by label."""
    cfg = s.cfg
    evaluation = {"data_dir": str(s.data_dir or ""), "seed": cfg.seed}
    # 1-2. Prune: score blocks on the first dataset's text, remove the most redundant one.
    children = {cut_folder(""): _prune(s)}
    for variant in cfg.prune_variants:  # other blocks or repairs of the cut, each a child of its own
        children[cut_folder(variant["name"])] = _prune(s, variant)
    s.base = cut_folder(cfg.recover_from)
    # 3. Self-data distillation: the *unpruned* parent rewrites each dataset's answers, verified (those an arm reads).
    merging = cfg.merge_children and len(cfg.datasets) >= 2
    needed = {n for arm in cfg.resolved_arms() for n in arm.data} | {d.name for d in cfg.datasets[:2] if merging}
    distilled = {d.name: _distill(s, d) for d in cfg.datasets if d.name in needed}
    # 4. Recovery: one child per arm, all on the shared finetune section but for what the arm sets.
    for arm in cfg.resolved_arms():
        children[arm.name] = _finetune(s, arm, _training_file(s, arm, distilled), arm.data)
    # 5. Merge: one SDD child per dataset, SLERP-merged (the paper's merging of differently distilled children).
    if merging:
        children["merged"] = _merge(s, distilled, evaluation)
    made = tuple(Path(p).name for p in children.values())
    # The parent's own scores (cached by model hash and task, so the evaluation below reuses them). After the
    # children are made, so a run shows its cheap, informative steps (the cuts) first.
    s.add("parent-eval", model=[cfg.parent], baseline="", out=stage_dir(s.root, "parent-eval"), **evaluation)
    # 6. Every child against the parent: retention, chance-corrected, paired bootstrap.
    s.add("evaluate", model=list(children.values()), baseline=cfg.parent, out=stage_dir(s.root, "evaluate"),
          after=made, **evaluation)
    # 7-8. How far each child moved from its parent, and how well it drafts for it, on rows no arm trained on.
    _measure(s, children, made)
    # 9. Cost: parameters, FLOPs and latency of the parent and of the pruned shape (every child shares it).
    shapes = [cut_folder(""), *(cut_folder(v["name"]) for v in cfg.prune_variants if v.get("replace") == "ffn")]
    s.add("profile", model=[cfg.parent, *(children[c] for c in shapes)], out=stage_output(s.root, "profile"),
          after=tuple(shapes))
    # 10. One report over everything above.
    s.add("report", run_dir=str(s.root), after=tuple(s.plan.keys))
    return children


def _prune(s: _Steps, variant: dict[str, Any] | None = None) -> str:
    """The calibration text is the first dataset's, unless the prune section (or the variant) names other data."""
    first, local = s.cfg.datasets[0], _local_sources(s)
    section = {**s.cfg.section("prune"), **variant_settings(variant or {})}
    folder = cut_folder(variant["name"] if variant else "")
    return s.add("prune", folder, variant_settings(variant or {}), model=s.cfg.parent,
                 calibration=section.get("calibration") or s.sources[first.name],
                 recipe=section.get("recipe") or first.recipe, seed=s.cfg.seed, out=s.root / folder, external=local)


def _distill(s: _Steps, d: DatasetSpec) -> Path:
    out = stage_output(s.root, "distill", d.name)
    s.add("distill", out.parent.name, d.distill, teacher=s.cfg.parent, dataset=s.sources[d.name], recipe=d.recipe,
          limit=d.limit, offset=d.train_offset, split=d.split, subset=d.subset, seed=s.cfg.seed, out=out,
          external={d.name: s.sources[d.name]} if d.name in _local_sources(s) else {})
    return out


def _local_sources(s: _Steps) -> dict[str, str]:
    """The data sources that are files: their contents enter the keys of the stages that read them."""
    return {k: v for k, v in s.sources.items() if Path(v).is_file()}


def _training_file(s: _Steps, arm: ArmSpec, distilled: dict[str, Path]) -> tuple[Path, Any]:
    """The arm's training file, and how to write it once its datasets are distilled (None: a distill output)."""
    parts = {n: distilled[n] for n in arm.data}
    if len(parts) == 1 and arm.rows is None:
        return next(iter(parts.values())), None
    default = arm.data == [d.name for d in s.cfg.datasets if d.train_by_default]
    out = s.root / training_file_name(list(parts), arm.rows, default)
    return out, lambda: write_training_file(out, parts, arm.rows)


def _finetune(s: _Steps, arm: ArmSpec, data: tuple[Path, Any], datasets: list[str], suffix: str = "") -> str:
    (path, prepare), reads = data, tuple(stage_dir(s.root, "distill", n).name for n in datasets)
    kd = {"kd_weight": arm.kd_weight, "teacher": s.cfg.parent if arm.kd_weight > 0 else None}
    section = {**s.cfg.section("finetune"), **arm.finetune}
    cache = {}
    if arm.kd_weight > 0 and section.get("kd_cache"):
        # One cache per training file and answer column, shared by every KD arm on it; named by the distill
        # steps' keys so a redistilled dataset gets a fresh cache instead of a mismatch error.
        key = hashlib.sha256("".join(s.plan.keys[a] for a in reads).encode()).hexdigest()[:12]
        k, t = section.get("kd_top_k", 64), section.get("kd_temperature", 1.0)
        cache["kd_cache_dir"] = section.get("kd_cache_dir") or str(
            s.root / "kd-cache" / f"{path.stem}-{arm.responses}-k{k}-t{t:g}-{key}")
    folder = stage_dir(s.root, "finetune", f"{arm.name}{suffix}")
    return s.add("finetune", folder.name, arm.finetune | cache, after=(s.base, *reads), prepare=prepare,
                 model=s.root / s.base, data=path, responses=arm.responses, seed=s.cfg.seed, out=folder,
                 resume=True, restart=True, **kd)  # restart: checkpoints of another key start over


def _merge(s: _Steps, distilled: dict[str, Path], evaluation: dict[str, Any]) -> str:
    """The first two datasets' SDD children, merged; a t grid is scored on the reported evaluation's settings."""
    pair, sdd = s.cfg.datasets[:2], builtin_arms(s.cfg.kd_weight)["sdd"]
    per_data = [_finetune(s, sdd, (distilled[d.name], None), [d.name], suffix=f"-{d.name}") for d in pair]
    reported = stage_config(s.cfg, "evaluate", **evaluation, model=["-"], out="-")
    return s.add("merge", models=per_data, out=stage_dir(s.root, "merge"), eval_preset=reported.preset,
                 eval_tasks=list(reported.tasks), eval_limit=reported.limit, eval_seed=reported.seed,
                 eval_data_dir=reported.data_dir, after=tuple(Path(p).name for p in per_data))


def _measure(s: _Steps, children: dict[str, str], made: tuple[str, ...]) -> None:
    """Drift (in and out of the training domain) and, if asked, every child as a draft of the parent."""
    sets = measured_sets(s.cfg, s.data_dir)
    s.add("drift", parent=s.cfg.parent, children={Path(p).name: p for p in children.values()}, seed=s.cfg.seed,
          sets=[dataclasses.asdict(x) for x in sets], max_new_tokens=s.cfg.drift_max_new_tokens, after=made)
    if s.cfg.speculate_children:
        rows, only = sets[0], s.cfg.speculate_only
        drafts = [path for label, path in children.items() if not only or label in only]
        s.add("speculate", target=s.cfg.parent, draft=drafts, prompts=rows.source,
              recipe=rows.recipe, offset=rows.offset, split=rows.split, subset=rows.subset,
              out=stage_output(s.root, "speculate"), after=made)


def _headline(root: Path, report: dict[str, Any]) -> None:
    """Where the report is, and each child's retention as the evaluate stage scored it."""
    say("report: %s", report["report_md"])
    scores_file = stage_output(root, "evaluate")
    scores = json.loads(scores_file.read_text(encoding="utf-8")) if scores_file.is_file() else {}
    retention = [f"{Path(name).name} {fmt(m.get('retention'), unit=' %')}" for name, m in scores.get("models", {}).items()
                 if name != scores.get("baseline")]
    if retention:
        say("retention (child / parent average): %s", ", ".join(retention))
