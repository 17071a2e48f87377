"""The repair of one block: fit the stand-in (`replace.py`, `replace_ffn.py`), measure it on held-out rows,
and apply it to the model before the block is removed.

The held-out check is what makes a repair safe to turn on: the next-token loss of the plain cut and of the
repaired child on rows outside the fit. A repair that raises it is not applied, and pruning.json says so.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from selfdistill.errors import UserError
from selfdistill.models import decoder_layers, text_config
from selfdistill.prune.replace import RepairSettings, check_block, fit_map, fold_map, folded
from selfdistill.prune.replace_ffn import install_ffn, train_ffn
from selfdistill.prune.scoring import Batch, _Skip, loss_without_block, mean_loss
from selfdistill.prune.surgery import format_range, remove_layers

log = logging.getLogger(__name__)


@dataclass
class Repair:
    method: str
    start: int
    n: int
    t: torch.Tensor | None = None  # linear / cosine: the d x d map
    layer: Any = None  # ffn: the trained stand-in layer
    info: dict[str, Any] = field(default_factory=dict)


def contiguous_block(removed: list[int], method: str) -> tuple[int, int]:
    block = sorted(removed)
    if block != list(range(block[0], block[0] + len(block))):
        raise UserError(f"replace {method} stands in for one contiguous block; layers {block} are not "
                        f"contiguous (use --layers START:END or the angular scorer)")
    return block[0], len(block)


def fit_repair(model: Any, batches: list[Batch], start: int, n: int, s: RepairSettings, cache: Path) -> Repair:
    check_block(model, start, n, s.method)
    if s.method == "ffn":
        layer, info = train_ffn(model, batches, start, n, s, cache)
        return Repair("ffn", start, n, layer=layer, info=info)
    t, info = fit_map(model, batches, start, n, s)
    return Repair(s.method, start, n, t=t, info=info)


@contextlib.contextmanager
def _ffn_in_place(model: Any, repair: Repair) -> Iterator[None]:
    """The block skipped and the stand-in at its first position, for the duration."""
    layers = decoder_layers(model)
    span = range(repair.start, repair.start + repair.n)
    saved = [layers[i] for i in span]
    try:
        for i in span:
            layers[i] = repair.layer if i == repair.start else _Skip()
        yield
    finally:
        for i, layer in zip(span, saved):
            layers[i] = layer


def repaired_loss(model: Any, heldout: list[Batch], repair: Repair) -> float:
    """Mean next-token loss on `heldout` of the child this repair would make (the parent is left as it was)."""
    if repair.method == "ffn":
        with _ffn_in_place(model, repair):
            return mean_loss(model, heldout)
    with folded(model, repair.start, repair.t):
        return loss_without_block(model, heldout, repair.start, repair.n)


def checked(model: Any, heldout: list[Batch], repair: Repair, plain: float | None = None) -> dict[str, Any]:
    """The held-out losses of the plain cut (`plain` when the block check already measured it) and the
    repaired child; whether the repair is to be applied."""
    if not heldout:
        log.warning("repair: no held-out rows (heldout_samples 0), so the repair is applied unchecked")
        return {"heldout_loss_plain": None, "heldout_loss_replaced": None, "applied": True}
    if plain is None:
        plain = loss_without_block(model, heldout, repair.start, repair.n)
    fixed = repaired_loss(model, heldout, repair)
    applied = fixed < plain
    if not applied:
        log.warning("repair: %s raises held-out loss (%.3f -> %.3f nats): the plain cut is kept", repair.method,
                    plain, fixed)
    return {"heldout_loss_plain": plain, "heldout_loss_replaced": fixed, "applied": applied}


def cut(model: Any, removed: list[int], repair: Repair | None) -> None:
    """Remove the block, with the repair folded in (linear, cosine) or standing in its place (ffn)."""
    if repair is None:
        remove_layers(model, removed)
    elif repair.method == "ffn":
        install_ffn(model, repair.start, repair.n, repair.layer)
        rest = removed[1:]
        if rest:
            remove_layers(model, rest)
        text_config(model).removed_layers = sorted(removed)  # the parent's block, not the n - 1 layers deleted
    else:
        fold_map(model, repair.start, repair.t)
        remove_layers(model, removed)
    if repair is not None:
        text_config(model).replaced_block = {"method": repair.method, "start": repair.start, "n": repair.n}


def repair_block(model: Any, fit: list[Batch], heldout: list[Batch], starts: list[int], n: int,
                 s: RepairSettings, scratch_beside: Path,
                 plain_losses: dict[int, float] | None = None) -> tuple[Repair | None, int, dict[str, Any]]:
    """Fit the repair for each start in `starts` (one, or the few cheapest blocks under select_by
    replaced_loss), check each on the held-out rows, and keep the block whose repaired child loses least.

    Returns the repair to apply (None when it would raise held-out loss), the chosen start and the record
    for pruning.json. The ffn cache lives in a fresh hidden folder beside the child and is always removed."""
    tried: list[tuple[Repair, dict[str, Any]]] = []
    for start in starts:
        if len(starts) > 1 and s.method in ("linear", "cosine") and start == 0:
            log.info("repair: block 0:%d skipped (a %s map folds into the layer before the block)", n, s.method)
            continue
        scratch = Path(tempfile.mkdtemp(dir=scratch_beside, prefix=".repair-cache-"))
        try:
            repair = fit_repair(model, fit, start, n, s, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        tried.append((repair, checked(model, heldout, repair, (plain_losses or {}).get(start))))
    if not tried:
        raise UserError(f"replace {s.method}: no candidate block can be repaired (every one starts at layer 0)")
    repair, result = min(tried, key=lambda t: _rank(t[1]))
    record = {"method": s.method, "block": format_range(list(range(repair.start, repair.start + n))),
              "rows": sum(int(b["input_ids"].shape[0]) for b in fit), "tokens": repair.info.get("tokens"),
              "excluded_positions": "padding" + (f" and the first {s.exclude_first} of each row"
                                                 if s.exclude_first else ""),
              "weighting": s.weighting, "ridge": s.ridge if s.method != "ffn" else None,
              "heldout_rows": sum(int(b["input_ids"].shape[0]) for b in heldout), **result, "fit": repair.info}
    if len(starts) > 1:
        record["candidates"] = [{"start": r.start, "layers": format_range(list(range(r.start, r.start + n))),
                                 **res} for r, res in tried]
    return (repair if result["applied"] else None), repair.start, record


def _rank(result: dict[str, Any]) -> float:
    """The loss of the child a candidate leaves: repaired if the repair helps, else the plain cut."""
    plain, fixed = result["heldout_loss_plain"], result["heldout_loss_replaced"]
    if plain is None:
        return 0.0
    return fixed if result["applied"] else plain
