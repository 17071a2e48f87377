"""Depth pruning: score blocks of decoder layers on calibration text and remove the most redundant.

`prune(PruneConfig)` loads the parent, scores every block (see `scoring.py`), removes the chosen
block (or the user's explicit `START:END` range), and writes a standard HF folder holding the child
plus `pruning.json`, `distances.png` and `manifest.json`.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfdistill.config import opt, to_dict
from selfdistill.data import load_examples
from selfdistill.errors import UserError
from selfdistill.guard import claim_output
from selfdistill.models import (
    DEFAULT_MODEL,
    count_parameters,
    decoder_layers,
    load_model,
    paper_flops_per_token,
    resolve_device,
    write_model,
)
from selfdistill.prune import calibration
from selfdistill.prune.candidates import check_candidates
from selfdistill.prune.plot import plot_scores
from selfdistill.prune.scoring import SCORERS, LayerScores
from selfdistill.prune.surgery import format_range, parse_range, remove_layers
from selfdistill.rundir import atomic_dir, atomic_write_json, write_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneConfig:
    model: str = opt(DEFAULT_MODEL, "parent: built-in alias, local HF folder, .gguf file or hub id")
    num_layers: int | None = opt(None, "n, the number of contiguous layers to remove (the paper: 6 of 32)")
    layers: str | None = opt(None, "explicit block START:END (0-based, end-exclusive) instead of the scorer's pick")
    scorer: str = opt("angular", f"layer scorer: {', '.join(SCORERS)}")
    calibration: str | None = opt(None, "calibration data: a file (.jsonl/.json/.csv/.parquet) or hub dataset id")
    recipe: str | None = opt(None, "dataset recipe (gsm8k, dolly, alpaca, arc, text, ...); detected when omitted")
    calibration_samples: int = opt(256, "number of calibration samples (Gromov et al. use C4; we default to task data)")
    max_length: int = opt(1024, "tokens per calibration sample (longer samples are truncated)")
    chat_template: bool = opt(True, "render samples with the model's chat template (else 'prompt\\nanswer')")
    shuffle: bool = opt(False, "sample calibration rows at random (seeded) instead of taking the first ones")
    seed: int = opt(0, "seed for the calibration sample")
    batch_size: int = opt(8, "calibration batch size")
    heldout_samples: int = opt(32, "rows after the calibration sample on which the best blocks' loss is checked")
    candidates: int = opt(3, "how many of the best-scored blocks to check on the held-out rows (0: no check)")
    select_by: str = opt("score", "score: remove the scorer's block (the paper); heldout_loss: the checked "
                                  "candidate that raises held-out loss least")
    dtype: str = opt("float32", "dtype for scoring and for the saved child")
    device: str = opt("auto", "cpu, cuda, or auto")
    split: str = opt("train", "split, for hub datasets")
    on_bad_row: str = opt("fail", "a malformed calibration row: fail or skip")
    allow_pickle: bool = opt(False, "allow models whose weights are pickle (.bin) files: their tensors load with "
                                    "torch's weights_only=True")
    trust_remote_code: bool = opt(False, "allow model code from the hub")
    out: str = opt("", "output folder for the pruned model, pruning.json and distances.png")
    overwrite: bool = opt(False, "replace an existing --out that prune did not write", keyed=False)

    def __post_init__(self) -> None:
        if self.scorer not in SCORERS:
            raise ValueError(f"unknown scorer '{self.scorer}' (choose from {', '.join(SCORERS)})")
        if self.num_layers is not None and self.num_layers <= 0:
            raise ValueError(f"num_layers must be at least 1, got {self.num_layers}")
        if self.calibration_samples <= 0 or self.max_length <= 1 or self.batch_size <= 0:
            raise ValueError("calibration_samples, max_length and batch_size must be positive")
        if self.heldout_samples < 0 or self.candidates < 0:
            raise ValueError("heldout_samples and candidates must be >= 0")
        if self.select_by not in ("score", "heldout_loss"):
            raise ValueError(f"select_by must be 'score' or 'heldout_loss', not '{self.select_by}'")
        if self.select_by == "heldout_loss" and not (self.heldout_samples and self.candidates):
            raise ValueError("select_by heldout_loss needs heldout_samples and candidates above 0")


def calibration_rows(cfg: PruneConfig) -> tuple[list[Any], list[Any]]:
    """The calibration sample and the held-out rows after it (read before the model loads: a bad file is
    named at once)."""
    wanted = cfg.calibration_samples + cfg.heldout_samples
    examples = load_examples(cfg.calibration, cfg.recipe, limit=None if cfg.shuffle else wanted, split=cfg.split,
                             on_bad_row=cfg.on_bad_row)
    return calibration.split_rows(examples, cfg.calibration_samples, cfg.heldout_samples, cfg.shuffle, cfg.seed)


def calibration_data(cfg: PruneConfig, tokenizer: Any, device: str,
                     rows: tuple[list[Any], list[Any]] | None = None) -> calibration.Calibration:
    """Both row sets tokenized, with each row's content position."""
    sample, heldout = calibration_rows(cfg) if rows is None else rows
    data = calibration.build(sample, heldout, tokenizer, chat_template=cfg.chat_template, max_length=cfg.max_length,
                             batch_size=cfg.batch_size, device=device, source=str(cfg.calibration))
    log.info("calibration: %d samples, %d tokens, %d batches; %d held-out rows", data.samples, data.tokens,
             len(data.batches), len(heldout))
    return data


