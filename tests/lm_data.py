"""A small copy of the language-modelling data (real LAMBADA rows, a short WikiText file) for fast tests."""

from __future__ import annotations

import json
from pathlib import Path

LAMBADA_ROWS = 6


def _articles(data_dir: Path, n: int, lines_each: int) -> list[list[str]]:
    """The first `n` articles of the real WikiText-2 test file, each cut to its heading and a few lines
    (sub-headings such as ' = = Career = = ' included: they must not start a page)."""
    lines = (data_dir / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").split("\n")
    heads = [i for i, line in enumerate(lines) if line.startswith(" = ") and not line.startswith(" = = ")]
    return [lines[h:h + 1 + lines_each] for h in heads[:n]]


def write_small_lm_data(root: Path, data_dir: Path, articles: int = 3,
                        lines_each: int = 4) -> tuple[list[dict], list[dict]]:
    """LAMBADA and WikiText files under `root` laid out as shared/data (WikiText with CRLF, as the shared copy),
    and the documents lm-eval's hub data sets hold for them: LAMBADA's `text` rows, WikiText's `page`s."""
    (root / "lambada").mkdir(parents=True, exist_ok=True)
    (root / "wikitext2").mkdir(parents=True, exist_ok=True)
    rows = (data_dir / "lambada" / "lambada_test.jsonl").read_text(encoding="utf-8").splitlines()[:LAMBADA_ROWS]
    (root / "lambada" / "lambada_test.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    chosen = _articles(data_dir, articles, lines_each)
    raw = "\r\n".join(line for article in chosen for line in article)
    (root / "wikitext2" / "wiki.test.raw").write_bytes(raw.encode("utf-8"))
    return [json.loads(r) for r in rows], [{"page": "\n".join(article)} for article in chosen]
