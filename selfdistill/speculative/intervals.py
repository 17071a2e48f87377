"""Bootstrap intervals for acceptance statistics, resampling prompts.

The prompt is the unit that varies: one long agreeable answer can carry many draft rounds, so rounds are not
independent draws. MAL is a ratio of sums (1 + accepted / drafts over the chosen prompts), and each bootstrap
draw recomputes it from the resampled prompts' counts. Two drafts decoded the same prompts, so their comparison
resamples the same prompts for both (paired), which is far tighter than two separate intervals.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ITERS = 2000


def _mal(drafts: np.ndarray, accepted: np.ndarray) -> np.ndarray:
    """MAL per bootstrap row (rows of per-prompt counts); a row without any draft round has MAL 1."""
    rounds = drafts.sum(axis=-1)
    return 1 + np.divide(accepted.sum(axis=-1), rounds, out=np.zeros(rounds.shape), where=rounds > 0)


def _draw(n: int, iters: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(iters, n))


def mal_interval(per_prompt: dict[str, list[int]], *, iters: int = ITERS, seed: int = 0) -> list[float]:
    """95 % percentile interval of one draft's MAL, from its per-prompt `drafts` and `accepted` counts."""
    drafts, accepted = np.asarray(per_prompt["drafts"]), np.asarray(per_prompt["accepted"])
    idx = _draw(len(drafts), iters, seed)
    boot = _mal(drafts[idx], accepted[idx])
    return [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def mal_ratio(a: dict[str, list[int]], b: dict[str, list[int]], *, iters: int = ITERS,
              seed: int = 0) -> dict[str, Any]:
    """MAL(a) / MAL(b) with its paired 95 % interval: the same prompts drawn for both drafts."""
    arrays = [np.asarray(p[key]) for p in (a, b) for key in ("drafts", "accepted")]
    if len({len(x) for x in arrays}) != 1:
        raise ValueError("mal_ratio: both drafts must have counts for the same prompts")
    a_drafts, a_acc, b_drafts, b_acc = arrays
    idx = _draw(len(a_drafts), iters, seed)
    boot = _mal(a_drafts[idx], a_acc[idx]) / _mal(b_drafts[idx], b_acc[idx])
    ratio = float(_mal(a_drafts, a_acc) / _mal(b_drafts, b_acc))
    return {"mal_ratio": ratio, "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "iters": iters}
