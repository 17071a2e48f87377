"""Recovery fine-tuning of a pruned child: SFT baseline vs self-distilled answers (arXiv 2410.09982, §3).

`finetune(FinetuneConfig)` trains the child with TRL's SFTTrainer + PEFT LoRA (or full fine-tuning) on
the answer tokens only, optionally adding the parent's logits as a KD signal, and writes a plain HF
folder (LoRA merged) + `adapter/` + `train_log.jsonl` + model card + `manifest.json` (last). The two
arms of the paper differ only in `responses` ("original" = SFT baseline, "distilled" = the method).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from selfdistill.config import opt
from selfdistill.errors import UserError
from selfdistill.finetune.kd import DIVERGENCES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    model: str = opt("", "the pruned child: local HF folder, .gguf file, hub id or built-in alias")
    data: str = opt("", "distill output (.jsonl) or a plain dataset file / hub id")
    responses: Literal["distilled", "original"] = opt(
        "distilled", "answers to train on: distilled (rewrites; the method) or original (the SFT baseline)")
    recipe: str | None = opt(None, "recipe for a plain dataset (gsm8k, dolly, alpaca, ...); detected when omitted")
    limit: int | None = opt(None, "train on the first N rows only")
    out: str = opt("", "output folder: the recovered model (LoRA merged), adapter/, train_log.jsonl, manifest")
    method: Literal["lora", "full", "partial"] = opt(
        "lora", "LoRA adapters (merged at the end), full fine-tuning, or partial (train_layers in full rank)")
    train_layers: str = opt("after_cut", "partial: last:N, after_cut (the child's layers after the pruned block) "
                            "or START:END (end exclusive)")
    train_lm_head: bool = opt(True, "partial: also train the LM head (untied from the embedding if tied)")
    train_norm: bool = opt(True, "partial: also train the final norm")
    lora_r: int = opt(8, "LoRA rank (SDFT default 8)")
    lora_alpha: int = opt(16, "LoRA alpha (SDFT default 16)")
    lora_dropout: float = opt(0.05, "LoRA dropout")
    target_modules: list[str] = opt(["q_proj", "v_proj"], "LoRA target module names, or all-linear")
    learning_rate: float = opt(1e-4, "peak learning rate")
    lr_scheduler: str = opt("cosine", "learning-rate schedule (transformers name: cosine, linear, constant, ...)")
    warmup_steps: int = opt(0, "linear warm-up steps")
    epochs: float = opt(2.0, "epochs (SDFT: 2; 5 for GSM8K); ignored when max_steps > 0")
    max_steps: int = opt(-1, "optimizer steps; -1 = run by epochs")
    batch_size: int = opt(4, "examples per device per micro-batch")
    grad_accum: int = opt(2, "micro-batches per optimizer step (batch_size x grad_accum x processes = 8)")
    max_length: int = opt(1024, "tokens per example (longer ones are cut at the end)")
    padding_free: bool = opt(True, "concatenate a batch's rows into one sequence (no padding; position_ids reset)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    dtype: str = opt("auto", "auto (bf16 where the hardware runs it), bfloat16, float16 or float32")
    device: str = opt("auto", "cpu, cuda or auto")
    seed: int = opt(0, "seed for data order, LoRA init and dropout")
    save_steps: int = opt(50, "checkpoint every N optimizer steps (to OUT.checkpoints/, for --resume)")
    resume: bool = opt(False, "continue from the last checkpoint in OUT.checkpoints/")
    keep_checkpoints: bool = opt(False, "keep OUT.checkpoints/ after a successful run")
    kd_weight: float = opt(0.0, "weight w of logit distillation: (1-w) CE + w divergence(child, parent)")
    kd_loss: str = opt("kl", f"divergence for KD: {', '.join(DIVERGENCES)}")
    kd_temperature: float = opt(1.0, "softmax temperature for KD")
    teacher: str | None = opt(None, "parent model for KD (required when kd_weight > 0; same tokenizer)")
    kd_cache: bool = opt(False, "KD from the parent's cached top-k logits (built once beside the data) instead "
                         "of running the parent every step")
    kd_top_k: int = opt(64, "KD cache: parent log-probs kept per answer position (plus the remaining mass)")
    kd_cache_dir: str | None = opt(None, "KD cache folder (default: beside the data, named by answers, k and T)")
    logging_steps: int = opt(1, "log the loss every N optimizer steps")
    report_to: list[str] = opt([], "extra loggers: tensorboard, wandb (train_log.jsonl is always written)")
    allow_pickle: bool = opt(False, "allow models whose weights are pickle (.bin) files: their tensors load with "
                                    "torch's weights_only=True")
    overwrite: bool = opt(False, "replace an existing --out (or OUT.checkpoints/) that finetune did not write",
                          keyed=False)
    restart: bool = opt(False, "--resume: when the checkpoints were made with other settings, start over "
                        "instead of refusing", keyed=False)

    def __post_init__(self) -> None:
        if self.kd_loss not in DIVERGENCES:
            raise ValueError(f"unknown kd_loss '{self.kd_loss}' (choose from {', '.join(DIVERGENCES)})")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.kd_weight > 0 and not self.teacher:
            raise ValueError("kd_weight > 0 needs a teacher (the unpruned parent): set --teacher")
        if self.kd_top_k < 1:
            raise ValueError("kd_top_k must be at least 1")
        if self.kd_temperature <= 0:
            raise ValueError("kd_temperature must be positive")
        if min(self.lora_r, self.lora_alpha, self.batch_size, self.grad_accum, self.save_steps) <= 0:
            raise ValueError("lora_r, lora_alpha, batch_size, grad_accum and save_steps must be positive")
        if self.max_length < 2 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("max_length must be at least 2 and lora_dropout in [0, 1)")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module (or all-linear)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")
        if not self.learning_rate > 0 or self.warmup_steps < 0 or not self.epochs > 0:
            raise ValueError("learning_rate and epochs must be positive and warmup_steps >= 0")
        if self.max_steps == 0 or self.max_steps < -1 or self.logging_steps < 1:
            raise ValueError("max_steps must be -1 (run by epochs) or positive, and logging_steps positive")


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train the child on the chosen answers and write the recovered model to `cfg.out`."""
    from selfdistill.finetune.run import train_and_save

    if not cfg.model or not cfg.data or not cfg.out:
        raise UserError("finetune needs --model (the child), --data and --out")
    return train_and_save(cfg)


