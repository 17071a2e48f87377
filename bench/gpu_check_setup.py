"""What bench/gpu_check.py builds for itself: a random-weight model of a real shape, a tokenizer, GSM8K-style rows.

Nothing is downloaded: the GPU machines this check is for have no network. The tokenizer is the built-in
SmolLM2 one where it can be had (its cached folder here, or a folder given with --tokenizer, e.g. one written
by `gpu_check.py --export-tokenizer DIR` on a machine that has it); else the byte-level test tokenizer.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Real shapes (the published configs), so kernels, memory and the LM head cost what they cost.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         rope_theta=500000.0, max_position_embeddings=131072),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=0, tie_word_embeddings=True,
                 max_position_embeddings=2048),
}


def load_tokenizer(folder: str | None) -> tuple[Any, str]:
    """(tokenizer, where it came from): --tokenizer, else the built-in alias, else the byte-level test one."""
    from transformers import AutoTokenizer

    if folder:
        return AutoTokenizer.from_pretrained(folder), folder
    try:
        from selfdistill.models import DEFAULT_MODEL, resolve_model

        return AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL)), DEFAULT_MODEL
    except Exception as e:  # noqa: BLE001 - any failure means: not on this machine
        print(f"tokenizer: built-in not available ({type(e).__name__}); byte-level test tokenizer instead")
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import make_tokenizer

        return make_tokenizer(), "byte-level (tests/tiny.py)"


def build_parent(shape: str, tokenizer: Any, out: Path, dtype: str, device: str) -> Path:
    """A random-weight Llama of `shape`, built on `device` (fast), saved with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    dims = dict(SHAPES[shape])
    dims["vocab_size"] = max(dims["vocab_size"], len(tokenizer))
    config = LlamaConfig(**dims, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                         else tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return out


def write_rows(path: Path, n: int, seed: int = 0) -> Path:
    """GSM8K-format rows (question, answer ending in `#### n`), varied so prompts differ in length."""
    rng = random.Random(seed)
    names = ["Tom", "Ana", "Lee", "Mia", "Sam", "Ola"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b, c = rng.randint(2, 90), rng.randint(2, 90), rng.randint(2, 9)
            who = rng.choice(names)
            extra = " Each of them is then put into bags of the same size." * rng.randint(0, 6)
            question = f"{who} has {a} apples and buys {b} more, then gives away {c}.{extra} How many are left?"
            answer = f"{who} has {a} + {b} = {a + b} apples, then {a + b} - {c} = {a + b - c}.\n#### {a + b - c}"
            f.write(json.dumps({"question": question, "answer": answer}) + "\n")
    return path


def prompt_ids(data: Path, tokenizer: Any, n: int) -> list[list[int]]:
    """The first `n` rows' distill prompts (SDFT's rewrite request, chat template, prefill) as token ids."""
    from selfdistill.data import load_examples
    from selfdistill.distill.prompts import render_rewrite

    examples = load_examples(str(data), "gsm8k", limit=n)
    return [tokenizer(render_rewrite(ex, tokenizer)[0], add_special_tokens=False)["input_ids"] for ex in examples]


def missing(*modules: str) -> str | None:
    """The first module of `modules` that cannot be imported (the stage is then skipped), or None."""
    import importlib.util

    for name in modules:
        if importlib.util.find_spec(name) is None:
            return name
    return None
