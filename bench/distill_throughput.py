"""Rewrite throughput: the refilling engine vs one-at-a-time `model.generate` (how sdft generates).

Same GSM8K rewrite prompts, same greedy settings, on the built-in SmolLM2-135M parent. Prints tokens/s
of both, the ratio, the share of the CPU roofline (2 x 135 M FLOP per token at ~425 GFLOP/s bf16 on
the project's 2 cores = ~1,570 tokens/s) and whether the greedy outputs are identical.

    .venv/bin/python bench/distill_throughput.py --n 64 --batch-size 64 --max-new-tokens 256 --single-n 16 --repeat 2 --ablate
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfdistill.data import load_examples  # noqa: E402
from selfdistill.distill.prompts import render_rewrite  # noqa: E402
from selfdistill.engine import GenParams, generate_hf, length_sorted  # noqa: E402
from selfdistill.models import DEFAULT_MODEL, load_model, stop_token_ids  # noqa: E402

PEAK_FLOPS = 425e9  # the bf16 matmul rate on the project's 2 cores
ROOFLINE_TOK_S = PEAK_FLOPS / (2 * 135e6)


def one_at_a_time(model, ids: list[list[int]], max_new: int, stops: tuple[int, ...]) -> tuple[list[list[int]], float]:
    outs, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for x in ids:
            y = model.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                               max_new_tokens=max_new, do_sample=False, eos_token_id=list(stops), pad_token_id=stops[0])
            outs.append([t for t in y[0, len(x):].tolist() if t not in stops])
    return outs, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/gsm8k/train.jsonl"))
    ap.add_argument("--teacher", default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--single-n", type=int, default=None, help="baseline on the first N prompts only (time)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--refill", type=int, default=0)
    ap.add_argument("--prefill-tokens", type=int, default=GenParams.prefill_tokens, help="padded tokens per prefill chunk")
    ap.add_argument("--no-ragged", action="store_true", help="one decode attention call over the shared window")
    ap.add_argument("--draft-tokens", type=int, default=GenParams.draft_tokens, help="prompt-lookup drafts; 0 = off")
    ap.add_argument("--draft-budget", type=int, default=GenParams.draft_budget)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ablate", action="store_true",
                    help="also time the engine without drafts, without packed linears, and in its first form "
                         "(no chunked prefill, ragged decode, drafts or packed linears)")
    ap.add_argument("--repeat", type=int, default=1, help="engine + one-at-a-time pairs; the median ratio counts")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()

    model, tok = load_model(args.teacher, dtype=args.dtype)
    examples = load_examples(args.data, "gsm8k", limit=args.n)
    ids = [tok(render_rewrite(e, tok)[0], add_special_tokens=False)["input_ids"] for e in examples]
    stops = stop_token_ids(tok, model)
    params = GenParams(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, stop_ids=stops,
                       refill=args.refill, prefill_tokens=args.prefill_tokens, ragged=not args.no_ragged,
                       draft_tokens=args.draft_tokens, draft_budget=args.draft_budget)

    def engine(p: GenParams) -> tuple[dict[int, list[int]], float]:
        t0 = time.perf_counter()
        out = {r.index: r.tokens for r in generate_hf(model, tok, length_sorted(list(enumerate(ids)), 8 * args.batch_size), p)}
        return out, time.perf_counter() - t0

    single_n = args.single_n or args.n
    reps = []  # the box's speed drifts by up to ~2x over minutes: each ratio pairs runs adjacent in time
    ablation = {}
    for rep in range(args.repeat):
        got, engine_s = engine(params)
        engine_tokens = sum(len(v) for v in got.values())
        print(f"[{rep}] engine: {engine_tokens} tokens in {engine_s:.1f} s", file=sys.stderr, flush=True)
        if args.ablate and rep == 0:  # the same engine without drafts, or without packed linears; and its
            # first form (one prefill forward for the whole fill, one attention call over the shared window)
            for name, p in (("without_drafts", replace(params, draft_tokens=0)),
                            ("without_packed_linears", replace(params, packed_linears=False)),
                            ("first_form", replace(params, prefill_tokens=10**9, ragged=False, draft_tokens=0,
                                                   packed_linears=False))):
                out, secs = engine(p)
                n = sum(len(v) for v in out.values())
                ablation[name] = {"tokens": n, "seconds": round(secs, 2), "tok_s": round(n / secs, 1),
                                  "engine_speedup_over_it": round((engine_tokens / engine_s) / (n / secs), 2)}
                print(f"[{rep}] engine {name}: {n} tokens in {secs:.1f} s", file=sys.stderr, flush=True)
        single, single_s = one_at_a_time(model, ids[:single_n], args.max_new_tokens, stops)
        single_tokens = sum(len(s) for s in single)
        print(f"[{rep}] one at a time: {single_tokens} tokens in {single_s:.1f} s", file=sys.stderr, flush=True)
        reps.append({"engine": {"tokens": engine_tokens, "seconds": round(engine_s, 2),
                                "tok_s": round(engine_tokens / engine_s, 1)},
                     "one_at_a_time": {"prompts": single_n, "tokens": single_tokens, "seconds": round(single_s, 2),
                                       "tok_s": round(single_tokens / single_s, 1)},
                     "speedup": round((engine_tokens / engine_s) / (single_tokens / single_s), 2)})
    diverged = {i: next((k for k, (a, b) in enumerate(zip(s, got[i])) if a != b), min(len(s), len(got[i])))
                for i, s in enumerate(single) if s != got[i]}
    engine_tok_s = statistics.median(r["engine"]["tok_s"] for r in reps)
    # The roofline counts generated tokens only; a rewrite prompt is ~1.6x longer than its rewrite,
    # and prefilling it is compute too. So also give the matmul FLOP/s the run achieved against the peak: a
    # generated token runs every layer and the LM head, a prompt token the layers only (the prefill keeps the
    # last position's logits alone).
    prompt_share = sum(map(len, ids)) / max(1, sum(r["engine"]["tokens"] for r in reps[:1]))
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    flops_generated = 2 * (layer_params + model.lm_head.weight.numel())
    flops_per_generated = flops_generated + prompt_share * 2 * layer_params
    result = {
        "prompts": args.n, "mean_prompt_tokens": round(sum(map(len, ids)) / len(ids), 1),
        "dtype": args.dtype, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "prefill_tokens": args.prefill_tokens, "ragged": not args.no_ragged,
        "draft_tokens": args.draft_tokens, "draft_budget": args.draft_budget,
        "threads": torch.get_num_threads(), "repeats": reps, "ablation": ablation or None,
        "speedup_median": round(statistics.median(r["speedup"] for r in reps), 2),
        "engine_tok_s_median": engine_tok_s,
        "roofline_fraction": round(engine_tok_s / ROOFLINE_TOK_S, 3),
        "roofline_with_prefill_tok_s": round(PEAK_FLOPS / flops_per_generated),
        "roofline_fraction_with_prefill": round(engine_tok_s * flops_per_generated / PEAK_FLOPS, 3),
        "identical_greedy": f"{single_n - len(diverged)}/{single_n}",
        "first_divergence_token": diverged,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
