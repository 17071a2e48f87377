"""What a generation call takes (`GenParams`) and yields per prompt (`Result`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32
    stop_ids: tuple[int, ...] = ()
    refill: int = 0  # refill when this many slots are free; 0 = batch_size // 8 (at least 1)
    prefill_tokens: int = 1024  # padded prompt tokens per prefill forward (see prefill.py)
    ragged: bool = True  # decode attention per group of slots over their own columns (sdpa models only)
    draft_tokens: int = 4  # most prompt-lookup draft tokens per row and step (greedy, ragged only); 0 = off
    draft_ngram: int = 3  # longest n-gram looked up for a draft (the longest match wins)
    draft_budget: int = 128  # tokens per decode step that drafts may fill: slots x (1 + drafts) <= this
    packed_linears: bool = True  # 16-bit CPU linears on weights reordered once for oneDNN (packed_linears.py)
    # One more decode attention call per layer costs about as much as reading this many (row, column) KV pairs
    # (on CPU: an sdpa call's fixed cost against the cost per row-column at 3 kv heads x 64 dims); 0 = one
    # group per distinct row, very large = one group (attention.py).
    group_cost: int = 512


@dataclass(frozen=True)
class Result:
    index: int  # the caller's key for the prompt
    tokens: list[int]  # generated ids, without the stop token
    finish: str  # "stop" (end-of-turn) | "length" (max_new_tokens reached)
