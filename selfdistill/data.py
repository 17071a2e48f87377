"""Dataset recipes: rows of a local file or a hub dataset -> chat examples with a reference answer.

A recipe names the fields that hold the instruction, optional context and reference answer (and,
for math, the short final answer). Rows are read strictly: a malformed row is reported with its
file and line, and either stops the run (`on_bad_row="fail"`, the default) or is skipped.
"""

from __future__ import annotations

import bz2
import csv
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfdistill.errors import UserError
from selfdistill.paths import looks_like_hub_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    id: str
    messages: list[dict[str, str]]  # the training prompt: optional system turn + user turn
    reference: str  # the dataset's own answer
    final_answer: str | None = None  # short answer to verify against (math recipes)
    kind: str = "general"  # "math" | "general" | "text": picks rewrite template and verifier
    source: str = ""  # "file:line" for error messages

    @property
    def instruction(self) -> str:
        return self.messages[-1]["content"]


def _arc_row(row: dict[str, Any]) -> dict[str, Any]:
    q = row["question"]
    stem, choices = (q["stem"], q["choices"]) if isinstance(q, dict) else (q, row["choices"])
    if isinstance(choices, dict):  # HF layout: {"text": [...], "label": [...]}
        choices = [{"text": t, "label": lab} for t, lab in zip(choices["text"], choices["label"])]
    lines = [stem] + [f"{c['label']}. {c['text']}" for c in choices]
    answer = next((c["text"] for c in choices if c["label"] == row["answerKey"]), None)
    return {"question": "\n".join(lines), "answer": f"{row['answerKey']}. {answer}" if answer else None}


@dataclass(frozen=True)
class Recipe:
    """Which fields hold what; each tuple lists accepted field names, first match wins."""

    prompt: tuple[str, ...]
    response: tuple[str, ...]
    context: tuple[str, ...] = ()
    final_answer: tuple[str, ...] = ()
    kind: str = "general"
    convert: Callable[[dict[str, Any]], dict[str, Any]] | None = field(default=None, compare=False)


def _gsm8k_final(answer: str) -> str | None:
    """The number on GSM8K's last '#### n' line; None when the answer has none (then nothing can verify it)."""
    final = answer.split("####")[-1].strip().replace(",", "") if "####" in answer else ""
    return final if re.fullmatch(r"-?\d*\.?\d+", final) else None


RECIPES: dict[str, Recipe] = {
    "gsm8k": Recipe(prompt=("question",), response=("answer",), kind="math"),
    "dolly": Recipe(prompt=("instruction",), response=("response", "output"), context=("context", "input")),
    "alpaca": Recipe(prompt=("instruction",), response=("output", "response"), context=("input",)),
    "openmathinstruct": Recipe(prompt=("question", "problem"), response=("generated_solution",),
                               final_answer=("expected_answer",), kind="math"),
    "arc": Recipe(prompt=("question",), response=("answer",), convert=_arc_row),
    "text": Recipe(prompt=(), response=("text",), kind="text"),
}


def detect_recipe(row: dict[str, Any]) -> str:
    keys = set(row)
    if "text" in keys and len(keys & {"question", "instruction"}) == 0:
        return "text"
    if {"question", "generated_solution"} <= keys:
        return "openmathinstruct"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if "answerKey" in keys:
        return "arc"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    raise UserError(f"cannot tell the recipe from fields {sorted(keys)}; pass --recipe "
                    f"({', '.join(RECIPES)}) or a field mapping")


def generic_recipe(fields: dict[str, str], kind: str = "general") -> Recipe:
    """A recipe from a mapping like {"prompt": "q", "response": "a", "context": "c"}."""
    unknown = set(fields) - {"prompt", "response", "context", "final_answer"}
    if unknown or "response" not in fields:
        raise UserError("field mapping needs 'response' (and usually 'prompt'); allowed keys: "
                        "prompt, response, context, final_answer")
    return Recipe(**{k: (v,) for k, v in fields.items()}, kind=kind)


def read_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ("file:line", row) for JSONL / JSON / CSV / TSV / parquet files; a bad row is yielded as the
    UserError that names it, so the caller decides whether it stops the run."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.bz2")):
        yield from _jsonl_rows(path, bz2.open if name.endswith(".bz2") else open)
    elif name.endswith(".json"):
        yield from _json_rows(path)
    elif name.endswith((".csv", ".tsv")):
        yield from _csv_rows(path, "\t" if name.endswith(".tsv") else ",")
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path}: row {i}", row
    else:
        raise UserError(f"{path}: unsupported file type (use .jsonl, .json, .csv, .tsv or .parquet)")


