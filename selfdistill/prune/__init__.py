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
from selfdistill.prune.analysis import block_analysis
from selfdistill.prune.candidates import cheapest_starts
from selfdistill.prune.plot import plot_scores
from selfdistill.prune.repair import contiguous_block, cut, repair_block
from selfdistill.prune.replace import METHODS, WEIGHTINGS, RepairSettings
from selfdistill.prune.scoring import SCORERS, LayerScores
from selfdistill.prune.surgery import format_range, parse_range
from selfdistill.rundir import atomic_dir, atomic_write_json, write_manifest

log = logging.getLogger(__name__)
SELECT_BY = ("score", "heldout_loss", "heldout_loss_all", "replaced_loss")


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
    select_by: str = opt("score", "score: remove the scorer's block (the paper); heldout_loss: of the checked "
                                  "candidates, the one that raises held-out loss least; heldout_loss_all: the "
                                  "same over every start; replaced_loss: of the `candidates` blocks cheapest by "
                                  "held-out loss, the one whose repaired child loses least (needs replace)")
    replace: str = opt("none", f"repair the cut: {', '.join(METHODS)} (see docs/pruning.md)")
    replace_calibration: str | None = opt(None, "data the repair is fitted on (default: the calibration sample); "
                                                "never rows an evaluation reports")
    replace_recipe: str | None = opt(None, "recipe of replace_calibration; detected when omitted")
    replace_samples: int | None = opt(None, "rows of replace_calibration to fit on (default: calibration_samples)")
    replace_ridge: float = opt(1e-4, "linear/cosine: ridge, relative to the mean diagonal of X^T X")
    replace_weighting: str = opt("inverse_norm", "inverse_norm: each token weighted by 1 / ||its target|| (a "
                                                 "relative-error fit), or none (plain least squares)")
    replace_exclude_first: int = opt(0, "leading positions of each row left out of the fit (the attention sink)")
    replace_steps: int = opt(300, "cosine: Adam steps from the least-squares map")
    replace_epochs: int = opt(8, "ffn: passes over the cached hidden states")
    replace_lr: float | None = opt(None, "cosine/ffn learning rate (default: 1e-4 cosine, 1e-3 ffn)")
    replace_max_tokens: int = opt(262_144, "cosine/ffn: calibration tokens cached (linear uses every token)")
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
        if self.select_by not in SELECT_BY:
            raise ValueError(f"select_by must be one of {', '.join(SELECT_BY)}, not '{self.select_by}'")
        if self.select_by != "score" and not (self.heldout_samples and self.candidates):
            raise ValueError(f"select_by {self.select_by} needs heldout_samples and candidates above 0")
        if self.replace not in METHODS:
            raise ValueError(f"unknown replace method '{self.replace}' (choose from {', '.join(METHODS)})")
        if self.select_by == "replaced_loss" and self.replace == "none":
            raise ValueError("select_by replaced_loss needs a replace method (linear, cosine or ffn)")
        if self.replace_weighting not in WEIGHTINGS:
            raise ValueError(f"replace_weighting must be one of {', '.join(WEIGHTINGS)}")
        if self.replace_ridge < 0 or self.replace_exclude_first < 0 or (self.replace_samples or 1) <= 0 \
                or self.replace_steps < 0 or self.replace_epochs < 1 or self.replace_max_tokens < 1:
            raise ValueError("replace_ridge, replace_exclude_first and replace_steps must be >= 0; "
                             "replace_samples, replace_epochs and replace_max_tokens >= 1")

    def repair_settings(self) -> RepairSettings:
        return RepairSettings(method=self.replace, ridge=self.replace_ridge, exclude_first=self.replace_exclude_first,
                              weighting=self.replace_weighting, steps=self.replace_steps, epochs=self.replace_epochs,
                              lr=self.replace_lr, max_tokens=self.replace_max_tokens, seed=self.seed)


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
    if cfg.replace != "none" and not (cfg.calibration or cfg.replace_calibration):
        raise UserError(f"replace {cfg.replace} is fitted on calibration rows: give --calibration or "
                        f"--replace-calibration DATA")
    if cfg.replace != "none" and cfg.scorer == "block_influence" and not cfg.layers:
        raise UserError(f"replace {cfg.replace} stands in for one contiguous block, and the block_influence "
                        f"scorer removes single layers: use --layers START:END or another scorer")
    with claim_output(cfg.out, "prune", folder=True, overwrite=cfg.overwrite):
        return _prune(cfg, started)


