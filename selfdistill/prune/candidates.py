"""A check the paper does not make: what the best few candidate blocks cost on held-out calibration rows.

The angular minimum is shallow (neighbouring blocks differ in the third decimal), so a distance alone does
not say how much a block matters. For the few best-scored blocks we measure the increase of next-token loss
on rows outside the calibration sample when the block is skipped, and warn when the chosen block costs
clearly more than another candidate.
"""

from __future__ import annotations

import logging
from typing import Any

from selfdistill.prune.scoring import Batch, LayerScores, loss_without_block, mean_loss
from selfdistill.prune.surgery import format_range

log = logging.getLogger(__name__)

# "Clearly more": at least this much more loss, both relative and in nats (below that it is noise).
CLEAR_RATIO = 1.25
CLEAR_NATS = 0.05


def _starts(scores: LayerScores, removed: list[int], count: int | None) -> list[int]:
    """The `count` best-scored start layers (None: every start), plus the start of the removed block."""
    row = scores.per_start
    ranked = sorted((d, l) for l, d in enumerate(row) if d is not None)
    starts = [l for _, l in (ranked if count is None else ranked[:count])]
    return starts if removed[0] in starts else [*starts, removed[0]]


def check_candidates(model: Any, scores: LayerScores | None, removed: list[int], heldout: list[Batch],
                     count: int | None) -> dict[str, Any] | None:
    """Held-out loss increase per candidate block (count None: every start); None when there is nothing to
    compare."""
    contiguous = removed == list(range(removed[0], removed[0] + len(removed)))
    if scores is None or not heldout or (count is not None and count < 1) or not contiguous or scores.scorer == "block_influence":
        return None
    n = len(removed)
    base = mean_loss(model, heldout)
    candidates = []
    for start in _starts(scores, removed, count):
        increase = loss_without_block(model, heldout, start, n) - base
        candidates.append({"layers": format_range(list(range(start, start + n))), "start": start,
                           "score": scores.per_start[start], "heldout_loss_increase": increase,
                           "chosen": start == removed[0]})
    chosen = next(c for c in candidates if c["chosen"])
    best = min(candidates, key=lambda c: c["heldout_loss_increase"])
    gap = chosen["heldout_loss_increase"] - best["heldout_loss_increase"]
    warning = None
    if not best["chosen"] and gap > CLEAR_NATS and chosen["heldout_loss_increase"] > CLEAR_RATIO * max(
            best["heldout_loss_increase"], 1e-9):
        span = lambda c: f"{c['start']}:{c['start'] + n}"  # noqa: E731 - the --layers spelling
        warning = (f"the chosen block {span(chosen)} raises held-out loss by {chosen['heldout_loss_increase']:.3f} "
                   f"nats, block {span(best)} by only {best['heldout_loss_increase']:.3f}: consider --layers "
                   f"{span(best)} or --select-by heldout_loss")
        log.warning("pruning: %s", warning)
    rows = sum(int(b["input_ids"].shape[0]) for b in heldout)
    return {"rows": rows, "tokens": sum(int(b["attention_mask"].sum()) for b in heldout), "base_loss": base,
            "candidates": candidates, "best_start": best["start"], "warning": warning}


def cheapest_starts(check: dict[str, Any], count: int) -> list[int]:
    """The `count` checked blocks whose removal raises held-out loss least, cheapest first."""
    ranked = sorted(check["candidates"], key=lambda c: c["heldout_loss_increase"])
    return [c["start"] for c in ranked[:count]]
