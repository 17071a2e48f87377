"""The next token from a step's logits: the greedy argmax (on 16-bit bits) or a top-p sample."""

from __future__ import annotations

from typing import Any

from selfdistill.engine.params import GenParams


def greedy_ids(logits: Any) -> Any:
    """argmax over the last dim, first index on ties, as `generate` computes it on the fp32 upcast.

    The upcast plus fp32 argmax of 16-bit logits is a large part of a CPU decode step, so 16-bit logits are
    compared on their raw bits instead. A 16-bit float's bits order as int16 like the floats do among
    non-negative floats, which all sort above the negative ones; so a row whose largest value is
    non-negative has the same argmax over its raw bits (NaN aside; -0.0 sorts just below +0.0). Only a row
    whose maximum is negative needs the magnitude bits of its negatives flipped to order them.
    """
    import torch

    if logits.dtype not in (torch.bfloat16, torch.float16):
        return logits.float().argmax(-1)
    bits = logits.contiguous().view(torch.int16)
    ids = bits.argmax(-1)
    negative = bits.gather(-1, ids[..., None])[..., 0] < 0
    if negative.any():
        rows = bits[negative]
        ids[negative] = (rows ^ ((rows >> 15) & 0x7FFF)).argmax(-1)
    return ids


def choose_tokens(logits: Any, params: GenParams, generator: Any) -> Any:
    """One token per row of `logits`: greedy at temperature 0, else sampled from the top-p nucleus."""
    import torch

    if params.temperature <= 0:
        return greedy_ids(logits)
    probs = torch.softmax(logits.float() / params.temperature, -1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > params.top_p  # keep the smallest set reaching top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