def choose_block(cfg: PruneConfig, total: int) -> tuple[int, list[int] | None]:
    """Validate n / START:END against the model; return (n, explicit layers or None)."""
    explicit = parse_range(cfg.layers, total) if cfg.layers else None
    n = cfg.num_layers if cfg.num_layers is not None else (len(explicit) if explicit else None)
    if n is None:
        raise UserError("give --num-layers N (the block size to remove) or --layers START:END")
    if explicit is not None and len(explicit) != n:
        raise UserError(f"--layers {cfg.layers} removes {len(explicit)} layers but --num-layers is {n}")
    if n >= total:
        raise UserError(f"--num-layers {n} must be smaller than the model's {total} layers")
    if explicit is None and not cfg.calibration:
        raise UserError("give --calibration DATA to score layers (or --layers START:END to skip scoring)")
    return n, explicit


def prune(cfg: PruneConfig) -> dict[str, Any]:
    """Score, remove the chosen block, and save the child with its pruning report."""
    started = time.time()
    if not cfg.out:
        raise UserError("give --out DIR for the pruned model")
    choose_block(cfg, total=sys.maxsize)  # what needs no model (n or START:END given, scorer has data) is checked now
    with claim_output(cfg.out, "prune", folder=True, overwrite=cfg.overwrite):
        return _prune(cfg, started)


def _prune(cfg: PruneConfig, started: float) -> dict[str, Any]:
    rows = calibration_rows(cfg) if cfg.calibration else None
    device = resolve_device(cfg.device)
    model, tok = load_model(cfg.model, cfg.dtype, device, allow_pickle=cfg.allow_pickle,
                            trust_remote_code=cfg.trust_remote_code)
    total = len(decoder_layers(model))
    n, explicit = choose_block(cfg, total)
    scores: LayerScores | None = None
    data = calibration_data(cfg, tok, device, rows) if rows is not None else None
    if data is not None:
        scores = SCORERS[cfg.scorer](model, data.batches, n)
    removed = explicit if explicit is not None else scores.removed
    check = check_candidates(model, scores, removed, data.heldout, cfg.candidates) if data else None
    if explicit is None and cfg.select_by == "heldout_loss" and check:
        removed = list(range(check["best_start"], check["best_start"] + n))
    before = count_parameters(model)
    remove_layers(model, removed)
    model.config.pruned_from = str(cfg.model)
    after = count_parameters(model)
    report = _report(cfg, total, n, removed, scores, before, after, data, check)
    card = {"title": f"{Path(str(cfg.model)).name} pruned to {total - n} layers", "pruned_from": str(cfg.model),
            "removed_layers": format_range(removed), "scorer": cfg.scorer if scores else "explicit range",
            "calibration": cfg.calibration, "parameters": f"{before['total']:,} -> {after['total']:,}"}
    with atomic_dir(cfg.out) as tmp:
        write_model(model, tok, tmp, card)
        atomic_write_json(tmp / "pruning.json", report)
        if scores is not None and importlib.util.find_spec("matplotlib") is not None:
            plot_scores(scores, tmp / "distances.png")
        elif scores is not None:  # a bare GPU environment: the picture is lost, not the pruned model
            log.warning("distances.png not written: matplotlib is not installed (the scores are in pruning.json)")
        inputs = {"calibration": cfg.calibration} if cfg.calibration and Path(cfg.calibration).exists() else {}
        write_manifest(tmp, config=to_dict(cfg), inputs=inputs, seed=cfg.seed, started=started, writer="prune")
    log.info("pruned %s: removed %s -> %d layers, %s -> %s parameters, saved to %s", cfg.model,
             format_range(removed), total - n, f"{before['total']:,}", f"{after['total']:,}", cfg.out)
    return {"out": cfg.out, "removed_layers": removed, "removed": format_range(removed),
            "layers_before": total, "layers_after": total - n,
            "parameters_before": before["total"], "parameters_after": after["total"],
            "flops_reduction": report["flops_per_token"]["reduction"],
            "warning": check["warning"] if check else None}


def _report(cfg: PruneConfig, total: int, n: int, removed: list[int], scores: LayerScores | None,
            before: dict, after: dict, data: calibration.Calibration | None,
            check: dict[str, Any] | None) -> dict[str, Any]:
    flops_before, flops_after = paper_flops_per_token(before["total"]), paper_flops_per_token(after["total"])
    report: dict[str, Any] = {
        "model": str(cfg.model), "scorer": cfg.scorer if scores else None, "n": n,
        "layers_before": total, "layers_after": total - n, "removed_layers": removed,
        "removed_range": format_range(removed),
        "chosen_by": "user" if cfg.layers else "heldout_loss" if cfg.select_by == "heldout_loss" else "scorer",
        "parameters": {"before": before["total"], "after": after["total"],
                       "embedding": before["embedding"], "removed": before["total"] - after["total"]},
        "flops_per_token": {"counted_as": "2 x parameters, embeddings included (the paper's count)",
                            "before": flops_before, "after": flops_after,
                            "reduction": round(1 - flops_after / flops_before, 6)},
        "calibration": {"data": cfg.calibration, "recipe": cfg.recipe, "samples": cfg.calibration_samples,
                        "max_length": cfg.max_length, "chat_template": cfg.chat_template, "seed": cfg.seed,
                        "position": calibration.POSITION_NOTE,
                        "trailing_template_tokens": data.trailing_tokens if data else None,
                        "heldout_samples": cfg.heldout_samples},
        "heldout_check": check,
    }
    if scores is not None:
        report["scores"] = {"distances_by_start": scores.per_start, "block_sizes": scores.block_sizes,
                            "matrix": scores.matrix, "scorer_choice": scores.removed,
                            "per_layer_block_influence": scores.per_layer, **scores.extra}
    return report
