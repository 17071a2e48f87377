"""Fine-tuning test data shared by the finetune and recovery tests: distilled rows, and a tiny run's config."""

from __future__ import annotations

import json
from pathlib import Path

from selfdistill.finetune import FinetuneConfig


def distill_rows(n: int = 8) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append({"id": f"r{i}", "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}],
                     "original": f"{2 * i}", "rewrite": f"{i} plus {i} makes {2 * i}.",
                     "used": "rewrite", "response": f"{i} plus {i} makes {2 * i}."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg(model: Path, data: Path, out: Path, **kw) -> FinetuneConfig:
    base = dict(model=str(model), data=str(data), out=str(out), dtype="float32", batch_size=4, grad_accum=1,
                max_steps=2, learning_rate=1e-2, save_steps=50, seed=0)
    return FinetuneConfig(**{**base, **kw})
