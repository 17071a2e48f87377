"""The stage table of `selfdistill run`, and the bookkeeping that runs a stage at most once per config.

One row per stage: its name (a `--from` choice), where its config class and function live, the section
of the pipeline YAML that configures it, the fields the run fills in, its folder in the run directory,
the file in that folder that later stages read, the stages it reads, and the config fields it reads from
(which its output may never overlap). The pipeline's config sections
and their validation, the `--from` choices, the run-directory paths and what `selfdistill report` reads
all follow from it. Adding a stage is one row here, one module, and one step in `pipeline._method`.

A stage is complete when its folder's `manifest.json` carries its stage key: a hash of its config and of
the keys of the stage folders it reads, so a changed config reruns that stage and everything downstream.

This module imports no stage (they load when a row's `load` is called), so `report` can use the paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfdistill.config import from_dict, to_dict
from selfdistill.console import duration, say
from selfdistill.overlap import refuse_overlap
from selfdistill.rundir import atomic_write_json, hash_path, read_manifest, write_manifest


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # holds the config class and the stage function
    config: str
    function: str
    folder: str  # in the run directory; "{}" is the instance: a dataset (distill) or an arm (finetune)
    fills: dict[str, Any]  # fields the run sets, with placeholders: a YAML section is validated before the run
    reads: tuple[str, ...] = ()  # stages whose folders it reads; their keys are part of its key
    output: str = ""  # the file in the folder that later stages and the report read ("" = the folder)
    section: str | None = "="  # its section of the pipeline YAML: "=" its own name, None none
    defaults: dict[str, Any] = field(default_factory=dict)  # the section's defaults
    command: str = ""  # the help line of its `selfdistill <name>` command ("" = run only within `selfdistill run`)
    inputs: tuple[str, ...] = ()  # config fields naming what it reads (models, data, caches): never its `out`

    @property
    def yaml_section(self) -> str | None:
        return self.name if self.section == "=" else self.section

    def load(self) -> tuple[type, Callable[[Any], Any]]:
        module = importlib.import_module(self.module)
        return getattr(module, self.config), getattr(module, self.function)


CHILDREN = ("prune", "finetune", "merge")  # the stages that make children

TABLE: tuple[Stage, ...] = (
    Stage("parent-eval", "selfdistill.evaluate", "EvalConfig", "evaluate", "parent-eval",
          {"model": ["-"], "baseline": "", "out": "-"}, section="evaluate", output="scores.json",
          inputs=("model", "baseline", "data_dir")),
    Stage("prune", "selfdistill.prune", "PruneConfig", "prune", "pruned", {"model": "-", "out": "-"},
          output="pruning.json", defaults={"num_layers": 6},
          command="score blocks of layers and remove the most redundant one", inputs=("model", "calibration")),
    Stage("distill", "selfdistill.distill", "DistillConfig", "distill", "distill-{}",
          {"teacher": "-", "dataset": "-", "out": "-"}, output="distilled.jsonl",
          command="let the parent rewrite a dataset's answers, verified", inputs=("teacher", "dataset")),
    Stage("finetune", "selfdistill.finetune", "FinetuneConfig", "finetune", "{}",
          {"model": "-", "data": "-", "out": "-"}, reads=("prune", "distill"),
          command="recover a pruned child with LoRA, partial or full fine-tuning",
          inputs=("model", "data", "teacher", "kd_cache_dir")),
    Stage("merge", "selfdistill.merge", "MergeConfig", "merge", "merged", {"models": ["-", "-"], "out": "-"},
          reads=("finetune",), command="SLERP/linear merge of two children", inputs=("models", "eval_data_dir")),
    Stage("evaluate", "selfdistill.evaluate", "EvalConfig", "evaluate", "evaluate",
          {"model": ["-"], "baseline": "-", "out": "-"}, reads=CHILDREN, output="scores.json",
          command="score models with lm-evaluation-harness; retention", inputs=("model", "baseline", "data_dir")),
    Stage("drift", "selfdistill.evaluate.drift", "DriftConfig", "run_drift", "drift",
          {"parent": "-", "children": {"-": "-"}, "sets": []}, reads=CHILDREN, output="result.json"),
    Stage("speculate", "selfdistill.speculative", "SpeculateConfig", "speculate", "speculate",
          {"target": "-", "draft": ["-"], "prompts": "-", "out": "-"}, reads=CHILDREN, output="speculate.json",
          command="children as speculative drafts of the parent", inputs=("target", "draft", "prompts")),
    Stage("profile", "selfdistill.profile", "ProfileConfig", "profile", "profile", {"model": ["-"], "out": "-"},
          reads=("prune",), output="profile.json", command="parameters, FLOPs per token and latency",
          inputs=("model",)),
    Stage("report", "selfdistill.report", "ReportConfig", "report", "report", {"run_dir": "-"},
          reads=("parent-eval", "prune", "distill", "finetune", "merge", "evaluate", "drift", "speculate", "profile"),
          section=None, output="report.md", command="write report.md / report.html for a run directory"),
)
BY_NAME = {s.name: s for s in TABLE}
NAMES = tuple(BY_NAME)


def check_apart(stage: Stage, config: Any) -> None:
    """Refuse a config whose `out` is, contains or lies inside one of the stage's inputs (overlap.py)."""
    out = getattr(config, "out", "")
    if out:
        refuse_overlap(out, {"--" + name.replace("_", "-"): getattr(config, name) for name in stage.inputs})


