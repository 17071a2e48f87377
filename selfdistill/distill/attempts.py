"""Best-of-k verified rewrites: the greedy attempt first, then sampled attempts only for rows still failing.

A small parent verifies few greedy rewrites (35 % on GSM8K for SmolLM2-135M), yet a handful of sampled
attempts finds a verified one for most rows. Rows are taken in blocks; within a block attempt 1 (greedy,
or sampled when `temperature` > 0) runs over every row, then waves of sampled attempts run over the rows
with no verified attempt yet: wave 2 is attempt 2, wave 3 attempts 3-4, wave 4 attempts 5-8, ... Waves
grow because a row that failed several times is likely to fail again: one attempt at a time would spend
least, but the copies of a wave share their prompt's prefill (distill/sampled.py) and fill the batch.
Each (row, attempt) samples from its own key (seed, row id, attempt), so a rerun draws the same tokens.
A row keeps its first verified attempt in attempt order; rows are yielded in input order as soon as they
and every row before them are final, so the output file and its resume work as with one attempt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from selfdistill.distill.sampled import attempt_key
from selfdistill.engine import GenParams, Result


@dataclass(frozen=True)
class Attempt:
    number: int  # 1 = the first (greedy) attempt
    text: str
    tokens: int  # generated tokens
    finish: str
    verdicts: dict[str, bool]
    reason: str | None  # None = verified
    cut: bool = False  # text after its final-answer line was cut off (verify.end_at_final_answer)

    @property
    def verified(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class AttemptPlan:
    samples: int  # k: attempts per row at most
    block: int  # rows whose attempts run before the next rows start
    first: GenParams  # attempt 1
    sampled: GenParams  # attempts 2..k
    seed: int


def attempt_waves(samples: int) -> list[list[int]]:
    """Attempt numbers per wave: [1], [2], [3, 4], [5..8], ... up to `samples`."""
    waves, number, size = [[1]], 2, 1
    while number <= samples:
        waves.append(list(range(number, min(samples, number + size - 1) + 1)))
        number, size = number + size, size * 2
    return waves


Judge = Callable[[int, int, Result], Attempt]  # (row index, attempt number, result) -> judged attempt


def best_of_k(todo: list[int], ids: dict[int, list[int]], row_ids: dict[int, str], judge: Judge,
              generate: Any, plan: AttemptPlan, counters: dict[str, int]) -> Iterator[tuple[int, list[Attempt]]]:
    """(row index, its attempts in attempt order) for every row of `todo`, in `todo` order."""
    for start in range(0, len(todo), plan.block):
        block = todo[start:start + plan.block]
        tried: dict[int, list[Attempt]] = {i: [] for i in block}
        pos = 0
        for wave in attempt_waves(plan.samples):
            rows = [i for i in block if not _final(tried[i], plan.samples)]
            for i, attempts in _run_wave(rows, wave, ids, row_ids, judge, generate, plan, counters):
                tried[i].extend(attempts)
                while pos < len(block) and _final(tried[block[pos]], plan.samples):
                    yield block[pos], sorted(tried[block[pos]], key=lambda a: a.number)
                    pos += 1


def _final(attempts: list[Attempt], samples: int) -> bool:
    return len(attempts) >= samples or any(a.verified for a in attempts)


def _run_wave(rows: list[int], wave: list[int], ids: dict[int, list[int]], row_ids: dict[int, str], judge: Judge,
              generate: Any, plan: AttemptPlan, counters: dict[str, int]) -> Iterator[tuple[int, list[Attempt]]]:
    """Every attempt of `wave` for every row; a row's attempts are yielded together, once all are judged,
    so a row is never final with an earlier-numbered attempt still running."""
    items = [(i, n) for i in rows for n in wave]  # a row's copies adjacent: they share a prefill chunk
    params = plan.first if wave == [1] else plan.sampled
    keys = {k: attempt_key(plan.seed, row_ids[i], n) for k, (i, n) in enumerate(items)}
    waiting: dict[int, list[Attempt]] = {}
    if params.temperature <= 0:  # the greedy engine prefills each prompt once (the seeded one counts its own)
        counters["prefilled_tokens"] = counters.get("prefilled_tokens", 0) + sum(len(ids[i]) for i, _ in items)
    for res in generate(((k, ids[i]) for k, (i, _) in enumerate(items)), params, keys=keys, counters=counters):
        i, n = items[res.index]
        counters["generated_tokens"] = counters.get("generated_tokens", 0) + len(res.tokens)
        waiting.setdefault(i, []).append(judge(i, n, res))
        if len(waiting[i]) == len(wave):
            yield i, waiting.pop(i)


def attempt_fields(attempts: list[Attempt]) -> dict[str, Any]:
    """The row's record of its attempts: which one was kept (1-based; None = none verified) and the cost."""
    kept = next((a.number for a in attempts if a.verified), None)
    return {"attempt": kept, "attempts": len(attempts), "attempt_tokens": [a.tokens for a in attempts],
            "attempt_reasons": [a.reason for a in attempts], "attempt_cut": [a.cut for a in attempts]}


def chosen(attempts: list[Attempt]) -> Attempt:
    """The first verified attempt, else the first attempt (whose reason the row reports)."""
    return next((a for a in attempts if a.verified), attempts[0])


def attempt_stats(rows: list[dict[str, Any]], samples: int) -> dict[str, Any]:
    """Rows kept after 1..k attempts (cumulative) and the generated tokens each attempt number cost."""
    kept = [r.get("attempt") for r in rows]
    spent = [0] * samples
    for r in rows:
        for j, n in enumerate(r.get("attempt_tokens") or [r.get("generated_tokens", 0)]):
            if j < samples:
                spent[j] += int(n)
    total, n_kept = sum(spent), sum(1 for a in kept if a is not None)
    cut = [r.get("attempt_cut") or [] for r in rows]
    return {"samples": samples,
            "kept_after_attempts": [sum(1 for a in kept if a is not None and a <= j) for j in range(1, samples + 1)],
            "tokens_by_attempt": spent,
            "tokens_per_kept_row": round(total / n_kept, 1) if n_kept else None,
            # attempts whose text went on after their final-answer line, and how many of those were kept (cut)
            "cut_at_final_answer": {"attempts": sum(map(sum, cut)),
                                    "kept": sum(1 for a, c in zip(kept, cut) if a is not None and a <= len(c)
                                                and c[a - 1])}}
