"""Prompt-lookup drafts: the tokens that followed the latest earlier occurrence of a row's last n tokens.

A rewrite copies much of its prompt (the reference answer, the question's numbers), so those tokens are
often what the model says next. A decode step feeds them after the row's last token and keeps the longest
prefix the model's own argmax agrees with (packed.py), so the output stays the greedy output.
"""

from __future__ import annotations


class NgramDrafter:
    """Prompt lookup for one row: the tokens that followed the latest earlier occurrence of its last n tokens.

    `index[n]` maps every n-gram of the row's context to where its latest continuation starts, updated as
    tokens arrive, so a lookup is a dict hit instead of a scan of the prompt.
    """

    def __init__(self, tokens: list[int], max_n: int) -> None:
        self.ctx: list[int] = []
        self.index: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n + 1)]
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        ctx, old = self.ctx, len(self.ctx)
        ctx.extend(tokens)
        for t in range(max(1, old), len(ctx)):  # continuation ctx[t] follows the n tokens before it
            for n in range(1, min(t, len(self.index) - 1) + 1):
                self.index[n][tuple(ctx[t - n:t])] = t

    def draft(self, k: int) -> list[int]:
        ctx = self.ctx
        for n in range(min(len(self.index) - 1, len(ctx)), 0, -1):
            t = self.index[n].get(tuple(ctx[-n:]))
            if t is not None:
                return ctx[t:t + k]
        return []


def drafts_per_row(draft_tokens: int, draft_budget: int, live: int) -> int:
    """Draft tokens each of `live` rows may carry in one step.

    At a full batch the matmuls are compute-bound and a drafted token costs what a row does, while a thinned
    batch gets drafts nearly free: so drafts fill at most `draft_budget` tokens per step across the rows.
    """
    return min(draft_tokens, draft_budget // max(1, live) - 1)