def _prune(cfg: PruneConfig, started: float) -> dict[str, Any]:
    rows = calibration_rows(cfg) if cfg.calibration else None
    own = replace_rows(cfg)  # a bad repair calibration file is named before the model loads
    device = resolve_device(cfg.device)
    model, tok = load_model(cfg.model, cfg.dtype, device, allow_pickle=cfg.allow_pickle,
                            trust_remote_code=cfg.trust_remote_code)
    total = len(decoder_layers(model))
    n, explicit = choose_block(cfg, total)
    data = calibration_data(cfg, tok, device, rows) if rows is not None else None
    every = cfg.select_by in ("heldout_loss_all", "replaced_loss") and explicit is None
    scores, check = block_analysis(cfg, model, data, n, explicit, every, device)
    removed = explicit if explicit is not None else scores.removed
    if explicit is None and cfg.select_by in ("heldout_loss", "heldout_loss_all") and check:
        removed = list(range(check["best_start"], check["best_start"] + n))
    repair, replacement = None, None
    if cfg.replace != "none":
        repair, removed, replacement = _repair(cfg, model, tok, device, (data, rows, own), removed, check,
                                               explicit)
    before = count_parameters(model)
    cut(model, removed, repair)
    model.config.pruned_from = str(cfg.model)
    after = count_parameters(model)
    kept = len(decoder_layers(model))  # total - n, or one more with an ffn stand-in
    report = _report(cfg, total, n, removed, scores, before, after, data, check)
    report.update(layers_after=kept, replacement=replacement)
    card = {"title": f"{Path(str(cfg.model)).name} pruned to {kept} layers", "pruned_from": str(cfg.model),
            "removed_layers": format_range(removed), "scorer": cfg.scorer if scores else "explicit range",
            "calibration": cfg.calibration, "parameters": f"{before['total']:,} -> {after['total']:,}"}
    if replacement is not None:
        card["repair"] = f"{cfg.replace} ({'applied' if repair is not None else 'not applied: it raised held-out loss'})"
    with atomic_dir(cfg.out) as tmp:
        write_model(model, tok, tmp, card)
        atomic_write_json(tmp / "pruning.json", report)
        if scores is not None and importlib.util.find_spec("matplotlib") is not None:
            plot_scores(scores, tmp / "distances.png", check=check, removed=removed)
        elif scores is not None:  # a bare GPU environment: the picture is lost, not the pruned model
            log.warning("distances.png not written: matplotlib is not installed (the scores are in pruning.json)")
        inputs = {"calibration": cfg.calibration} if cfg.calibration and Path(cfg.calibration).exists() else {}
        write_manifest(tmp, config=to_dict(cfg), inputs=inputs, seed=cfg.seed, started=started, writer="prune")
    log.info("pruned %s: removed %s -> %d layers, %s -> %s parameters, saved to %s", cfg.model,
             format_range(removed), kept, f"{before['total']:,}", f"{after['total']:,}", cfg.out)
    return {"out": cfg.out, "removed_layers": removed, "removed": format_range(removed),
            "layers_before": total, "layers_after": kept,
            "parameters_before": before["total"], "parameters_after": after["total"],
            "flops_reduction": report["flops_per_token"]["reduction"],
            "warning": check["warning"] if check else None,
            "replacement": None if replacement is None else {k: replacement[k] for k in (
                "method", "applied", "heldout_loss_plain", "heldout_loss_replaced")}}


def _repair(cfg: PruneConfig, model: Any, tok: Any, device: str, sources: tuple[Any, Any, Any], removed: list[int],
            check: dict[str, Any] | None, explicit: list[int] | None) -> tuple[Any, list[int], dict[str, Any]]:
    """Fit the repair (on the chosen block, or on each of the cheapest few under replaced_loss); the plain
    cuts' loss on the held-out rows is the block check's, which skipped the same blocks on the same rows."""
    start, n = contiguous_block(removed, cfg.replace)
    fit, heldout = repair_data(cfg, tok, device, *sources)
    starts = [start]
    if cfg.select_by == "replaced_loss" and explicit is None and check:
        starts = cheapest_starts(check, cfg.candidates)
    known = {c["start"]: check["base_loss"] + c["heldout_loss_increase"] for c in check["candidates"]} if check else {}
    repair, start, record = repair_block(model, fit, heldout, starts, n, cfg.repair_settings(),
                                         Path(cfg.out).expanduser().absolute().parent, known)
    return repair, list(range(start, start + n)), record


def repair_data(cfg: PruneConfig, tok: Any, device: str, data: calibration.Calibration | None,
                rows: tuple[list[Any], list[Any]] | None,
                own: tuple[list[Any], list[Any]] | None) -> tuple[list[Any], list[Any]]:
    """The batches the repair is fitted on and the held-out batches it is checked on (never the same rows)."""
    if own is None and data is not None and cfg.replace_samples is None:
        return data.batches, data.heldout  # the calibration sample itself
    sample, heldout = own if own is not None else rows
    if own is not None and rows is not None:
        heldout = rows[1]  # the rows prune keeps out, whichever data the fit reads
    taken = {(e.instruction, e.reference) for e in heldout}
    sample = [e for e in sample[:cfg.replace_samples] if (e.instruction, e.reference) not in taken]
    built = calibration.build(sample, heldout, tok, chat_template=cfg.chat_template, max_length=cfg.max_length,
                              batch_size=cfg.batch_size, device=device,
                              source=str(cfg.replace_calibration or cfg.calibration))
    return built.batches, built.heldout


def replace_rows(cfg: PruneConfig) -> tuple[list[Any], list[Any]] | None:
    """replace_calibration's fit sample and held-out rows (None: the repair reuses the calibration rows)."""
    if cfg.replace == "none" or not cfg.replace_calibration:
        return None
    samples = cfg.replace_samples or cfg.calibration_samples
    examples = load_examples(cfg.replace_calibration, cfg.replace_recipe, split=cfg.split, on_bad_row=cfg.on_bad_row,
                             limit=None if cfg.shuffle else samples + cfg.heldout_samples)
    return calibration.split_rows(examples, samples, cfg.heldout_samples, cfg.shuffle, cfg.seed)


def _report(cfg: PruneConfig, total: int, n: int, removed: list[int], scores: LayerScores | None,
            before: dict, after: dict, data: calibration.Calibration | None,
            check: dict[str, Any] | None) -> dict[str, Any]:
    flops_before, flops_after = paper_flops_per_token(before["total"]), paper_flops_per_token(after["total"])
    report: dict[str, Any] = {
        "model": str(cfg.model), "scorer": cfg.scorer if scores else None, "n": n,
        "layers_before": total, "layers_after": total - n, "removed_layers": removed,
        "removed_range": format_range(removed),
        "chosen_by": "user" if cfg.layers else "scorer" if cfg.select_by == "score" else cfg.select_by,
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
