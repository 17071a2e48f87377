"""TRL's SFTTrainer with an answer-only loss that projects only the answer positions, plus optional KD.

The LM head (vocab x hidden) is the largest matmul of a small model; `logits_to_keep` with a boolean
mask makes transformers project only the positions whose next token is an answer token, so prompt
positions cost no logits. With a teacher, loss = (1 - w) * CE + w * divergence(child, parent) on
exactly those positions (Minitron-style logit distillation).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from trl import SFTTrainer

from selfdistill.finetune.kd import DIVERGENCES
from selfdistill.finetune.kdcache import cached_divergence
from selfdistill.finetune.logits import answer_logits

log = logging.getLogger(__name__)

_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def tokenize_row(tokenizer: Any, row: dict[str, Any], max_length: int) -> dict[str, list[int]] | None:
    """Chat-template one prompt/completion row; completion_mask is 1 on answer tokens (as TRL does).

    Truncation keeps the start (TRL's `keep_start`); a row whose answer is cut off entirely is dropped.
    """
    prompt_text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template renders the prompt differently when an answer follows it")
    mask = [0] * len(prompt_ids) + [1] * (len(full_ids) - len(prompt_ids))
    full_ids, mask = full_ids[:max_length], mask[:max_length]
    return {"input_ids": full_ids, "completion_mask": mask} if any(mask[1:]) else None


class RecoveryTrainer(SFTTrainer):
    """SFTTrainer whose loss is CE on answer tokens (+ optional KD), computing logits only there."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the token count of the whole accumulated batch

    def __init__(self, *args: Any, teacher: torch.nn.Module | None = None, kd_cache: Any = None,
                 kd_weight: float = 0.0, kd_loss: str = "kl", kd_temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher, self.kd_cache, self.kd_loss = teacher, kd_cache, kd_loss
        if teacher is not None:
            teacher.to(self.args.device).eval().requires_grad_(False)
        self.kd_weight, self.kd_temperature = kd_weight, kd_temperature
        self.divergence = DIVERGENCES[kd_loss]
        self.answer_tokens = 0  # counted on this process, for tokens/s

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        labels = inputs["labels"]
        # position t predicts labels[t+1]; keep t only where that label is an answer token
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != -100
        targets = labels[:, 1:][labels[:, 1:] != -100]
        fwd = {k: inputs[k] for k in _MODEL_INPUTS if k in inputs}
        outputs = answer_logits(model, fwd, keep)
        logits = outputs.logits.reshape(-1, outputs.logits.size(-1))
        if num_items_in_batch is None:  # no global count: average locally (and over accumulation in training)
            accumulation = getattr(self, "current_gradient_accumulation_steps", 1) if model.training else 1
            denom = max(targets.numel(), 1) * accumulation
        else:
            denom = num_items_in_batch
        ce = F.cross_entropy(logits.float(), targets, reduction="sum") / denom
        loss = ce
        if self.kd_weight > 0 and (self.teacher is not None or self.kd_cache is not None):
            kd = self._kd(fwd, keep, logits, inputs).sum() / denom
            loss = (1 - self.kd_weight) * ce + self.kd_weight * kd
            self._metrics["train"]["kd_loss"].append(self._per_token(kd, denom, targets.numel()))
        self._metrics["train"]["ce_loss"].append(self._per_token(ce, denom, targets.numel()))
        self.answer_tokens += targets.numel()
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global
        return (loss, outputs) if return_outputs else loss

    def _kd(self, fwd: dict[str, Any], keep: torch.Tensor, logits: torch.Tensor, inputs: dict[str, Any]) -> Any:
        """Per-token divergence from the parent: its cached top-k (finetune/kdcache.py) or a live forward."""
        if self.kd_cache is not None:
            return cached_divergence(logits, self.kd_cache.lookup(inputs), self.kd_loss, self.kd_temperature)
        with torch.no_grad():
            t_logits = answer_logits(self.teacher, fwd, keep).logits
        return self.divergence(logits, t_logits.reshape(logits.shape), self.kd_temperature)

    def _per_token(self, value: torch.Tensor, denom: Any, n_local: int) -> float:
        """The loss as a per-answer-token mean of this micro-batch (for logging only)."""
        return float(value.detach() * float(denom) / max(n_local, 1))


class JsonlLogger(TrainerCallback):
    """Append every Trainer log (loss, lr, grad norm, ...) as one JSON line; rank 0 only."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint we continue from."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
