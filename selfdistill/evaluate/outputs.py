"""Human-readable outputs of the evaluate stage: a Markdown table and a grouped bar chart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from selfdistill.plotting import error_bars, perplexity_point, pyplot, save_figure
from selfdistill.rundir import atomic_write_text
from selfdistill.tables import MISSING, fmt, fmt_perplexity, interval, markdown_table


def distinct_pairs(scores: dict[str, Any]) -> list[dict[str, Any]]:
    """The paired comparisons, without the 'signal' copy of each when every task has signal (same numbers)."""
    same = not scores.get("chance_tasks")
    return [p for p in scores.get("pairwise", []) if not (same and p.get("over") == "signal")]


def markdown(scores: dict[str, Any]) -> str:
    models, tasks = scores["models"], scores["tasks"]
    if not tasks:  # perplexity tasks only (e.g. --tasks wikitext): no accuracy table of dashes
        return perplexity_markdown(scores).lstrip("\n")
    flagged = set(scores.get("chance_tasks", []))
    head = ["model", *[t + (" ⚠" if t in flagged else "") for t in tasks], "average", "retention",
            "chance-corr.", "retention (signal)"]
    rows = []
    for name, m in models.items():
        row = [f"`{name}`"] + [f"{fmt(m['tasks'][t]['value'], 1, 100)} ± {fmt(m['tasks'][t]['stderr'], 1, 100)}"
                               if t in m["tasks"] else MISSING for t in tasks]
        rows.append(row + [fmt(m["average"], 1, 100), fmt(m.get("retention")), fmt(m.get("chance_corrected_retention")),
                           fmt(m.get("retention_signal"))])
    lines = markdown_table(head, rows)
    metrics = ", ".join(f"{t}: {scores['settings']['tasks'][t]['metric']} ({scores['settings']['tasks'][t]['shots']}-shot)"
                        for t in tasks)
    notes = [f"Scores in % (± one standard error over {scores['settings']['subset']}). Metrics: {metrics}."] if tasks else []
    if flagged:
        notes.append(f"⚠ parent within two standard errors of chance: {', '.join(sorted(flagged))}; "
                     "'retention (signal)' leaves these out.")
    for pair in distinct_pairs(scores):
        lo, hi = pair["ci95"]
        where = " over the tasks with signal" if pair.get("over") == "signal" else ""
        notes.append(f"Retention `{pair['a']}` − `{pair['b']}`{where}: {fmt(pair['retention_diff'])} points "
                     f"(paired bootstrap 95 % CI {interval((lo, hi), 1)}, {pair['iters']} draws).")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n" + perplexity_markdown(scores)


def perplexity_markdown(scores: dict[str, Any]) -> str:
    """The language-modelling tasks' perplexities and their retention (parent ppl / child ppl), a table apart."""
    tasks = scores.get("perplexity_tasks") or []
    if not tasks:
        return ""
    head = ["model"]
    for t in tasks:
        head += [f"{t} ({scores['settings']['tasks'][t]['perplexity'].partition(',')[0]})", f"{t} retention (95 % CI)"]
    rows = []
    for name, m in scores["models"].items():
        row = [f"`{name}`"]
        for t in tasks:
            ppl, ret = m.get("perplexity", {}).get(t, {}), m.get("perplexity_retention", {}).get(t)
            row += [fmt_perplexity(ppl.get("value")), f"{fmt(ret['retention'])} ({interval(ret['ci95'], 1)})" if ret else MISSING]
        rows.append(row)
    note = ("Perplexity (lower is better) over the documents scored; retention = parent perplexity / model perplexity "
            "× 100, with a paired bootstrap interval over documents. It is not averaged into the accuracy retention.")
    return "\n" + "\n".join(markdown_table(head, rows)) + "\n\n" + note + "\n"


def write_markdown(scores: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, markdown(scores))


def bar_chart(scores: dict[str, Any], path: Path) -> None:
    import numpy as np

    tasks, models = scores["tasks"], list(scores["models"])
    if not tasks:
        return _perplexity_chart(scores, path)
    plt = pyplot()
    x = np.arange(len(tasks))
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(tasks)), 4))
    for i, name in enumerate(models):
        m = scores["models"][name]["tasks"]
        vals = [m[t]["value"] * 100 if t in m else 0 for t in tasks]
        errs = [m[t]["stderr"] * 100 if t in m and math.isfinite(m[t]["stderr"]) else 0 for t in tasks]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, vals, width, yerr=errs, capsize=2, label=Path(name).name)
    first = scores["models"][models[0]]["tasks"] if models else {}
    for j, t in enumerate(tasks):  # chance level per task, as a short dashed line
        if t in first:
            ax.hlines(first[t]["chance"] * 100, j - 0.45, j + 0.45, colors="grey", linestyles="dashed", linewidth=1)
    ax.set_xticks(x, tasks, rotation=20)
    ax.set_ylabel("score (%)")
    ax.legend(fontsize=8)
    save_figure(plt, fig, ax, "lm-eval scores (dashed: chance)", path, dpi=120)


def _perplexity_chart(scores: dict[str, Any], path: Path) -> None:
    """With only language-modelling tasks: each model's perplexity retention per task, with its interval."""
    import numpy as np

    plt = pyplot()
    tasks, models = scores.get("perplexity_tasks") or [], list(scores["models"])
    x = np.arange(len(tasks))
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(tasks)), 4))
    for i, name in enumerate(models):
        points = [(t, *perplexity_point(scores["models"][name], t)) for t in tasks]
        points = [(t, v or 0.0, ci) for t, v, ci in points]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, [v for _, v, _ in points], width, yerr=error_bars(points),
               capsize=2, label=Path(name).name)
    ax.set_xticks(x, tasks)
    ax.set_ylabel("perplexity retention (%)")
    ax.legend(fontsize=8)
    save_figure(plt, fig, ax, "parent ppl / model ppl (95 % interval over documents)", path, dpi=120, title_size=10)
