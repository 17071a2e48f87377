"""The report's data-size curve: retention against training rows for arms that differ only in `rows`.

A study that runs, say, SFT and SDD at 100, 300 and 900 rows (arms `sft-50`, `sft-150`, `sft`, ...) asks
whether more (distilled) data keeps helping. The arms come from the run's resolved config.yaml; two arms
belong to one curve when everything but `rows` is the same (answers, datasets, KD weight, overrides). The
x value is the rows the arm actually trained on (its result.json), the y value its retention with the
paired-bootstrap interval the evaluate stage gave it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from selfdistill.arms import resolve_arms
from selfdistill.plotting import error_bars, pyplot, save_figure
from selfdistill.report.plots import retention_points
from selfdistill.tables import fmt, interval

Point = tuple[int, float, list[float] | None]  # rows trained on, retention, its 95 % interval


def size_curves(run: Path, scores: dict[str, Any], label: Any) -> dict[str, list[Point]]:
    """{curve label: points sorted by rows}, only curves with two or more distinct row counts."""
    config = run / "config.yaml"
    if not config.is_file():
        return {}
    cfg = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    names = [d["name"] for d in cfg.get("datasets", []) if isinstance(d, dict) and "name" in d]
    defaults = [d["name"] for d in cfg.get("datasets", []) if d.get("train_by_default", True)]
    try:
        arms = resolve_arms(cfg.get("arms", []), float(cfg.get("kd_weight", 0.0)), names, defaults)
    except ValueError:
        return {}  # a config the pipeline would refuse has no arms to draw
    retention = {name: (value, ci) for name, value, ci in retention_points(scores, label)}
    groups: dict[str, list[tuple[str, Point]]] = {}
    for arm in arms:
        result = run / arm.name / "result.json"
        if not result.is_file() or arm.name not in retention:
            continue
        rows = int(json.loads(result.read_text(encoding="utf-8"))["rows"])
        same = json.dumps([arm.responses, arm.data, arm.kd_weight, arm.finetune], sort_keys=True)
        groups.setdefault(same, []).append((arm.name, (rows, *retention[arm.name])))
    curves = {}
    for members in groups.values():
        if len({p[0] for _, p in members}) < 2:
            continue
        members.sort(key=lambda m: m[1][0])
        curves[members[-1][0]] = [p for _, p in members]  # named after its largest arm (sft, sdd, ...)
    return curves


def size_plot(curves: dict[str, list[Point]], out: Path, unhealed: float | None) -> Path | None:
    """One line per curve with its intervals, rows on a log axis; the unhealed child as a dashed line."""
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for i, (name, points) in enumerate(curves.items()):
        shift = 1 + 0.03 * (i - (len(curves) - 1) / 2)  # side by side, so the intervals stay readable
        xs = [rows * shift for rows, _, _ in points]
        bars = error_bars([(str(r), v, ci) for r, v, ci in points])
        ax.errorbar(xs, [v for _, v, _ in points], yerr=bars, fmt="o-", capsize=3, markersize=4, label=name)
    if unhealed is not None:
        ax.axhline(unhealed, color="grey", linewidth=0.8, linestyle="--", label="pruned, no recovery")
    ax.set_xscale("log")
    ax.set_xlabel("training rows")
    ax.set_ylabel("retention, % of parent (95 % interval)")
    ax.legend(fontsize=8)
    return save_figure(plt, fig, ax, "Retention vs training rows", out)


def size_blocks(run: Path, out: Path, scores: dict[str, Any], pruned: str, label: Any) -> list[Any]:
    """The curve as a table and its plot; `pruned` is the unhealed child's label, drawn as the floor."""
    curves = size_curves(run, scores, label)
    if not curves:
        return []
    floor = next((value for name, value, _ in retention_points(scores, label) if name == pruned), None)
    rows = [[name, f"{r:,}", fmt(v), interval(ci, 1)] for name, points in curves.items() for r, v, ci in points]
    blocks: list[Any] = [("h2", "Data-size curve"), ("p", "Arms that differ only in the number of training rows, "
                          "named after their largest arm; retention with its paired-bootstrap 95 % interval."),
                         ("table", ["curve", "rows", "retention", "95 % interval"], rows)]
    path = size_plot(curves, out / "retention_vs_rows.png", floor)
    return blocks + ([("img", path, "Retention vs training rows")] if path else [])