def stage_dir(run: str | Path, name: str, instance: str = "") -> Path:
    """The folder of stage `name` (for distill a dataset, for finetune an arm) in the run directory."""
    return Path(run) / BY_NAME[name].folder.format(instance)


def stage_output(run: str | Path, name: str, instance: str = "") -> Path:
    """The file of stage `name` that later stages and the report read."""
    folder, output = stage_dir(run, name, instance), BY_NAME[name].output
    return folder / output if output else folder


def distill_dir(run: str | Path, dataset: str) -> Path:
    return stage_dir(run, "distill", dataset)


def distill_dirs(run: str | Path) -> dict[str, Path]:
    """The distill folders of a run directory, by dataset name."""
    prefix, suffix = BY_NAME["distill"].folder.split("{}")
    return {p.name[len(prefix):len(p.name) - len(suffix)]: p for p in sorted(Path(run).glob(f"{prefix}*{suffix}"))
            if p.is_dir()}


def section_config(stage: Stage, section: dict[str, Any], overrides: dict[str, Any] | None = None,
                   **io: Any) -> Any:
    """The stage's typed config: its YAML section, then a dataset's or an arm's overrides of it, then the
    run's inputs and outputs (which win)."""
    cls, _ = stage.load()
    data = {**section, **(overrides or {}), **{k: (str(v) if isinstance(v, Path) else v) for k, v in io.items()}}
    return from_dict(cls, data, prefix=f"{stage.yaml_section or stage.name}.")


def key_config(config: Any) -> dict[str, Any]:
    """The config as it enters a stage key: every field but those marked `keyed=False` (how to treat an
    existing output, e.g. `overwrite`, which changes no result)."""
    plain = to_dict(config)
    for f in dataclasses.fields(config):
        if not f.metadata.get("keyed", True):
            del plain[f.name]
    return plain


@dataclass(frozen=True)
class Step:
    """One stage instance of a run: its folder, its config and what it reads."""

    stage: Stage
    folder: str
    config: Any
    after: tuple[str, ...] = ()  # folders of the steps it reads
    external: dict[str, str] = field(default_factory=dict)  # input files outside the run directory, hashed
    prepare: Callable[[], None] | None = None  # assembles an input from upstream outputs (a combined data file)


class Plan:
    """The steps of a run in order, each with its stage key; `execute` runs those that are not complete."""

    def __init__(self, root: str | Path, seed: int, from_stage: str | None = None):
        self.root, self.seed, self.steps, self.keys = Path(root), seed, [], {}
        self.forced_from = NAMES.index(from_stage) if from_stage else None

    def add(self, step: Step) -> str:
        """Add `step`; returns its folder. Its key is known now: a pure function of config and upstream keys."""
        for folder in step.after:
            upstream = next(s.stage.name for s in self.steps if s.folder == folder)
            assert upstream in step.stage.reads, f"{step.stage.name} reads {upstream}, not in its row's reads"
        payload = {"config": key_config(step.config), "after": [self.keys[a] for a in step.after],
                   "external": {k: hash_path(v) for k, v in step.external.items()}}
        self.keys[step.folder] = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.steps.append(step)
        return str(self.root / step.folder)

    def execute(self) -> dict[str, Any]:
        """Run the steps in order; returns every step's result by folder."""
        results = {}
        for i, step in enumerate(self.steps, 1):
            results[step.folder] = self._run(step, f"[{i}/{len(self.steps)}] {step.folder}")
        return results

    def _run(self, step: Step, label: str) -> Any:
        folder, key = self.root / step.folder, self.keys[step.folder]
        forced = self.forced_from is not None and NAMES.index(step.stage.name) >= self.forced_from
        manifest = read_manifest(folder)
        if manifest and manifest.get("stage_key") == key and not forced and (folder / "result.json").is_file():
            say("%s skipped (complete)", label)
            return json.loads((folder / "result.json").read_text())
        check_apart(step.stage, step.config)  # before a stale folder is removed: it may be what the step reads
        marker = folder / ".stage_key"
        if forced or manifest or (marker.is_file() and marker.read_text() != key):
            shutil.rmtree(folder, ignore_errors=True)  # outputs of another config: never resume from them
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(key)  # a half-finished folder of this key is resumed (distill rows, checkpoints)
        say("%s ...", label)
        started = time.time()
        if step.prepare is not None:
            step.prepare()
        result = step.stage.load()[1](step.config)
        atomic_write_json(folder / "result.json", result)
        own = read_manifest(folder) or {}  # the stage's own manifest, kept inside the run's
        write_manifest(folder, config=key_config(step.config), inputs=step.external, seed=self.seed, started=started,
                       extra={"stage": step.stage.name, "stage_key": key, "after": list(step.after),
                              **({"stage_manifest": own} if own else {})})
        say("%s done in %s", label, duration(time.time() - started))
        return result
