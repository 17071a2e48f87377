"""The report's retention plots and the per-child retention interval behind their error bars."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from selfdistill.evaluate.retention import paired_bootstrap, retention_interval
from selfdistill.report.plots import cost_plot, retention_plot, retention_points


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


def _name(model: str) -> str:
    return Path(model).name


def _study_run(tmp_path: Path) -> tuple[Path, dict]:
    """A run directory as the pipeline leaves it: config.yaml's arms, each arm's result.json, the scores."""
    import json

    import yaml

    arms = ["sft", "sdd", {"name": "sdd-kd", "kd_weight": 0.5},
            {"name": "sft-50", "responses": "original", "rows": 50}, {"name": "sdd-50", "rows": 50},
            {"name": "sdd-self", "data": ["gsm8k", "gsm8k-self"]}]
    datasets = [{"name": "gsm8k"}, {"name": "gsm8k-self", "train_by_default": False}]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"datasets": datasets, "arms": arms, "kd_weight": 0.5}))
    rows = {"sft": 900, "sdd": 900, "sdd-kd": 900, "sft-50": 100, "sdd-50": 100, "sdd-self": 900}
    models = {"parent": {"retention": 100.0}, "runs/x/pruned": {"retention": 70.0, "retention_ci95": [66.0, 74.0]}}
    for i, (name, n) in enumerate(rows.items()):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps({"rows": n}))
        models[f"runs/x/{name}"] = {"retention": 75.0 + i, "retention_ci95": [72.0 + i, 78.0 + i]}
    return tmp_path, {"models": models, "baseline": "parent"}


def test_the_data_size_curve_joins_arms_that_differ_only_in_rows(tmp_path: Path):
    from selfdistill.report.curves import size_blocks, size_curves

    run, scores = _study_run(tmp_path)
    # sdd-kd (KD) and sdd-self (other data) differ in more than rows: they are on no curve
    assert size_curves(run, scores, _name) == {"sft": [(100, 78.0, [75.0, 81.0]), (900, 75.0, [72.0, 78.0])],
                                        "sdd": [(100, 79.0, [76.0, 82.0]), (900, 76.0, [73.0, 79.0])]}
    blocks = size_blocks(run, run, scores, "pruned", _name)
    assert blocks[2][2][0] == ["sft", "100", "78.0", "75.0 … 81.0"]
    assert blocks[-1][0] == "img" and (run / "retention_vs_rows.png").read_bytes()[:4] == b"\x89PNG"
    del scores["models"]["runs/x/sdd-50"], scores["models"]["runs/x/sft-50"]  # not evaluated yet: no curve
    assert size_curves(run, scores, _name) == {} and size_blocks(run, run, scores, "pruned", _name) == []
