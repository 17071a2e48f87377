"""Answer-tokens/s of selfdistill's finetune trainer vs TRL SFTTrainer with its default settings.

Both arms: the built-in SmolLM2-135M with 6 layers (18..23) removed, LoRA r16 / alpha 32 on all linear
layers, the same 256 GSM8K rows, batch 8, max length 512, same seed and so the same batches. TRL's
defaults: the checkpoint's dtype (fp32) under bf16 autocast, gradient checkpointing, padded batches,
its chunked LM head over every position. Ours: bf16 base weights + fp32 adapters, padding-free
batches, logits only at answer positions, no checkpointing. The first step is warm-up and not timed.

    .venv/bin/python bench/finetune_throughput.py --steps 3

`--suite recovery` instead compares, on the same child, rows and batches: partial fine-tuning (the 6 layers
after the cut, the final norm and the untied LM head, in full rank) against LoRA r16 all-linear, in
answer-tokens/s; and one KD epoch over `--kd-rows` rows (kd_weight 0.5, the unpruned parent) with the
parent's cached top-64 logits against the live parent (the cache's one-off build is timed separately).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfdistill.finetune import FinetuneConfig  # noqa: E402
from selfdistill.finetune.data import load_train_data  # noqa: E402
from selfdistill.finetune.run import prepare  # noqa: E402
from selfdistill.models import DEFAULT_MODEL, decoder_layers, load_model, save_model  # noqa: E402

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, and the answer tokens each batch carried (via the collator)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._t0 = 0.0

    def wrap(self, collator: Any) -> Any:
        def counted(rows: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collator(rows)
            self.tokens.append(int((batch["labels"][:, 1:] != -100).sum()))
            return batch
        return counted

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self._t0)


def make_child(tmp: Path) -> Path:
    model, tok = load_model(DEFAULT_MODEL, dtype="float32")
    layers = decoder_layers(model)
    model.model.layers = torch.nn.ModuleList(layer for i, layer in enumerate(layers) if not 18 <= i < 24)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = len(model.model.layers)
    child = save_model(model, tok, tmp / "child")
    (Path(child) / "pruning.json").write_text(json.dumps({"removed_layers": list(range(18, 24))}))  # for after_cut
    return Path(child)


def run(trainer: Any, timer: StepTimer) -> dict[str, float]:
    trainer.data_collator = timer.wrap(trainer.data_collator)
    trainer.add_callback(timer)
    trainer.train()
    timed = timer.times[1:]  # step 0 is warm-up
    tokens = sum(timer.tokens[1:len(timer.times)])
    return {"s_per_step": sum(timed) / len(timed), "answer_tokens": tokens, "tok_s": tokens / sum(timed)}


def trl_default(child: Path, data: str, steps: int, tmp: Path) -> dict[str, float]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    rows = load_train_data(data, "original", "gsm8k", limit=256).rows
    args = SFTConfig(output_dir=str(tmp / "trl"), max_steps=steps, max_length=512, per_device_train_batch_size=8,
                     use_cpu=True, report_to="none", save_strategy="no", seed=0)
    trainer = SFTTrainer(model=str(child), args=args, train_dataset=Dataset.from_list(rows),
                         peft_config=LoraConfig(**LORA))
    return run(trainer, StepTimer())


def ours(child: Path, data: str, steps: int, tmp: Path, **overrides: Any) -> dict[str, float]:
    settings = dict(model=str(child), data=data, recipe="gsm8k", responses="original", limit=256,
                    out=str(tmp / "ours"), target_modules=["all-linear"], lora_r=16, lora_alpha=32,
                    max_length=512, batch_size=8, grad_accum=1, max_steps=steps, save_steps=10_000, seed=0)
    return run(prepare(FinetuneConfig(**{**settings, **overrides})).trainer, StepTimer())


def kd_epoch(child: Path, data: Path, rows: int, tmp: Path, cached: bool) -> dict[str, float]:
    """One epoch of SDD-style KD (every step timed, none warm-up): the live parent, or its cached logits."""
    cfg = FinetuneConfig(model=str(child), data=str(data), responses="original", limit=rows,
                         out=str(tmp / f"kd-{cached}"), target_modules=["all-linear"], lora_r=16, lora_alpha=32,
                         max_length=512, batch_size=8, grad_accum=1, epochs=1.0, save_steps=10_000, seed=0,
                         kd_weight=0.5, teacher=DEFAULT_MODEL, kd_cache=cached, kd_top_k=64,
                         kd_cache_dir=str(tmp / "kd-cache") if cached else None)
    t0 = time.perf_counter()
    trainer = prepare(cfg).trainer
    setup = time.perf_counter() - t0
    timer = StepTimer()
    trainer.data_collator = timer.wrap(trainer.data_collator)
    trainer.add_callback(timer)
    trainer.train()
    return {"setup_s": setup, "epoch_s": sum(timer.times), "steps": len(timer.times),
            "answer_tokens": sum(timer.tokens[:len(timer.times)])}


def recovery_suite(child: Path, data: str, steps: int, kd_rows: int, tmp: Path) -> None:
    from selfdistill.data import load_examples

    lora = ours(child, data, steps, tmp)
    partial = ours(child, data, steps, tmp, method="partial", train_layers="after_cut", out=str(tmp / "partial"))
    print(f"\n{steps - 1} timed steps per arm (batch 8, seq <= 512, 24-layer SmolLM2 child, same rows)")
    for name, r in (("LoRA r16 all-linear", lora), ("partial after_cut+norm+head", partial)):
        print(f"{name:28s} {r['s_per_step']:7.1f} s/step  {r['answer_tokens']:6d} answer tokens  "
              f"{r['tok_s']:7.1f} answer-tokens/s")
    print(f"partial / LoRA: {partial['tok_s'] / lora['tok_s']:.2f}x")
    # KD reads a distill-format file so the cache sits beside it; the original answers stand in for rewrites.
    examples = load_examples(data, "gsm8k", limit=kd_rows)
    rows = tmp / "kd.jsonl"
    rows.write_text("".join(json.dumps({"id": e.id, "messages": e.messages, "original": e.reference,
                                        "response": e.reference}) + "\n" for e in examples))
    live, cached = kd_epoch(child, rows, kd_rows, tmp, False), kd_epoch(child, rows, kd_rows, tmp, True)
    again = kd_epoch(child, rows, kd_rows, tmp, True)  # a second KD arm or epoch: the cache is reused
    print(f"\nKD epoch, {kd_rows} rows, {live['steps']} steps, {live['answer_tokens']} answer tokens:")
    print(f"live parent          {live['epoch_s']:7.1f} s/epoch")
    print(f"cached top-64 logits {cached['epoch_s']:7.1f} s/epoch  (cache built once in "
          f"{cached['setup_s'] - again['setup_s']:.1f} s more setup; reused: {again['epoch_s']:.1f} s/epoch)")
    print(f"live / cached epoch: {live['epoch_s'] / cached['epoch_s']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"))
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per arm (the first is warm-up)")
    parser.add_argument("--suite", choices=("trl", "recovery"), default="trl",
                        help="trl: ours vs TRL's defaults; recovery: partial vs LoRA, cached vs live KD")
    parser.add_argument("--kd-rows", type=int, default=64, help="rows of the KD epoch (recovery suite)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        child = make_child(tmp)
        if args.suite == "recovery":
            recovery_suite(child, args.data, args.steps, args.kd_rows, tmp)
            return
        results = {"TRL SFTTrainer defaults": trl_default(child, args.data, args.steps, tmp),
                   "selfdistill finetune": ours(child, args.data, args.steps, tmp)}
    print(f"\n{args.steps - 1} timed steps per arm (batch 8, seq <= 512, LoRA r16 all-linear, 24-layer SmolLM2)")
    for name, r in results.items():
        print(f"{name:26s} {r['s_per_step']:7.1f} s/step  {r['answer_tokens']:6d} answer tokens  "
              f"{r['tok_s']:7.1f} answer-tokens/s")
    base, new = results.values()
    print(f"speed-up: {new['tok_s'] / base['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
