"""Loaders and helpers referenced (`!function sd_tasks.x`) by the offline lm-eval task YAMLs here.

Each loader reads the offline copy laid out as shared/data (see its README) and returns a
`datasets.DatasetDict` shaped like the hub data set lm-eval's own task expects, so the YAMLs can
keep lm-eval's prompts and metrics unchanged. lm-eval passes the task metadata as keyword
arguments; `data_dir` comes from `TaskManager(metadata={"data_dir": ...})`.
"""

from __future__ import annotations

import bz2
import csv
import json
import re
from pathlib import Path
from typing import Any

import datasets
from lm_eval.tasks.truthfulqa.utils import process_results_mc2  # noqa: F401  (used by the mc2 YAML)
from lm_eval.tasks.wikitext.preprocess_wikitext import (  # noqa: F401  (used by the wikitext YAML)
    process_results,
    wikitext_detokenizer,
)
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401  (used by the winogrande YAML)
    doc_to_choice,
    doc_to_target,
    doc_to_text,
)

from selfdistill.evaluate.lm_data import LAMBADA, WIKITEXT, lambada_rows, wikitext_pages


def _root(kwargs: dict[str, Any]) -> Path:
    if not kwargs.get("data_dir"):
        raise ValueError("local lm-eval tasks need metadata data_dir (selfdistill evaluate --data-dir)")
    return Path(kwargs["data_dir"])


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _arc_rows(path: Path) -> list[dict[str, Any]]:
    """Original ARC jsonl -> the HF `allenai/ai2_arc` row layout lm-eval's arc YAML reads."""
    rows = []
    for r in _jsonl(path):
        choices = r["question"]["choices"]
        rows.append({"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                     "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}})
    return rows


def _arc(kwargs: dict[str, Any], name: str) -> datasets.DatasetDict:
    base = _root(kwargs) / "arc" / name
    # ARC train is not in the offline copy: the dev (validation) split serves the few-shot examples.
    return datasets.DatasetDict({
        "validation": datasets.Dataset.from_list(_arc_rows(base / f"{name}-Dev.jsonl")),
        "test": datasets.Dataset.from_list(_arc_rows(base / f"{name}-Test.jsonl")),
    })


def load_arc_easy(**kwargs: Any) -> datasets.DatasetDict:
    return _arc(kwargs, "ARC-Easy")


def load_arc_challenge(**kwargs: Any) -> datasets.DatasetDict:
    return _arc(kwargs, "ARC-Challenge")


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval's hellaswag/utils.py `preprocess`, verbatim.
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _capitalize_last_clause(ctx: str) -> str:
    """The text form joins ctx_a and ctx_b; lm-eval capitalizes ctx_b. Its split point is lost, so
    capitalize the first letter after the last sentence end (where ctx_b starts in almost all rows)."""
    starts = [m.start(1) for m in re.finditer(r"[.!?] (\w)", ctx)]
    if not starts:
        return ctx
    i = starts[-1]
    return ctx[:i] + ctx[i].upper() + ctx[i + 1:]


def load_hellaswag(**kwargs: Any) -> datasets.DatasetDict:
    """The llama.cpp 6-line text form (context, gold label, 4 endings) -> lm-eval's processed docs."""
    with bz2.open(_root(kwargs) / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = []
    for i in range(0, len(lines) - 5, 6):
        ctx, label, endings = lines[i], lines[i + 1], lines[i + 2:i + 6]
        rows.append({"query": _hellaswag_preprocess(_capitalize_last_clause(ctx)),
                     "choices": [_hellaswag_preprocess(e) for e in endings], "label": int(label)})
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def _mmlu_rows(path: Path, subject: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8", newline="") as f:  # header: question,choice0..choice3,answer (index 0-3)
        return [{"subject": subject, "question": r["question"], "answer": int(r["answer"]),
                 "choices": [r[f"choice{k}"] for k in range(4)]} for r in csv.DictReader(f)]


def load_mmlu(subject: str = "", **kwargs: Any) -> datasets.DatasetDict:
    """One subject's dev (shots) and test rows, as `cais/mmlu/<subject>` (task YAMLs sd_mmlu_<subject>)."""
    if not subject:
        raise ValueError("sd_mmlu tasks need dataset_kwargs.subject (see scripts/make_mmlu_tasks.py)")
    root = _root(kwargs) / "mmlu"
    return datasets.DatasetDict({split: datasets.Dataset.from_list(_mmlu_rows(root / split / f"{subject}_{split}.csv",
                                                                             subject))
                                 for split in ("dev", "test")})


def _targets(d: dict[str, int]) -> dict[str, list]:
    return {"choices": list(d), "labels": [int(v) for v in d.values()]}


def load_truthfulqa(**kwargs: Any) -> datasets.DatasetDict:
    """v1/mc_task.json (answer -> 0/1 dicts) -> HF `truthful_qa/multiple_choice` rows."""
    with open(_root(kwargs) / "truthfulqa" / "v1" / "mc_task.json", encoding="utf-8") as f:
        raw = json.load(f)
    rows = [{"question": r["question"], "mc1_targets": _targets(r["mc1_targets"]),
             "mc2_targets": _targets(r["mc2_targets"])} for r in raw]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def _winogrande_rows(path: Path) -> list[dict[str, Any]]:
    rows = _jsonl(path)
    labels = path.with_name(path.stem + "-labels.lst")
    if labels.is_file():  # the labels file is authoritative where the jsonl lacks `answer`
        for row, label in zip(rows, labels.read_text().split(), strict=True):
            row["answer"] = label
    return [{k: r[k] for k in ("sentence", "option1", "option2", "answer")} for r in rows]


def load_winogrande(**kwargs: Any) -> datasets.DatasetDict:
    # lm-eval draws shots from train_xl (not here); train_l is the largest offline training size.
    root = _root(kwargs) / "winogrande"
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(_winogrande_rows(root / "train_l.jsonl")),
                                 "validation": datasets.Dataset.from_list(_winogrande_rows(root / "dev.jsonl"))})


def load_gsm8k(**kwargs: Any) -> datasets.DatasetDict:
    root = _root(kwargs) / "gsm8k"
    return datasets.DatasetDict({split: datasets.Dataset.from_list(_jsonl(root / f"{split}.jsonl"))
                                 for split in ("train", "test")})


def load_lambada(**kwargs: Any) -> datasets.DatasetDict:
    """OpenAI's LAMBADA test (`EleutherAI/lambada_openai`, config default: one field `text`)."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(lambada_rows(_root(kwargs) / LAMBADA))})


def load_wikitext(**kwargs: Any) -> datasets.DatasetDict:
    """WikiText-2 raw test as `EleutherAI/wikitext_document_level` pages (one field `page`)."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(wikitext_pages(_root(kwargs) / WIKITEXT))})
