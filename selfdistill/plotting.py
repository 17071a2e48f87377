"""Matplotlib plumbing shared by evaluate's charts and the report's plots: a display-free pyplot, an atomic
save, and interval error bars. It lives apart from both so neither package imports the other for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfdistill.rundir import atomic_path

Point = tuple[str, float, "list[float] | None"]  # (label, value, its 95 % interval or None)


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on a CPU box or a CI runner
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt: Any, fig: Any, ax: Any, title: str, path: Path, *, dpi: int = 110,
                title_size: float | None = None) -> Path:
    ax.set_title(title, fontsize=title_size)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return path


def error_bars(points: list[Point]) -> list[list[float]]:
    """Matplotlib's [below, above] distances from each value to its interval's ends (0 without one)."""
    return [[v - ci[0] if ci else 0.0 for _, v, ci in points], [ci[1] - v if ci else 0.0 for _, v, ci in points]]


def perplexity_point(model_scores: dict[str, Any], task: str) -> tuple[float | None, list[float] | None]:
    """One model's perplexity retention on a language-modelling task and its interval (None where missing)."""
    ret = (model_scores.get("perplexity_retention") or {}).get(task) or {}
    ci = ret.get("ci95")
    value = ret.get("retention")
    return (None if value is None else float(value)), (ci if ci and None not in ci else None)
