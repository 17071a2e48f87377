"""How much prompt-lookup drafting would save on a distill output, replayed offline (no model runs).

Reads a `selfdistill distill` JSONL (the parent's greedy rewrites), rebuilds each rewrite prompt as the
engine tokenized it, and replays the engine's `NgramDrafter` against the tokens the parent actually
produced: the share of drafted tokens accepted and tokens per row-step at 1-4 drafts per step; then the
decode steps the first `--batch` rows need together under the engine's flat budget vs a per-row adaptive
draft length (grow after a full accept, shrink after a reject).

    .venv/bin/python bench/draft_replay.py runs/smollm2-study/distill-gsm8k/distilled.jsonl --recipe gsm8k
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfdistill.data import load_examples  # noqa: E402
from selfdistill.distill.prompts import render_rewrite  # noqa: E402
from selfdistill.engine import GenParams, NgramDrafter  # noqa: E402
from selfdistill.models import DEFAULT_MODEL, load_model  # noqa: E402


def accepted(draft: list[int], truth: list[int]) -> int:
    n = 0
    while n < len(draft) and n < len(truth) and draft[n] == truth[n]:
        n += 1
    return n


def replay(prompts: list[list[int]], outs: list[list[int]], draft_len,
           budget: int | None) -> tuple[int, int, int, int]:
    """(steps, row-steps, drafted tokens, accepted drafts) decoding all rows together from their first
    token (the prefill's); `draft_len(row, live rows)` -> drafts wanted; `budget` caps tokens per step."""
    drafters = [NgramDrafter(p + o[:1], GenParams.draft_ngram) for p, o in zip(prompts, outs)]
    done, steps, row_steps, drafted, kept = [1] * len(outs), 0, 0, 0, 0
    while live := [i for i in range(len(outs)) if done[i] < len(outs[i])]:
        room = budget if budget is not None else 10**9
        for i in live:
            k = max(0, min(draft_len(i, len(live)), room - 1))
            room -= 1 + k
            row_steps += 1
            draft = drafters[i].draft(k) if k > 0 else []
            a = accepted(draft, outs[i][done[i]:])
            advance = min(a + 1, len(outs[i]) - done[i])
            drafters[i].extend(outs[i][done[i]:done[i] + advance])
            done[i] += advance
            drafted, kept = drafted + len(draft), kept + a
            draft_len.feedback(i, len(draft), a)
        steps += 1
    return steps, row_steps, drafted, kept


class Flat:
    """The engine's rule: min(draft_tokens, budget // live rows - 1) for every row."""

    def __init__(self, k: int, budget: int) -> None:
        self.k, self.budget = k, budget

    def __call__(self, row: int, live: int) -> int:
        return min(self.k, self.budget // live - 1)

    def feedback(self, row: int, drafted: int, kept: int) -> None:
        pass


class Adaptive(Flat):
    def __init__(self, k: int, budget: int) -> None:
        super().__init__(k, budget)
        self.per_row: dict[int, int] = {}

    def __call__(self, row: int, live: int) -> int:
        return self.per_row.get(row, 2)

    def feedback(self, row: int, drafted: int, kept: int) -> None:
        if drafted:
            self.per_row[row] = min(self.k, self.per_row.get(row, 2) + 1) if kept == drafted else max(1, kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("distilled", help="a distill output JSONL")
    ap.add_argument("--recipe", default="gsm8k")
    ap.add_argument("--rows", type=int, default=150, help="rows for the acceptance table")
    ap.add_argument("--batch", type=int, default=64, help="rows decoded together for the step counts")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="cut each rewrite here (the benchmark's limit)")
    args = ap.parse_args()

    _, tok = load_model(DEFAULT_MODEL, dtype="bfloat16")
    rows = [json.loads(line) for line in Path(args.distilled).read_text().splitlines()[:args.rows]]
    examples = load_examples(rows[0]["source"].rsplit(":", 1)[0], args.recipe, limit=len(rows))
    prompts, outs = [], []
    for ex, row in zip(examples, rows):
        text, prefill = render_rewrite(ex, tok)
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
        generated = row["rewrite"][len(prefill):]  # the prompt ends with the prefill
        outs.append(tok(generated, add_special_tokens=False)["input_ids"][:args.max_new_tokens])
    tokens = sum(map(len, outs))
    print(f"{len(rows)} rewrites, {tokens} tokens")
    for k in (1, 2, 3, 4):
        _, row_steps, drafted, kept = replay(prompts, outs, Flat(k, 10**9), budget=None)
        print(f"  up to {k} draft(s) per step, no budget: {kept / max(1, drafted):.1%} of {drafted} drafted tokens "
              f"accepted, {(tokens - len(outs)) / max(1, row_steps):.2f} tokens per row-step")
    p, o = prompts[:args.batch], outs[:args.batch]
    print(f"first {len(o)} rows decoded together ({sum(map(len, o))} tokens), "
          f"<= {GenParams.draft_tokens} drafts/row and {GenParams.draft_budget} tokens/step:")
    for name, rule in (("no drafts", Flat(0, 1)),
                       ("flat budget (the engine)", Flat(GenParams.draft_tokens, GenParams.draft_budget)),
                       ("adaptive per row", Adaptive(GenParams.draft_tokens, GenParams.draft_budget))):
        steps, row_steps, drafted, kept = replay(p, o, rule, budget=GenParams.draft_budget)
        print(f"  {name}: {steps} steps, {row_steps} row-steps, {drafted} drafted, {kept} accepted")


if __name__ == "__main__":
    main()
