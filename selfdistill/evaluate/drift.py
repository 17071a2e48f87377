"""Drift of a child from its parent beyond accuracy: mean KL(parent || child) and top-1 agreement.

The parent answers held-out prompts greedily; that answer is teacher-forced through both models and
compared position by position over the answer tokens. Self-data distillation (arXiv 2410.09982) is
meant to keep the child close to the parent, so a lower KL / higher agreement is its mechanism.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

log = logging.getLogger(__name__)


def _load(spec: Any, dtype: str) -> tuple[Any, Any]:
    if isinstance(spec, tuple):
        return spec
    from selfdistill.models import load_model

    return load_model(spec, dtype=dtype)


def _prompt_text(item: Any, tok: Any) -> str:
    """A string is used as a user turn; an Example (data.py) brings its own prompt turns."""
    messages = getattr(item, "messages", None) or [{"role": "user", "content": str(item)}]
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


@torch.no_grad()
def _greedy(model: Any, tok: Any, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    tok.padding_side = "left"  # batched generation needs the prompts flush right
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    answers = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        if tok.eos_token_id in row:  # everything after the first EOS is padding
            row = row[: row.index(tok.eos_token_id) + 1]
        answers.append(row)
    return answers


@torch.no_grad()
def _answer_logprobs(model: Any, ids: list[int], n_answer: int) -> torch.Tensor:
    logits = model(torch.tensor([ids], device=model.device)).logits[0, -n_answer - 1:-1].float()
    return F.log_softmax(logits, dim=-1)


def drift(parent: Any, child: Any, prompts: Sequence[Any], *, max_new_tokens: int = 128, batch_size: int = 8,
          dtype: str = "float32") -> dict[str, float]:
    """Mean per-token KL(parent || child) and top-1 agreement on the parent's greedy answers.

    `parent`/`child`: a model name or path (loaded with `load_model`) or a `(model, tokenizer)` pair;
    the two must share a tokenizer. `prompts`: strings (user turns) or `data.Example`s."""
    return drift_many(parent, {"child": child}, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      dtype=dtype)["child"]


def drift_many(parent: Any, children: Mapping[str, Any], prompts: Sequence[Any], *, max_new_tokens: int = 128,
               batch_size: int = 8, dtype: str = "float32") -> dict[str, dict[str, float]]:
    """`drift` for several children at once: the parent answers and scores each prompt only once."""
    pm, tok = _load(parent, dtype)
    models = {label: _load(spec, dtype)[0] for label, spec in children.items()}
    texts = [_prompt_text(p, tok) for p in prompts]
    sums = {label: {"kl": 0.0, "agree": 0} for label in models}
    tokens = 0
    for start in tqdm(range(0, len(texts), batch_size), desc="drift", unit="batch"):
        batch = texts[start:start + batch_size]
        for text, answer in zip(batch, _greedy(pm, tok, batch, max_new_tokens), strict=True):
            if not answer:
                continue
            ids = tok(text, add_special_tokens=False)["input_ids"] + answer
            lp = _answer_logprobs(pm, ids, len(answer))
            for label, cm in models.items():
                lq = _answer_logprobs(cm, ids, len(answer))
                sums[label]["kl"] += float((lp.exp() * (lp - lq)).sum())
                sums[label]["agree"] += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            tokens += len(answer)
    results = {}
    for label, s in sums.items():
        kl, agreement = (s["kl"] / tokens, s["agree"] / tokens) if tokens else (float("nan"), float("nan"))
        log.info("drift of %s over %d answer tokens: KL %.4f, agreement %.4f", label, tokens, kl, agreement)
        results[label] = {"kl": kl, "agreement": agreement, "tokens": tokens}
    return results
