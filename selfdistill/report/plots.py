"""The report's two plots: retention per child with its interval, and retention against cost.

Where the evaluation has language-modelling tasks, the retention plot shows each child's perplexity
retention (parent ppl / child ppl) as its own bar beside the accuracy retention.

Both read the evaluate stage's `scores.json` (each child's retention and its paired-bootstrap 95 %
interval against the parent) and, for cost, the profile stage's FLOPs per token. A plot is a
picture of a table the report already prints, so each returns None when there is nothing to draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfdistill.plotting import error_bars, perplexity_point, pyplot, save_figure


def retention_key(scores: dict[str, Any]) -> tuple[str, str]:
    """The retention the plots show: over the tasks with signal when some task sits at chance (a task at
    chance only adds noise), else over all tasks — one bar per child, not the same bar twice."""
    if scores.get("chance_tasks") and scores.get("signal_tasks"):
        return "retention_signal", "retention, tasks with signal"
    return "retention", "retention"


def retention_points(scores: dict[str, Any], label: Any) -> list[tuple[str, float, list[float] | None]]:
    """(label, retention, its 95 % interval or None) of every child: what both plots draw."""
    key, _ = retention_key(scores)
    out = []
    for name, m in scores.get("models", {}).items():
        if name == scores.get("baseline") or m.get(key) is None:
            continue
        ci = m.get(f"{key}_ci95")
        out.append((label(name), float(m[key]), ci if ci and None not in ci else None))
    return out


def perplexity_points(scores: dict[str, Any], task: str,
                      label: Any) -> list[tuple[str, float, list[float] | None]]:
    """(label, perplexity retention, its 95 % interval) of every child on one language-modelling task."""
    out = []
    for name, m in scores.get("models", {}).items():
        value, ci = perplexity_point(m, task)
        if name != scores.get("baseline") and value is not None:
            out.append((label(name), value, ci))
    return out


def retention_series(scores: dict[str, Any], label: Any) -> list[tuple[str, list[tuple[str, float, Any]]]]:
    """What the retention plot draws: the accuracy retention, then each perplexity retention beside it (its
    own bar, never averaged in), as (legend, points) with at least one point."""
    _, title = retention_key(scores)
    series = [(f"accuracy {title}", retention_points(scores, label))]
    series += [(f"{t} perplexity retention", perplexity_points(scores, t, label))
               for t in scores.get("perplexity_tasks") or []]
    return [(name, points) for name, points in series if points]


def retention_plot(scores: dict[str, Any], out: Path, label: Any) -> Path | None:
    """Bars of each child's retention with its 95 % interval, and beside it each perplexity retention
    (parent ppl / child ppl); the parent is the 100 % line."""
    series = retention_series(scores, label)
    if not series:
        return None
    plt = pyplot()
    children = list(dict.fromkeys(n for _, points in series for n, _, _ in points))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(children) * len(series) ** 0.5 + 2), 3.2))
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    top = 105.0
    for k, (name, points) in enumerate(series):
        xs = [children.index(n) + (k - (len(series) - 1) / 2) * width for n, _, _ in points]
        ax.bar(xs, [v for _, v, _ in points], width * 0.9, color=colors[k % len(colors)], yerr=error_bars(points),
               capsize=3, error_kw={"elinewidth": 1, "ecolor": "#333333"}, label=name if len(series) > 1 else None)
        top = max(top, *((ci[1] if ci else v) + 5 for _, v, ci in points))
    ax.axhline(100, color="grey", linewidth=0.8, linestyle="--", label="parent")
    ax.set_xticks(range(len(children)))
    ax.set_xticklabels(children, rotation=30 if len(children) > 4 else 0, ha="right"
                       if len(children) > 4 else "center", fontsize=8)
    ax.set_ylabel("% of parent (95 % interval)")
    ax.set_ylim(0, top)
    ax.legend(fontsize=7, loc="lower right")
    title = series[0][0].partition(" ")[2] if len(series) == 1 else "retention: accuracy and perplexity"
    return save_figure(plt, fig, ax, title.capitalize() + " per child", out)


def cost_plot(scores: dict[str, Any], parent_flops: float | None, child_flops: float | None, out: Path,
              label: Any) -> Path | None:
    """Retention (with its interval) against GFLOPs per token; the parent is the reference point at 100 %.

    Every child of one run has the pruned shape, so they share `child_flops`; each is placed slightly
    apart so that their intervals stay readable."""
    points = retention_points(scores, label)
    if not points or not parent_flops or not child_flops:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.scatter([parent_flops], [100], marker="*", s=120, color="black", zorder=3)
    ax.annotate("parent", (parent_flops, 100), textcoords="offset points", xytext=(5, 4), fontsize=8)
    step = 0.01 * parent_flops
    for i, (name, value, ci) in enumerate(points):
        x = child_flops + (i - (len(points) - 1) / 2) * step
        ax.errorbar([x], [value], yerr=error_bars([(name, value, ci)]), fmt="o", capsize=3, markersize=4)
        ax.annotate(name, (x, value), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.axhline(100, color="grey", linewidth=0.6, linestyle="--")
    ax.margins(x=0.12)  # room for the labels at both ends
    ax.set_xlabel("GFLOPs per token (2 × parameters)")
    ax.set_ylabel("retention, % of parent")
    return save_figure(plt, fig, ax, "Retention vs cost", out)
