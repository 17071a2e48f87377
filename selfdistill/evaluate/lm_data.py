"""Readers of the two language-modelling sets (LAMBADA, WikiText-2) in the offline layout of shared/data.

The evaluate stage runs them before it writes anything (`check_data_dir`), so a malformed file stops the run
with one line naming the file and row; the task loaders (tasks/sd_tasks.py) then read the same rows.
"""

from __future__ import annotations

import json
from pathlib import Path

from selfdistill.errors import UserError

LAMBADA = "lambada/lambada_test.jsonl"
WIKITEXT = "wikitext2/wiki.test.raw"


def lambada_rows(path: Path) -> list[dict[str, str]]:
    """The OpenAI LAMBADA test rows ({"text": ...}); each text needs a space, since its last word is the target."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read as UTF-8 text ({e})") from e
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not a JSON object ({e.msg})") from e
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or " " not in text.strip():
            raise UserError(f"{path}:{n}: field 'text' must be a string of at least two words")
        rows.append({"text": text})
    if not rows:
        raise UserError(f"{path}: holds no rows")
    return rows


def _is_article_heading(line: str) -> bool:
    """A top-level heading ` = Title = ` (sub-headings ` = = Section = = ` are not)."""
    rline = line.replace("= = =", "===").replace("= =", "==").strip()
    return rline.startswith("= ") and rline.endswith(" =")


def wikitext_pages(path: Path) -> list[dict[str, str]]:
    """WikiText raw test text split into articles as HF `EleutherAI/wikitext_document_level` (what lm-eval's
    `wikitext` task reads) splits it: a page starts at each top-level heading and holds the lines up to the
    next one, joined by newlines (the file is read in text mode, so CRLF line ends read as LF)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read as UTF-8 text ({e})") from e
    if not any(_is_article_heading(line) for line in lines):
        raise UserError(f"{path}: no article heading (a line ' = Title = '); not a WikiText raw file")
    pages, page = [], []
    for line in lines:
        if _is_article_heading(line):
            text = "\n".join(page)
            if text.strip():
                pages.append({"page": text})
            page = []
        page.append(line)
    pages.append({"page": "\n".join(page)})  # the last page is kept as the hub's loader keeps it
    return pages
