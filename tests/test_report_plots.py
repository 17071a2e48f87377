"""The report's retention plots and the per-child retention interval behind their error bars."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from selfdistill.evaluate.retention import paired_bootstrap, retention_interval
from selfdistill.report_plots import cost_plot, retention_plot, retention_points


def _docs(values: list[float]) -> dict[str, dict[int, float]]:
    return {"t": dict(enumerate(values))}


def test_retention_interval_is_paired_and_covers_the_estimate():
    rng = np.random.default_rng(0)
    parent = [float(x) for x in rng.integers(0, 2, 400)]
    assert retention_interval(_docs(parent), _docs(parent)) == [100.0, 100.0]  # same items, same draws
    child = [p if i % 4 else 0.0 for i, p in enumerate(parent)]  # a quarter of the parent's hits lost
    point = sum(child) / sum(parent) * 100
    lo, hi = retention_interval(_docs(child), _docs(parent), iters=500)
    assert lo < point < hi < 100.0
    unpaired_width = 2 * 1.96 * np.std(child) / np.sqrt(len(child)) / np.mean(parent) * 100
    assert hi - lo < unpaired_width  # pairing removes the shared item difficulty


def test_paired_bootstrap_still_gives_the_difference_of_two_children():
    parent, a, b = _docs([1.0] * 50 + [0.0] * 50), _docs([1.0] * 40 + [0.0] * 60), _docs([1.0] * 30 + [0.0] * 70)
    out = paired_bootstrap(a, b, parent, iters=300)
    assert abs(out["retention_diff"] - 20.0) < 1e-9 and out["ci95"][0] < 20.0 < out["ci95"][1]


def _scores(chance_tasks: list[str]) -> dict:
    models = {"parent": {"retention": 100.0},
              "runs/x/pruned": {"retention": 70.0, "retention_ci95": [65.0, 75.0], "retention_signal": 80.0,
                                "retention_signal_ci95": [74.0, 86.0]},
              "runs/x/sdd": {"retention": 85.0, "retention_ci95": [80.0, 90.0], "retention_signal": 88.0,
                             "retention_signal_ci95": [84.0, 92.0]}}
    return {"models": models, "baseline": "parent", "chance_tasks": chance_tasks,
            "signal_tasks": ["arc_easy"]}


def test_retention_plot_draws_one_bar_per_child_with_its_interval(tmp_path: Path):
    label = lambda name: Path(name).name  # noqa: E731
    assert retention_points(_scores([]), label) == [("pruned", 70.0, [65.0, 75.0]), ("sdd", 85.0, [80.0, 90.0])]
    # A task at chance: the bars show retention over the tasks with signal, once (not both bars side by side).
    assert retention_points(_scores(["winogrande"]), label) == [("pruned", 80.0, [74.0, 86.0]),
                                                                ("sdd", 88.0, [84.0, 92.0])]
    out = retention_plot(_scores(["winogrande"]), tmp_path / "retention.png", label)
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cost_plot(_scores([]), 0.27, 0.23, tmp_path / "cost.png", label).is_file()
    assert cost_plot(_scores([]), None, 0.23, tmp_path / "none.png", label) is None  # no parent reference
    assert retention_plot({"models": {}, "baseline": "parent"}, tmp_path / "empty.png", label) is None
