"""Heatmap of layer scores: block size (rows) x start layer (columns), the chosen block outlined."""

from __future__ import annotations

from pathlib import Path

from selfdistill.prune.scoring import LayerScores
from selfdistill.rundir import atomic_path


def plot_scores(scores: LayerScores, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in scores.matrix], dtype=float)
    width = max(6.0, 0.28 * data.shape[1] + 2)
    height = max(2.2, 0.22 * data.shape[0] + 1.6)
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
    for layer in scores.removed:  # outline each removed layer in the chosen row
        ax.add_patch(plt.Rectangle((layer - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    removed = scores.removed
    ax.set_title(title or f"{scores.scorer}: remove [{removed[0]}, {removed[-1] + 1}) for n = {scores.n}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return Path(path)
