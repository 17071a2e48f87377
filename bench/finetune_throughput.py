"""Answer-tokens/s of selfdistill's finetune trainer vs TRL SFTTrainer with its default settings.

Both arms: the built-in SmolLM2-135M with 6 layers (18..23) removed, LoRA r16 / alpha 32 on all linear
layers, the same 256 GSM8K rows, batch 8, max length 512, same seed and so the same batches. TRL's
defaults: the checkpoint's dtype (fp32) under bf16 autocast, gradient checkpointing, padded batches,
its chunked LM head over every position. Ours: bf16 base weights + fp32 adapters, padding-free
batches, logits only at answer positions, no checkpointing. The first step is warm-up and not timed.

    .venv/bin/python bench/finetune_throughput.py --steps 3
"""

from __future__ import annotations

import argparse
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
    return save_model(model, tok, tmp / "child")


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


def ours(child: Path, data: str, steps: int, tmp: Path) -> dict[str, float]:
    cfg = FinetuneConfig(model=str(child), data=data, recipe="gsm8k", responses="original", limit=256,
                         out=str(tmp / "ours"), target_modules=["all-linear"], lora_r=16, lora_alpha=32,
                         max_length=512, batch_size=8, grad_accum=1, max_steps=steps, save_steps=10_000, seed=0)
    return run(prepare(cfg).trainer, StepTimer())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"))
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per arm (the first is warm-up)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        child = make_child(tmp)
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
