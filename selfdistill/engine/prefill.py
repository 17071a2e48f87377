"""Prefill in chunks: new prompts run through the model left-padded, about `prefill_tokens` at a time.

Chunks of about 1k padded tokens instead of one forward over every new prompt keep the activations in CPU
cache, where the memory-bound elementwise ops (norms, rotary, SiLU) run much faster per token
(docs/distill.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

Prompt = tuple[int, list[int]]  # (the caller's index, token ids)


def prefill_chunks(batch: list[Prompt], free: list[int], prefill_tokens: int) -> Iterator[tuple[list[Prompt], list[int]]]:
    """(prompts, their slots) per prefill forward: longest first, each chunk as many prompts as fit in
    `prefill_tokens` once padded to its own longest (at least one); prompt i goes to slot `free[i]`."""
    order = sorted(range(len(batch)), key=lambda i: -len(batch[i][1]))
    at = 0
    while at < len(order):
        width, n = len(batch[order[at]][1]), 1
        while at + n < len(order) and (n + 1) * width <= prefill_tokens:
            n += 1
        take = order[at:at + n]
        yield [batch[i] for i in take], [free[i] for i in take]
        at += n


def left_padded(chunk: list[Prompt], pad_id: int) -> tuple[Any, Any]:
    """(ids, attention mask), both [prompts, longest], each prompt right-aligned after `pad_id`s."""
    import torch

    width = max(len(ids) for _, ids in chunk)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(chunk), width), dtype=torch.long)
    for j, (_, prompt) in enumerate(chunk):
        ids[j, width - len(prompt):] = torch.tensor(prompt)
        attn[j, width - len(prompt):] = 1
    return ids, attn
