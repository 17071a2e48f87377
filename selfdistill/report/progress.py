"""How far a run directory got: which stage folders are finished, which started and did not finish.

A report is about children measured against their parent, so it needs the children's evaluation. Without
one the report would be a page of zero models, which reads like a result; `report` says what is missing
instead, unless `--partial` asks for what is there.
"""

from __future__ import annotations

import json
from pathlib import Path

from selfdistill.rundir import read_manifest
from selfdistill.stages import BY_NAME, stage_dir, stage_output

# The stages every run has, in order, up to the children's evaluation (distill, finetune and merge folders
# depend on the config and show up by their own folders once started).
_EXPECTED = ("parent-eval", "prune", "evaluate")
# What a started stage leaves in its folder before it finishes: `selfdistill run`'s key marker, or the output
# guard's record of the writing stage (selfdistill/guard.py); other folders are not a stage's.
_STARTED = (".stage_key", ".claim.json")


def _finished(folder: Path) -> bool:
    """A stage folder whose work is done: `selfdistill run` wrote its manifest with the stage's name, or the
    stage itself wrote its manifest (a stage run on its own into the run directory)."""
    manifest = read_manifest(folder)
    return bool(manifest) and ("stage" in manifest or "writer" in manifest)


def evaluated_children(run: Path) -> int:
    """The children in the evaluate stage's scores (0 when it has not finished)."""
    path = stage_output(run, "evaluate")
    if not path.is_file() or not _finished(path.parent):
        return 0
    scores = json.loads(path.read_text(encoding="utf-8"))
    return sum(name != scores.get("baseline") for name in scores.get("models", {}))


def stage_progress(run: Path) -> tuple[list[str], list[str]]:
    """(finished, incomplete) stage folders of the run; incomplete names a folder that started and did not
    finish, or a stage every run has whose folder does not exist yet ("not started")."""
    finished, incomplete = [], []
    # A fine-tuning arm's OUT.checkpoints/ (kept with keep_checkpoints) is part of its arm, not a stage.
    folders = {p.name: p for p in sorted(run.iterdir())
               if p.is_dir() and p.name != BY_NAME["report"].folder and not p.name.endswith(".checkpoints")}
    for name, folder in folders.items():
        if _finished(folder):
            finished.append(name)
        elif any((folder / marker).is_file() for marker in _STARTED):
            incomplete.append(f"{name} (unfinished)")
    for stage in _EXPECTED:
        if stage_dir(run, stage).name not in folders:
            incomplete.append(f"{stage_dir(run, stage).name} (not started)")
    return finished, incomplete


def missing_message(run: Path) -> str:
    """The one-line refusal of a report on a run with no evaluated child."""
    finished, incomplete = stage_progress(run)
    done = f"; finished: {', '.join(finished)}" if finished else ""
    return (f"{run}: no child has been evaluated yet (the evaluate stage has not finished); incomplete: "
            f"{', '.join(incomplete) or 'none'}{done}. Finish the run (`selfdistill run`), or pass --partial "
            "for a report of what is finished")
