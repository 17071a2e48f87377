"""The finetune stage's steps: load, wrap with LoRA, train with checkpoints, merge in fp32, save atomically.

Precision policy: LoRA keeps the frozen base in the compute dtype (bf16 on CPUs with avx512_bf16) and
the adapters in fp32; full fine-tuning keeps fp32 master weights under bf16 autocast, because bf16
weights would round away most Adam updates. LoRA deltas are merged into an fp32 reload of the child
for the same reason.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.trainer_callback import ProgressCallback

from selfdistill.config import dump_yaml, to_dict
from selfdistill.console import progress
from selfdistill.errors import UserError
from selfdistill.finetune import FinetuneConfig, checkpoint_dir, recognize_checkpoints, shaping_settings
from selfdistill.finetune.checkpoints import LOG_NAME, RunTotals, prepare_checkpoints, totals_at
from selfdistill.finetune.data import TrainData, load_train_data
from selfdistill.finetune.kdcache import open_cache
from selfdistill.finetune.partial import freeze_for_partial, saved_model
from selfdistill.finetune.trainer import JsonlLogger, RecoveryTrainer, tokenize_row
from selfdistill.guard import claim_output
from selfdistill.models import drop_quantization, load_model, model_card, resolve_device, resolve_dtype
from selfdistill.rundir import atomic_dir, atomic_write_text, write_manifest

log = logging.getLogger(__name__)


def build_dataset(rows: list[dict[str, Any]], tokenizer: Any, max_length: int, source: str) -> Any:
    from datasets import Dataset

    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the child's tokenizer has no chat template, so prompts cannot be rendered and masked")
    try:
        encoded = [tokenize_row(tokenizer, row, max_length) for row in rows]
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None
    kept = [e for e in encoded if e is not None]
    if len(kept) < len(encoded):
        log.warning("%d of %d rows dropped: the prompt alone fills max_length=%d", len(encoded) - len(kept),
                    len(encoded), max_length)
    if not kept:
        raise UserError(f"{source}: no row has an answer token within max_length={max_length}")
    return Dataset.from_list(kept)


def add_lora(model: Any, cfg: FinetuneConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    if isinstance(targets, list):
        names = [name for name, _ in model.named_modules()]
        for target in targets:
            if not any(n == target or n.endswith("." + target) for n in names):
                linear = (n for n, m in model.named_modules() if type(m).__name__ == "Linear")
                leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
                raise UserError(f"--target-modules '{target}' matches no module of {type(model).__name__} "
                                f"(linear layers: {', '.join(leaves)}; or all-linear)")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise UserError(f"LoRA: {str(e).strip().splitlines()[0]}") from None


def load_teacher(cfg: FinetuneConfig, child_tok: Any, child: Any, dtype: str) -> Any:
    teacher, tok = load_model(cfg.teacher, dtype=dtype, allow_pickle=cfg.allow_pickle, attn_implementation="sdpa")
    if tok.get_vocab() != child_tok.get_vocab() or teacher.config.vocab_size != child.config.vocab_size:
        raise UserError(f"teacher '{cfg.teacher}' and child '{cfg.model}' use different tokenizers "
                        f"({len(tok)} vs {len(child_tok)} tokens); KD needs the same vocabulary")
    return teacher


def training_args(cfg: FinetuneConfig, ckpt: Path, device: str, dtype: str) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(ckpt), use_cpu=device == "cpu", seed=cfg.seed,
        bf16=dtype == "bfloat16", fp16=dtype == "float16",
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        # rows are tokenized and cut to max_length by tokenize_row; padding-free batches need max_length=None
        max_length=None, padding_free=cfg.padding_free, completion_only_loss=True,
        gradient_checkpointing=cfg.gradient_checkpointing,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        logging_steps=cfg.logging_steps, report_to=list(cfg.report_to) or "none",
        ddp_find_unused_parameters=False, dataloader_num_workers=0,
    )


@dataclass
class Prepared:
    trainer: Any
    tokenizer: Any
    data: TrainData
    dtype: str
    resume_from: str | None
    totals: RunTotals


def prepare(cfg: FinetuneConfig, fresh: bool = False) -> Prepared:
    """Validate every input and build the trainer; nothing is written before this succeeds.

    `fresh`: the checkpoints must not be resumed (their settings differ and --restart was given)."""
    from transformers import set_seed

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    data = load_train_data(cfg.data, cfg.responses, cfg.recipe, cfg.limit)  # bad rows are named before a load
    # The Trainer seeds torch only when it is built, after LoRA's random init: seed now, or two runs differ.
    set_seed(cfg.seed)
    # LoRA and partial keep frozen weights in the compute dtype; full fine-tuning needs fp32 masters.
    model, tok = load_model(cfg.model, dtype=dtype if cfg.method != "full" else "float32",
                            allow_pickle=cfg.allow_pickle, attn_implementation="sdpa")
    if cfg.method == "partial":
        freeze_for_partial(model, cfg.train_layers, cfg.train_lm_head, cfg.train_norm, cfg.model)
    dataset = build_dataset(data.rows, tok, cfg.max_length, cfg.data)
    teacher = cache = None
    if cfg.kd_weight > 0 and cfg.kd_cache:
        cache = open_cache(cfg, dataset.to_list(), lambda: load_teacher(cfg, tok, model, dtype))
    elif cfg.kd_weight > 0:
        teacher = load_teacher(cfg, tok, model, dtype)
    if cfg.method == "lora":
        model = add_lora(model, cfg)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input
    ckpt = checkpoint_dir(cfg.out)
    resume_from = prepare_checkpoints(ckpt, cfg.resume and not fresh)
    trainer = RecoveryTrainer(
        model=model, args=training_args(cfg, ckpt, device, dtype), train_dataset=dataset, processing_class=tok,
        callbacks=[JsonlLogger(ckpt / LOG_NAME)], teacher=teacher, kd_cache=cache, kd_weight=cfg.kd_weight,
        kd_loss=cfg.kd_loss, kd_temperature=cfg.kd_temperature)
    # The default progress bar also prints every log dict to stdout, which is the CLI's JSON channel;
    # keep the bar, send the numbers to train_log.jsonl only.
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_QuietProgress)
    totals = RunTotals(lambda: _sum_over_processes(trainer, trainer.answer_tokens), totals_at(resume_from))
    trainer.add_callback(totals)
    return Prepared(trainer, tok, data, dtype, resume_from, totals)


class _QuietProgress(ProgressCallback):
    """The Trainer's step bar as one of our own (shown under the quiet terminal too), without the log dicts."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.training_bar = progress(total=state.max_steps, desc="training", unit="step")
        self.current_step = 0

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        return None


