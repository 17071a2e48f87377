"""The report's two renderings of its blocks: Markdown beside the run, and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from selfdistill.report.measures import Block
from selfdistill.tables import markdown_table


def to_markdown(blocks: list[Block], out: Path) -> str:
    """The blocks as Markdown; images are linked relative to the report folder, which sits in the run dir."""
    lines = []
    for b in blocks:
        if b[0] in ("h1", "h2"):
            lines += [("# " if b[0] == "h1" else "## ") + b[1], ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "table":
            lines += [*markdown_table(b[1], b[2]), ""]
        elif b[0] == "img":
            rel = Path(b[1]).relative_to(out.parent) if Path(b[1]).is_relative_to(out.parent) else Path(b[1])
            lines += [f"![{b[2]}](../{rel})", ""]
    return "\n".join(lines)


def to_html(blocks: list[Block]) -> str:
    """The blocks as one self-contained HTML page: images are embedded, so the file can be mailed alone."""

    def md_inline(text: str) -> str:  # the only Markdown the paragraphs use: **bold**
        escaped = html.escape(text)
        parts = escaped.split("**")
        return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))

    body = []
    for b in blocks:
        if b[0] in ("h1", "h2"):
            body.append(f"<{b[0]}>{html.escape(b[1])}</{b[0]}>")
        elif b[0] == "p":
            body.append(f"<p>{md_inline(b[1])}</p>")
        elif b[0] == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b[0] == "img":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}"></figure>')
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
             "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>selfdistill report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