def _jsonl_rows(path: Path, opener: Callable[..., Any]) -> Iterator[tuple[str, Any]]:
    with opener(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            where = f"{path}:{i}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield where, UserError(f"{where}: line is not valid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, UserError(f"{where}: invalid JSON ({e.msg})")
                continue
            yield where, row if isinstance(row, dict) else UserError(f"{where}: row is not an object")


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: file is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of objects")
    for i, row in enumerate(data, 1):
        where = f"{path}: row {i}"
        yield where, row if isinstance(row, dict) else UserError(f"{where}: row is not an object")


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            for i, row in enumerate(csv.DictReader(f, delimiter=delimiter), 2):  # line 1 is the header
                yield f"{path}:{i}", dict(row)
    except UnicodeDecodeError:
        raise UserError(f"{path}: file is not valid UTF-8") from None


def _read_hub(dataset_id: str, split: str, subset: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        from datasets import load_dataset

        ds = load_dataset(dataset_id, subset, split=split)
    except Exception as e:  # noqa: BLE001 - the hub raises many types; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"dataset '{dataset_id}' could not be loaded: {first}") from None
    for i, row in enumerate(ds, 1):
        yield f"{dataset_id}[{split}] row {i}", row


def _first_field(row: dict[str, Any], names: tuple[str, ...]) -> tuple[str | None, Any]:
    """The first of `names` that `row` has, and its value; (None, None) when it has none."""
    for name in names:
        if name in row:
            return name, row[name]
    return None, None


def _example(row: dict[str, Any], where: str, index: int, recipe: Recipe, name: str,
             system_prompt: str | None) -> Example:
    if recipe.convert is not None:
        try:
            row = recipe.convert(row)
        except (KeyError, TypeError) as e:
            raise UserError(f"{where}: missing field {e} (recipe {name})") from None
    texts, keys = {}, {}
    for part in ("prompt", "response", "context", "final_answer"):
        names = getattr(recipe, part)
        key, value = _first_field(row, names)
        keys[part] = key
        if key is None:
            if part in ("prompt", "response") and names:
                raise UserError(f"{where}: missing field '{names[0]}' (recipe {name})")
            continue
        if value is None or (isinstance(value, str) and not value.strip()):
            if part in ("prompt", "response"):
                raise UserError(f"{where}: field '{key}' is empty (recipe {name})")
            continue
        texts[part] = str(value).strip()
    user = texts.get("prompt", "")
    if "context" in texts:
        user = f"{user}\n\n{texts['context']}"  # SDFT: the context goes with the instruction
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        ([{"role": "user", "content": user}] if user else [])
    final = texts.get("final_answer")
    if final is None and name == "gsm8k":
        final = _gsm8k_final(texts["response"])
        if final is None:  # else the verifier would take any last number of the answer as its final answer
            raise UserError(f"{where}: field '{keys['response']}' has no '#### <number>' final-answer line "
                            "(recipe gsm8k)")
    row_id = row.get("id") or row.get("qID") or f"{name}-{index}"
    return Example(id=str(row_id), messages=messages, reference=texts["response"], final_answer=final,
                   kind=recipe.kind, source=where)


def load_examples(source: str | Path, recipe: str | None = None, *, fields: dict[str, str] | None = None,
                  limit: int | None = None, offset: int = 0, split: str = "train",
                  subset: str | None = None, on_bad_row: str = "fail",
                  system_prompt: str | None = None, skipped: list[str] | None = None) -> list[Example]:
    """Read up to `limit` examples (after skipping `offset` good rows) from a file or hub dataset.

    With `on_bad_row="skip"`, the error of each bad row passed over is appended to `skipped` (when given)."""
    if on_bad_row not in ("fail", "skip"):
        raise UserError(f"on_bad_row must be 'fail' or 'skip', not '{on_bad_row}'")
    if recipe is not None and recipe not in RECIPES and recipe != "generic":
        raise UserError(f"unknown recipe '{recipe}' (choose from {', '.join([*RECIPES, 'generic'])})")
    path = Path(str(source)).expanduser()
    if path.exists():
        if path.is_dir():
            raise UserError(f"{path} is a folder; give a data file (.jsonl, .json, .csv, .parquet)")
        rows = read_rows(path)
    elif looks_like_hub_dataset(source):
        rows = _read_hub(str(source), split, subset)
    else:
        raise UserError(f"dataset not found: {source}")

    chosen: Recipe | None = generic_recipe(fields) if fields else (RECIPES[recipe] if recipe and recipe != "generic" else None)
    if recipe == "generic" and not fields:
        raise UserError("recipe 'generic' needs a field mapping (e.g. prompt=question,response=answer)")
    name = recipe or ""
    examples: list[Example] = []
    bad = good = 0
    for index, (where, row) in enumerate(rows):
        try:
            if isinstance(row, UserError):
                raise row
            if chosen is None:
                name = detect_recipe(row)
                chosen = RECIPES[name]
            example = _example(row, where, index, chosen, name or "generic", system_prompt)
        except UserError as e:
            if on_bad_row == "fail":
                raise
            bad += 1
            if skipped is not None:
                skipped.append(str(e))
            log.warning("skipping bad row: %s", e)
            continue
        good += 1
        if good <= offset:
            continue
        examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    if bad:
        log.warning("skipped %d bad rows in %s", bad, source)
    if not examples:
        raise UserError(f"{source}: no usable rows")
    return examples


def render_text(example: Example, tokenizer: Any, chat_template: bool = True) -> str:
    """The example as one training/calibration text: the prompt followed by the reference answer."""
    if example.kind == "text":
        return example.reference
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [*example.messages, {"role": "assistant", "content": example.reference}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"{example.instruction}\n{example.reference}"


def prompt_text(messages: list[dict[str, str]], tokenizer: Any) -> str:
    """The prompt turns as the model sees them before answering: its chat template, else plain lines."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"