def train_and_save(cfg: FinetuneConfig) -> dict[str, Any]:
    """Claim OUT and OUT.checkpoints/ (guard.py), train, and save; the claims are held until the end."""
    started = time.time()
    dtype = resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    ckpt = checkpoint_dir(cfg.out)
    with claim_output(cfg.out, "finetune", folder=True, overwrite=cfg.overwrite), \
            claim_output(ckpt, "finetune", folder=True, settings=shaping_settings(cfg, dtype),
                         overwrite=cfg.overwrite, restart=cfg.restart or not cfg.resume,
                         recognize=recognize_checkpoints, what="--out (its checkpoints)",
                         restart_hint="pass --restart (or drop --resume) to start over") as ckpt_claim:
        return _train_claimed(cfg, ckpt_claim, started)


def _train_claimed(cfg: FinetuneConfig, ckpt_claim: Any, started: float) -> dict[str, Any]:
    p = prepare(cfg, fresh=ckpt_claim.fresh)
    trainer = p.trainer
    trainer.accelerator.wait_for_everyone()  # every rank decided what to resume before rank 0 records
    ckpt_claim.commit()  # OUT itself needs no record: it appears whole, with a manifest naming finetune
    result = trainer.train(resume_from_checkpoint=p.resume_from)
    totals = p.totals.now()  # the whole run's, across resumes
    tokens, train_s = totals["answer_tokens"], totals["train_s"]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary = {"out": str(cfg.out), "arm": cfg.responses, "rows": len(trainer.train_dataset),
               "steps": trainer.state.global_step, "final_loss": losses[-1] if losses else None,
               "train_loss": round(result.training_loss, 4), "answer_tokens": tokens,
               "tokens_per_s": round(tokens / max(train_s, 1e-9), 1), "train_s": train_s,
               "resumed_from_step": _step_of(p.resume_from)}
    staged = checkpoint_dir(cfg.out) / "final"
    gather_weights(cfg, trainer, staged)
    if trainer.accelerator.is_main_process:
        save_output(cfg, staged, trainer, p.tokenizer, p.data, summary, p.dtype, started)
        if not cfg.keep_checkpoints:
            shutil.rmtree(checkpoint_dir(cfg.out), ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    summary["wall_s"] = round(time.time() - started, 1)
    return summary


def _step_of(checkpoint: str | None) -> int | None:
    return int(Path(checkpoint).name.rsplit("-", 1)[-1]) if checkpoint else None


def _sum_over_processes(trainer: Any, value: int) -> int:
    import torch

    total = trainer.accelerator.gather(torch.tensor([value], device=trainer.args.device)).sum()
    return int(total.item())


def gather_weights(cfg: FinetuneConfig, trainer: Any, staged: Path) -> None:
    """Every process: the trained weights (LoRA: the adapter) into `staged`, written by rank 0.

    The Trainer's save_model gathers what FSDP or DeepSpeed ZeRO-3 shard over the processes; the model's own
    save_pretrained on rank 0 would write rank 0's shard alone. FSDP's save_model writes nothing under a
    sharded state-dict type, so a full one is asked for; ZeRO-3 needs stage3_gather_16bit_weights_on_model_save
    (checked in save_output, where a missing weight file would otherwise surface as a load error)."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if trainer.is_fsdp_enabled and plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        plugin.set_state_dict_type("FULL_STATE_DICT")
    if cfg.method != "lora":
        drop_quantization(trainer.model)  # a GGUF-loaded child refuses to serialize otherwise
    trainer.model.config.use_cache = True  # the saved model is for generation; training turned the cache off
    trainer.save_model(str(staged))


def _saved_weights(staged: Path, lora: bool) -> None:
    names = ("adapter_model.safetensors", "adapter_model.bin") if lora else \
        ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    if not any((staged / n).is_file() for n in names):
        raise UserError(f"the trainer saved no {'adapter' if lora else 'model'} weights in {staged} (DeepSpeed "
                        "ZeRO-3: set stage3_gather_16bit_weights_on_model_save: true in its config)")


def merged_model(cfg: FinetuneConfig, staged: Path, trainer: Any) -> Any:
    """The gathered weights as one model; LoRA: the child reloaded in fp32 with the adapter merged, so small
    deltas survive the merge; partial: the fp32 reload with the trained tensors put in (frozen weights
    exactly as loaded, not rounded through the compute dtype)."""
    _saved_weights(staged, cfg.method == "lora")
    if cfg.method == "partial":
        return saved_model(cfg.model, trainer.model, cfg.train_lm_head, cfg.allow_pickle)
    if cfg.method != "lora":
        return load_model(str(staged), dtype="float32", with_tokenizer=False)[0]
    from peft import PeftModel

    base, _ = load_model(cfg.model, dtype="float32", allow_pickle=cfg.allow_pickle, with_tokenizer=False)
    return PeftModel.from_pretrained(base, str(staged)).merge_and_unload()


def save_output(cfg: FinetuneConfig, staged: Path, trainer: Any, tok: Any, data: TrainData,
                summary: dict[str, Any], dtype: str, started: float) -> None:
    """Write model + adapter/ + log + card + config.yaml, then manifest.json last, all in one rename."""
    ckpt = checkpoint_dir(cfg.out)
    with atomic_dir(cfg.out) as tmp:
        model = merged_model(cfg, staged, trainer)
        if cfg.method == "lora":
            (tmp / "adapter").mkdir()
            for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
                if (staged / name).is_file():
                    shutil.copyfile(staged / name, tmp / "adapter" / name)
        drop_quantization(model)
        model.config.use_cache = True
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        atomic_write_text(tmp / "README.md", model_card(model, card(cfg, data, summary, dtype)))
        if (ckpt / LOG_NAME).is_file():
            shutil.copyfile(ckpt / LOG_NAME, tmp / LOG_NAME)
        atomic_write_text(tmp / "config.yaml", dump_yaml(cfg))
        inputs = {"model": cfg.model, "data": cfg.data, **({"teacher": cfg.teacher} if cfg.teacher else {})}
        write_manifest(tmp, config=to_dict(cfg), inputs={k: v for k, v in inputs.items() if Path(v).exists()},
                       seed=cfg.seed, started=started, extra={"result": summary}, writer="finetune")


def card(cfg: FinetuneConfig, data: TrainData, summary: dict[str, Any], dtype: str) -> dict[str, Any]:
    arm = "self-data distillation (parent's verified rewrites)" if cfg.responses == "distilled" \
        else "SFT baseline (original answers)"
    hyper = {k: getattr(cfg, k) for k in ("method", "learning_rate", "lr_scheduler", "epochs", "max_steps",
                                          "batch_size", "grad_accum", "max_length", "seed")}
    if cfg.method == "partial":
        hyper.update(train_layers=cfg.train_layers, train_lm_head=cfg.train_lm_head, train_norm=cfg.train_norm)
    if cfg.method == "lora":
        hyper.update(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                     target_modules=cfg.target_modules)
    if cfg.kd_weight > 0:
        hyper.update(kd_weight=cfg.kd_weight, kd_loss=cfg.kd_loss, kd_temperature=cfg.kd_temperature,
                     teacher=cfg.teacher)
    return {"title": f"selfdistill recovered child ({cfg.responses} arm)", "base_model": cfg.model,
            "data": cfg.data, "arm": arm, "answer_column": data.column, "rows": summary["rows"],
            "rewrites_used": data.rewrites_used, "compute_dtype": dtype, "hyperparameters": hyper,
            "steps": summary["steps"], "final_loss": summary["final_loss"]}
