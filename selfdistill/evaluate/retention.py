"""Scores, retention and its uncertainty from lm-eval's per-sample output.

Retention = child average / parent average x 100 (PAPER.md §4, arXiv 2410.09982); chance-corrected
retention = sum(child - chance) / sum(parent - chance) x 100, so tasks where a small parent sits at
chance do not flatter every child. A task is flagged when the parent is within two standard errors
of chance. The retention difference of two children gets a paired bootstrap interval (same
documents resampled for parent and both children).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def per_doc(samples: list[dict[str, Any]], metric_key: str) -> dict[Any, float]:
    """doc_id -> score for one `metric,filter` key from lm-eval's logged samples.

    A task's ids are lm-eval's ints; a group's are "<leaf>/<doc_id>" strings (the leaves' ids overlap)."""
    metric, _, filt = metric_key.partition(",")
    return {s["doc_id"]: float(s[metric]) for s in samples if s.get("filter", "none") == filt and metric in s}


def chance_of(samples: list[dict[str, Any]], metric_key: str) -> float:
    """Expected score of a uniform guess: 1/choices per doc; mc2: the true options' share; 0 for generation."""
    values = []
    for s in samples:
        if s.get("filter", "none") != metric_key.partition(",")[2]:
            continue
        doc = s.get("doc", {})
        if isinstance(doc.get("mc2_targets"), dict):  # uniform probabilities put this mass on the true answers
            labels = doc["mc2_targets"]["labels"]
            values.append(sum(labels) / len(labels))
        elif isinstance(s.get("arguments"), list | tuple) and len(s["arguments"]) > 1:
            values.append(1.0 / len(s["arguments"]))
        else:
            values.append(0.0)
    return float(np.mean(values)) if values else 0.0


def task_score(samples: list[dict[str, Any]], metric_key: str) -> dict[str, Any]:
    scores = np.array(list(per_doc(samples, metric_key).values()))
    n = len(scores)
    stderr = float(scores.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"metric": metric_key, "value": float(scores.mean()) if n else float("nan"), "stderr": stderr,
            "n": n, "chance": chance_of(samples, metric_key)}


def signal_tasks(parent: dict[str, dict[str, Any]]) -> list[str]:
    """Tasks where the parent is more than two standard errors above chance."""
    out = []
    for task, s in parent.items():
        se = s["stderr"] if math.isfinite(s["stderr"]) else 0.0
        if s["value"] - s["chance"] > 2 * se:
            out.append(task)
    return out


def _ratio(a: float, b: float) -> float:
    return a / b * 100 if b > 0 else float("nan")


def retention(child: dict[str, dict[str, Any]], parent: dict[str, dict[str, Any]],
              tasks: list[str] | None = None) -> dict[str, Any]:
    """Average, retention, chance-corrected retention and per-task ratios over `tasks` (default: all)."""
    tasks = [t for t in (tasks if tasks is not None else list(parent)) if t in child and t in parent]
    c = np.array([child[t]["value"] for t in tasks])
    p = np.array([parent[t]["value"] for t in tasks])
    chance = np.array([parent[t]["chance"] for t in tasks])
    return {
        "tasks": tasks,
        "average": float(c.mean()) if tasks else float("nan"),
        "retention": _ratio(c.mean(), p.mean()) if tasks else float("nan"),
        "chance_corrected_retention": _ratio((c - chance).sum(), (p - chance).sum()) if tasks else float("nan"),
        "per_task_ratio": {t: _ratio(child[t]["value"], parent[t]["value"]) for t in tasks},
        "per_task_chance_corrected": {t: _ratio(child[t]["value"] - parent[t]["chance"],
                                                parent[t]["value"] - parent[t]["chance"]) for t in tasks},
    }


def _resampled_means(docs: list[dict[str, dict[Any, float]]], iters: int,
                     seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(tasks, full means [models], bootstrap means [iters, models]) of the task-averaged score of each of
    `docs`, resampling each task's documents shared by all of them with replacement, one draw for all."""
    tasks = [t for t in docs[0] if all(t in d for d in docs)]
    rng = np.random.default_rng(seed)
    cols = {}
    for t in tasks:
        ids = sorted(set.intersection(*(set(d[t]) for d in docs)))
        cols[t] = np.array([[d[t][i] for d in docs] for i in ids]).reshape(-1, len(docs))
    tasks = [t for t in tasks if len(cols[t])]
    means = np.zeros((iters, len(tasks), len(docs)))
    for j, t in enumerate(tasks):
        m = cols[t]
        idx = rng.integers(0, len(m), size=(iters, len(m)))
        means[:, j, :] = m[idx].mean(axis=1)
    full = np.array([cols[t].mean(axis=0) for t in tasks]).mean(axis=0) if tasks else np.zeros(len(docs))
    return tasks, full, means.mean(axis=1)


def paired_bootstrap(a: dict[str, dict[Any, float]], b: dict[str, dict[Any, float]],
                     parent: dict[str, dict[Any, float]], *, iters: int = 2000, seed: int = 0) -> dict[str, Any]:
    """95 % interval of retention(a) - retention(b) (and of the average difference), resampling the
    documents of each task with replacement, the same draw for parent, a and b."""
    tasks, full, avg = _resampled_means([parent, a, b], iters, seed)  # avg: iters x (parent, a, b)
    if not tasks:
        return {"tasks": [], "retention_diff": float("nan"), "ci95": [float("nan")] * 2, "iters": 0}
    with np.errstate(divide="ignore", invalid="ignore"):
        ret_diff = (avg[:, 1] - avg[:, 2]) / avg[:, 0] * 100
    return {
        "tasks": tasks,
        "retention_diff": _ratio(full[1] - full[2], full[0]) if full[0] > 0 else float("nan"),
        "ci95": [float(np.nanpercentile(ret_diff, 2.5)), float(np.nanpercentile(ret_diff, 97.5))],
        "average_diff": float(full[1] - full[2]),
        "average_diff_ci95": [float(np.percentile(avg[:, 1] - avg[:, 2], 2.5)),
                              float(np.percentile(avg[:, 1] - avg[:, 2], 97.5))],
        "iters": iters,
    }


def retention_interval(child: dict[str, dict[Any, float]], parent: dict[str, dict[Any, float]], *,
                       iters: int = 2000, seed: int = 0) -> list[float]:
    """95 % interval of retention(child) in % of the parent: the same documents drawn for both (paired)."""
    tasks, _, avg = _resampled_means([parent, child], iters, seed)
    if not tasks:
        return [float("nan")] * 2
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = avg[:, 1] / avg[:, 0] * 100
    return [float(np.nanpercentile(ratio, 2.5)), float(np.nanpercentile(ratio, 97.5))]
