"""Depth pruning: score blocks of decoder layers on calibration text and remove the most redundant.

`prune(PruneConfig)` loads the parent, scores every block (see `scoring.py`), removes the chosen
block (or the user's explicit `START:END` range), and writes a standard HF folder holding the child
plus `pruning.json`, `distances.png` and `manifest.json`.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfdistill.config import opt, to_dict
from selfdistill.data import load_examples, render_text
from selfdistill.errors import UserError
from selfdistill.guard import claim_output
from selfdistill.models import DEFAULT_MODEL, decoder_layers, load_model, resolve_device, write_model
from selfdistill.profile import count_parameters, paper_flops_per_token
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
    dtype: str = opt("float32", "dtype for scoring and for the saved child")
    device: str = opt("auto", "cpu, cuda, or auto")
    split: str = opt("train", "split, for hub datasets")
    on_bad_row: str = opt("fail", "a malformed calibration row: fail or skip")
    allow_pickle: bool = opt(False, "allow loading pickle (.bin) checkpoints, which can run code")
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


def calibration_examples(cfg: PruneConfig) -> list[Any]:
    """The calibration rows (read before the model loads, so a bad file is named at once)."""
    pool = None if cfg.shuffle else cfg.calibration_samples
    examples = load_examples(cfg.calibration, cfg.recipe, limit=pool, split=cfg.split, on_bad_row=cfg.on_bad_row)
    if cfg.shuffle and len(examples) > cfg.calibration_samples:
        examples = random.Random(cfg.seed).sample(examples, cfg.calibration_samples)
    return examples


def calibration_batches(cfg: PruneConfig, tokenizer: Any, device: str,
                        examples: list[Any] | None = None) -> list[dict[str, torch.Tensor]]:
    """Calibration texts tokenized, sorted by length and right-padded into batches."""
    examples = calibration_examples(cfg) if examples is None else examples
    texts = [render_text(e, tokenizer, cfg.chat_template) for e in examples]
    encoded = [tokenizer(t, truncation=True, max_length=cfg.max_length, add_special_tokens=False)["input_ids"]
               for t in texts]
    encoded = sorted((ids for ids in encoded if len(ids) > 1), key=len)
    if not encoded:
        raise UserError(f"{cfg.calibration}: no calibration sample has at least 2 tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for i in range(0, len(encoded), cfg.batch_size):
        chunk = encoded[i:i + cfg.batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
    log.info("calibration: %d samples, %d tokens, %d batches", len(encoded), sum(map(len, encoded)), len(batches))
    return batches


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
    examples = calibration_examples(cfg) if cfg.calibration else None
    device = resolve_device(cfg.device)
    model, tok = load_model(cfg.model, cfg.dtype, device, allow_pickle=cfg.allow_pickle,
                            trust_remote_code=cfg.trust_remote_code)
    total = len(decoder_layers(model))
    n, explicit = choose_block(cfg, total)
    scores: LayerScores | None = None
    if cfg.calibration:
        scores = SCORERS[cfg.scorer](model, calibration_batches(cfg, tok, device, examples), n)
    removed = explicit if explicit is not None else scores.removed
    before = count_parameters(model)
    remove_layers(model, removed)
    model.config.pruned_from = str(cfg.model)
    after = count_parameters(model)
    report = _report(cfg, total, n, removed, scores, before, after)
    card = {"title": f"{Path(str(cfg.model)).name} pruned to {total - n} layers", "pruned_from": str(cfg.model),
            "removed_layers": format_range(removed), "scorer": cfg.scorer if scores else "explicit range",
            "calibration": cfg.calibration, "parameters": f"{before['total']:,} -> {after['total']:,}"}
    with atomic_dir(cfg.out) as tmp:
        write_model(model, tok, tmp, card)
        atomic_write_json(tmp / "pruning.json", report)
        if scores is not None:
            plot_scores(scores, tmp / "distances.png")
        inputs = {"calibration": cfg.calibration} if cfg.calibration and Path(cfg.calibration).exists() else {}
        write_manifest(tmp, config=to_dict(cfg), inputs=inputs, seed=cfg.seed, started=started, writer="prune")
    log.info("pruned %s: removed %s -> %d layers, %s -> %s parameters, saved to %s", cfg.model,
             format_range(removed), total - n, f"{before['total']:,}", f"{after['total']:,}", cfg.out)
    return {"out": cfg.out, "removed_layers": removed, "removed": format_range(removed),
            "layers_before": total, "layers_after": total - n,
            "parameters_before": before["total"], "parameters_after": after["total"],
            "flops_reduction": report["flops_per_token"]["reduction"]}


def _report(cfg: PruneConfig, total: int, n: int, removed: list[int], scores: LayerScores | None,
            before: dict, after: dict) -> dict[str, Any]:
    flops_before, flops_after = paper_flops_per_token(before["total"]), paper_flops_per_token(after["total"])
    report: dict[str, Any] = {
        "model": str(cfg.model), "scorer": cfg.scorer if scores else None, "n": n,
        "layers_before": total, "layers_after": total - n, "removed_layers": removed,
        "removed_range": format_range(removed), "chosen_by": "scorer" if cfg.layers is None else "user",
        "parameters": {"before": before["total"], "after": after["total"],
                       "embedding": before["embedding"], "removed": before["total"] - after["total"]},
        "flops_per_token": {"counted_as": "2 x parameters, embeddings included (the paper's count)",
                            "before": flops_before, "after": flops_after,
                            "reduction": round(1 - flops_after / flops_before, 6)},
        "calibration": {"data": cfg.calibration, "recipe": cfg.recipe, "samples": cfg.calibration_samples,
                        "max_length": cfg.max_length, "chat_template": cfg.chat_template, "seed": cfg.seed},
    }
    if scores is not None:
        report["scores"] = {"distances_by_start": scores.per_start, "block_sizes": scores.block_sizes,
                            "matrix": scores.matrix, "scorer_choice": scores.removed,
                            "per_layer_block_influence": scores.per_layer, **scores.extra}
    return report
