"""Where the refilling engine's time goes: prefill forwards vs decode steps, on the built-in parent.

Times every prefill chunk and every decode step of one engine run (the same 64 GSM8K rewrite prompts as
bench/distill_throughput.py) and prints both totals, the mean step time and rows per step; with --profile
it also prints torch.profiler's top operators over 10 decode steps with `--profile-rows` rows live, and
with --packed-ab the median decode step with and without the packed linears (engine/packed_linears.py), the two
alternating step by step on one engine so that both see the same drift of the box's speed.

    .venv/bin/python bench/distill_engine_split.py --n 64 --batch-size 64 --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfdistill import engine as engine_module  # noqa: E402
from selfdistill.data import load_examples  # noqa: E402
from selfdistill.distill.prompts import render_rewrite  # noqa: E402
from selfdistill.engine import packed_linears  # noqa: E402
from selfdistill.models import DEFAULT_MODEL, load_model, stop_token_ids  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/gsm8k/train.jsonl"))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--prefill-tokens", type=int, default=engine_module.GenParams.prefill_tokens)
    ap.add_argument("--no-ragged", action="store_true")
    ap.add_argument("--draft-tokens", type=int, default=engine_module.GenParams.draft_tokens, help="0 = no drafts")
    ap.add_argument("--draft-budget", type=int, default=engine_module.GenParams.draft_budget)
    ap.add_argument("--profile", action="store_true", help="torch.profiler over 10 decode steps")
    ap.add_argument("--profile-rows", type=int, default=None, help="rows live while profiling (default: batch size)")
    ap.add_argument("--packed-ab", default=None, metavar="ROWS,...",
                    help="alternate 40 decode steps with and without packed linears at each of these live-row counts")
    args = ap.parse_args()

    model, tok = load_model(DEFAULT_MODEL, dtype="bfloat16")
    examples = load_examples(args.data, "gsm8k", limit=args.n)
    ids = [tok(render_rewrite(e, tok)[0], add_special_tokens=False)["input_ids"] for e in examples]
    params = engine_module.GenParams(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                     stop_ids=stop_token_ids(tok, model),
                                     prefill_tokens=args.prefill_tokens, ragged=not args.no_ragged,
                                     draft_tokens=args.draft_tokens, draft_budget=args.draft_budget)
    seconds, calls, rows, slots = Counter(), Counter(), 0, 0
    cls = engine_module.RefillEngine
    prefill, step = cls._prefill, cls._step

    def timed_prefill(self, chunk):
        t0 = time.perf_counter()
        out = prefill(self, chunk)
        seconds["prefill"] += time.perf_counter() - t0
        calls["prefill"] += 1
        return out

    def timed_step(self):
        nonlocal rows, slots
        rows += sum(o is not None for o in self.owner)
        slots += self.cache.k[0].shape[0] if self.cache.k else 0
        t0 = time.perf_counter()
        done = list(step(self))
        seconds["decode"] += time.perf_counter() - t0
        calls["decode"] += 1
        return iter(done)

    cls._prefill, cls._step = timed_prefill, timed_step
    t0 = time.perf_counter()
    prompts = engine_module.length_sorted(list(enumerate(ids)), 8 * args.batch_size)
    results = list(engine_module.generate_hf(model, tok, prompts, params))
    wall = time.perf_counter() - t0
    cls._prefill, cls._step = prefill, step
    tokens = sum(len(r.tokens) for r in results)
    print(json.dumps({
        "prompts": args.n, "prompt_tokens": sum(map(len, ids)), "generated_tokens": tokens, "wall_s": round(wall, 2),
        "tok_s": round(tokens / wall, 1), "prefill_s": round(seconds["prefill"], 2), "prefill_forwards": calls["prefill"],
        "decode_s": round(seconds["decode"], 2), "decode_steps": calls["decode"],
        "ms_per_step": round(1000 * seconds["decode"] / max(1, calls["decode"]), 1),
        "rows_per_step": round(rows / max(1, calls["decode"]), 1),
        "slots_per_step": round(slots / max(1, calls["decode"]), 1),
        "prefill_ms_per_generated_token": round(1000 * seconds["prefill"] / tokens, 2),
        "decode_ms_per_generated_token": round(1000 * seconds["decode"] / tokens, 2),
        "tokens_per_row_step": round(tokens / max(1, rows), 2),
        "prefill_tokens": args.prefill_tokens, "ragged": not args.no_ragged, "draft_tokens": args.draft_tokens,
        "draft_budget": args.draft_budget, "threads": torch.get_num_threads(),
    }, indent=2))
    def decoding(live: int):
        """An engine with `live` rows that never finish, past its first steps (into drafting)."""
        eng = cls(model, replace(params, max_new_tokens=10**6, batch_size=live, stop_ids=()), 0)
        prompts = list(engine_module.length_sorted(list(enumerate(ids[:live])), 8 * live))
        list(eng._fill(prompts, list(range(len(prompts)))))
        for _ in range(20):
            list(eng._step())
        return eng

    if args.profile:
        live = args.profile_rows or args.batch_size  # drafts get budget // live - 1 tokens per row
        with torch.inference_mode(), packed_linears(model):
            eng = decoding(live)
            with torch.profiler.profile() as prof:
                for _ in range(10):
                    list(eng._step())
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    for live in map(int, args.packed_ab.split(",")) if args.packed_ab else ():
        times: dict[bool, list[float]] = {False: [], True: []}
        with torch.inference_mode():
            eng = decoding(live)
            for i in range(40):
                with packed_linears(model, enabled=bool(i % 2)):  # packing itself is outside the timing
                    t0 = time.perf_counter()
                    list(eng._step())
                    times[bool(i % 2)].append(time.perf_counter() - t0)
        plain, packed = (1000 * sorted(times[k])[len(times[k]) // 2] for k in (False, True))
        print(f"{live} rows: median decode step {plain:.1f} ms plain, {packed:.1f} ms packed linears "
              f"(x{packed / plain:.3f})")


if __name__ == "__main__":
    main()
