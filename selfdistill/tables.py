"""Numbers as table cells and Markdown tables: one spelling for every report, table and summary we write.

At the bottom of the package (it imports nothing of ours): the stages' own `.md` tables and the run report
format a missing number, a percentage or an interval the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

MISSING = "–"


def fmt(x: Any, digits: int = 1, scale: float = 1.0, unit: str = "") -> str:
    """A number for a table cell (`x * scale`, `digits` decimals, then `unit`); '–' when missing or not finite."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return MISSING
    return f"{x * scale:.{digits}f}{unit}"


def fmt_perplexity(x: Any) -> str:
    """A perplexity: two decimals where they matter (a good model's 10-30), whole numbers with thousands
    separators up to a million, then 3 significant digits (a broken child's 10^12 is one number, not 16 digits)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return MISSING
    return f"{x:.2f}" if x < 1000 else f"{x:,.0f}" if x < 1e6 else f"{x:.3g}"


def interval(ci: Sequence[float] | None, digits: int = 3, scale: float = 1.0) -> str:
    """A 95 % interval as `lo … hi`; '–' when there is none."""
    return f"{fmt(ci[0], digits, scale)} … {fmt(ci[1], digits, scale)}" if ci else MISSING


def markdown_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> list[str]:
    """The lines of a Markdown table (no trailing blank line)."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]
