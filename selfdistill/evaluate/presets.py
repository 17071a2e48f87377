"""Evaluation presets: which lm-eval tasks, shots, headline metric and subset size per task.

`openllm-v1` is the Open LLM Leaderboard v1 suite with lm-eval's built-in (hub) tasks;
`openllm-v1-local` is the same suite on the offline copies (task YAMLs in `tasks/`); `cpu` is the
local suite plus ARC-Easy on fixed, seeded subsets sized so one 135M model takes <= 10 min on
2 cores before the language-modelling tasks, which add about as much again (docs/evaluate.md).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from selfdistill.errors import UserError
from selfdistill.evaluate.lm_data import LAMBADA, WIKITEXT, lambada_rows, wikitext_pages

TASKS_DIR = Path(__file__).parent / "tasks"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    task: str                 # lm-eval task name
    shots: int                # few-shot examples
    metric: str               # lm-eval result key, "metric,filter" ("": no accuracy, a perplexity task only)
    size: int | None = None   # seeded subset size (None: the whole split)
    files: tuple[str, ...] = ()  # files the task reads under the data directory
    local: bool = True        # True: one of our YAMLs in tasks/; False: lm-eval's built-in (hub data)
    perplexity: str = ""      # lm-eval's perplexity key of a language-modelling task ("": none)


_FILES = {
    "arc_easy": ("arc/ARC-Easy/ARC-Easy-Test.jsonl", "arc/ARC-Easy/ARC-Easy-Dev.jsonl"),
    "arc_challenge": ("arc/ARC-Challenge/ARC-Challenge-Test.jsonl", "arc/ARC-Challenge/ARC-Challenge-Dev.jsonl"),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2",),
    "mmlu": ("mmlu/test/abstract_algebra_test.csv", "mmlu/dev/abstract_algebra_dev.csv"),
    "truthfulqa_mc2": ("truthfulqa/v1/mc_task.json",),
    "winogrande": ("winogrande/dev.jsonl", "winogrande/train_l.jsonl"),
    "gsm8k": ("gsm8k/test.jsonl", "gsm8k/train.jsonl"),
    "lambada": (LAMBADA,),
    "wikitext": (WIKITEXT,),
}
# Leaderboard v1 shots and headline metrics (PAPER.md §4).
_OPENLLM = {
    "arc_challenge": (25, "acc_norm,none"), "hellaswag": (10, "acc_norm,none"), "mmlu": (5, "acc,none"),
    "truthfulqa_mc2": (0, "acc,none"), "winogrande": (5, "acc,none"), "gsm8k": (5, "exact_match,strict-match"),
}
# cpu: (shots, metric, items). Chosen from timings of the built-in model (docs/evaluate.md): fewer shots buy
# more items, which matters more at this scale; GSM8K uses flexible extraction because a 135M model
# rarely writes the `####` marker.
_CPU = {
    "arc_easy": (0, "acc_norm,none", 400), "arc_challenge": (0, "acc_norm,none", 300),
    "hellaswag": (0, "acc_norm,none", 300), "mmlu": (5, "acc,none", 150),
    "truthfulqa_mc2": (0, "acc,none", 40), "winogrande": (0, "acc,none", 400),
    "gsm8k": (5, "exact_match,flexible-extract", 30),
}
# General language-model damage, in both local presets, 0-shot as lm-eval defines them: LAMBADA's last-word
# accuracy joins the accuracy tasks; the perplexities get their own retention (evaluate/perplexity.py). `cpu`
# sizes: a LAMBADA item holds ~82 SmolLM2 tokens, one request each; a WikiText article ~4,700 on average, so the
# seeded 20 of the 62 are 78,781 tokens (22 windows of 8,192), together about 12 CPU-minutes (docs/evaluate.md).
_LM = {"lambada": ("acc,none", "perplexity,none", 500), "wikitext": ("", "word_perplexity,none", 20)}

PRESETS: dict[str, dict[str, TaskSpec]] = {
    "openllm-v1": {k: TaskSpec(k, s, m, local=False) for k, (s, m) in _OPENLLM.items()},
    "openllm-v1-local": {k: TaskSpec(f"sd_{k}", s, m, files=_FILES[k]) for k, (s, m) in _OPENLLM.items()}
    | {k: TaskSpec(f"sd_{k}", 0, m, files=_FILES[k], perplexity=p) for k, (m, p, _) in _LM.items()},
    "cpu": {k: TaskSpec(f"sd_{k}", s, m, n, files=_FILES[k]) for k, (s, m, n) in _CPU.items()}
    | {k: TaskSpec(f"sd_{k}", 0, m, n, files=_FILES[k], perplexity=p) for k, (m, p, n) in _LM.items()},
}


# Tasks a preset offers only when named (--tasks): the local OpenLLM v1 preset's default stays the six
# leaderboard tasks, so its average is the leaderboard's (and the paper's) average.
OPT_IN: dict[str, set[str]] = {"openllm-v1-local": set(_LM)}


def accuracy_tasks(specs: dict[str, TaskSpec]) -> list[str]:
    """The tasks scored by an accuracy (averaged into retention)."""
    return [t for t, s in specs.items() if s.metric]


def perplexity_tasks(specs: dict[str, TaskSpec]) -> list[str]:
    """The language-modelling tasks with a perplexity (their own retention, never averaged with accuracy)."""
    return [t for t, s in specs.items() if s.perplexity]


def select_tasks(preset: str, tasks: list[str] | None = None) -> dict[str, TaskSpec]:
    """The preset's tasks, or the named subset of them (short names such as `arc_easy`)."""
    if preset not in PRESETS:
        raise UserError(f"--preset: unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    table = PRESETS[preset]
    if not tasks:
        return {t: spec for t, spec in table.items() if t not in OPT_IN.get(preset, set())}
    unknown = [t for t in tasks if t not in table]
    if unknown:
        raise UserError(f"--tasks: unknown task '{unknown[0]}' for preset {preset} (choose from {', '.join(table)})")
    return {t: table[t] for t in tasks}


def check_data_dir(data_dir: Path | None, specs: dict[str, TaskSpec]) -> None:
    """Fail before any model runs if a local task's file is missing, naming the file."""
    needed = [f for spec in specs.values() if spec.local for f in spec.files]
    if not needed:
        return
    if data_dir is None:
        raise UserError("--data-dir: not set and neither $SELFDISTILL_DATA_DIR nor ../shared/data exists")
    if not data_dir.is_dir():
        raise UserError(f"--data-dir: {data_dir} is not a directory")
    for rel in needed:
        if not (data_dir / rel).is_file():
            raise UserError(f"--data-dir: {data_dir / rel} is missing (needed by the local tasks)")
    # The language-modelling files are parsed whole here (a second or less), so a malformed one stops the run
    # before any output exists, naming the file and row.
    if any(s.task == "sd_lambada" for s in specs.values()):
        lambada_rows(data_dir / LAMBADA)
    if any(s.task == "sd_wikitext" for s in specs.values()):
        wikitext_pages(data_dir / WIKITEXT)
    if any(s.task == "sd_mmlu" for s in specs.values()):
        tests = sorted(p.name[:-9] for p in (data_dir / "mmlu" / "test").glob("*_test.csv"))
        for subject in tests:
            if not (data_dir / "mmlu" / "dev" / f"{subject}_dev.csv").is_file():
                raise UserError(f"--data-dir: {data_dir / 'mmlu' / 'dev' / f'{subject}_dev.csv'} is missing")


def subset(n_docs: int, size: int | None, seed: int) -> list[int] | None:
    """A fixed, seeded, sorted subset of document indices (None: all documents)."""
    if size is None or size >= n_docs:
        return None
    return sorted(random.Random(seed).sample(range(n_docs), size))