# Config fields that do not shape the trained weights: where they go, bookkeeping and loading safety.
NOT_SHAPING = ("out", "resume", "keep_checkpoints", "save_steps", "logging_steps", "report_to", "allow_pickle",
               "overwrite", "restart", "device")


def shaping_settings(cfg: FinetuneConfig, dtype: str) -> dict[str, Any]:
    """What checkpoints record; `--resume` from checkpoints made with other values is refused (or restarted)."""
    from selfdistill.config import to_dict
    from selfdistill.rundir import hash_path

    values = {k: v for k, v in to_dict(cfg).items() if k not in NOT_SHAPING}
    return {**values, "dtype": dtype, "data_sha256": hash_path(cfg.data)}  # data edited in place is other data


def checkpoint_dir(out: str | Path) -> Path:
    """Where intermediate checkpoints live: a sibling of the output folder, found again by --resume."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoints")


def recognize_checkpoints(path: Path) -> bool:
    """A checkpoint folder made before outputs carried a record: only Trainer checkpoints and our log."""
    return path.is_dir() and all(p.name.startswith(("checkpoint-", ".")) or p.name in ("train_log.jsonl", "runs")
                                 for p in path.iterdir())


__all__ = ["FinetuneConfig", "finetune", "checkpoint_dir"]
