"""Heatmap of layer scores: block size (rows) x start layer (columns), the chosen block outlined; with a
held-out check, a second panel puts the score of each start beside what skipping that block costs."""

from __future__ import annotations

from pathlib import Path

from selfdistill.prune.scoring import LayerScores
from selfdistill.rundir import atomic_path


def plot_scores(scores: LayerScores, path: str | Path, title: str = "", check: dict | None = None,
                removed: list[int] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in scores.matrix], dtype=float)
    width = max(6.0, 0.28 * data.shape[1] + 2)
    height = max(2.2, 0.22 * data.shape[0] + 1.6)
    if check:
        fig, (ax, lower) = plt.subplots(2, 1, figsize=(width, height + 2.6), height_ratios=[height, 2.6])
    else:
        fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="viridis_r", origin="lower",
                      interpolation="nearest")
    label = {"angular": "angular distance d(l, n)", "block_influence": "block influence (1 - cos)",
             "loss": "loss increase when skipped"}[scores.scorer]
    fig.colorbar(image, ax=ax, label=label)
    ax.set_xlabel("start layer l (0-based)")
    ax.set_ylabel("block size n")
    ax.set_yticks(range(len(scores.block_sizes)))
    ax.set_yticklabels(scores.block_sizes, fontsize=7)
    ax.set_xticks(range(data.shape[1]))
    ax.set_xticklabels(range(data.shape[1]), fontsize=7)
    row = scores.block_sizes.index(scores.n) if scores.n in scores.block_sizes else 0
    removed = removed or scores.removed
    for layer in removed:  # outline each removed layer in the chosen row
        ax.add_patch(plt.Rectangle((layer - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    chooser = "" if removed == scores.removed else f" (the scorer's pick: {scores.removed[0]})"
    ax.set_title(title or f"{scores.scorer}: remove [{removed[0]}, {removed[-1] + 1}) for n = {scores.n}{chooser}")
    if check:
        _score_and_loss(lower, scores, check, removed)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return Path(path)


def _score_and_loss(ax, scores: LayerScores, check: dict, removed: list[int]) -> None:
    """The chosen size's score by start layer (line) and the held-out loss increase of each checked block."""
    starts = [l for l, d in enumerate(scores.per_start) if d is not None]
    ax.plot(starts, [scores.per_start[l] for l in starts], color="tab:blue", marker=".", label=f"score (n = {scores.n})")
    ax.set_xlabel("start layer l (0-based)")
    ax.set_ylabel("score", color="tab:blue")
    loss = ax.twinx()
    checked = sorted(check["candidates"], key=lambda c: c["start"])
    loss.plot([c["start"] for c in checked], [c["heldout_loss_increase"] for c in checked], color="tab:red",
              marker="o", linestyle="--" if len(checked) > 3 else "none", label="held-out loss increase")
    loss.set_ylabel("held-out loss increase (nats)", color="tab:red")
    ax.axvline(removed[0], color="black", linewidth=1, linestyle=":")
    ax.set_title(f"removed block starts at {removed[0]} (dotted); {check['rows']} held-out rows", fontsize=9)
    ax.set_xticks(starts)
    ax.tick_params(axis="x", labelsize=7)
