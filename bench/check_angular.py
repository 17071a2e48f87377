"""Recompute the angular distances of a prune run independently and compare with its pruning.json.

Independent path: one sample at a time (no padding, no batching), hidden states from
`output_hidden_states=True` with the final norm replaced by identity (so the last state is the
pre-norm residual stream), cosine via torch.nn.functional, arccos via math.

    python bench/check_angular.py --pruned runs/prune-smollm2 --parent smollm2-135m-instruct \
        --calibration ../shared/data/gsm8k/train.jsonl --recipe gsm8k --samples 64 --no-chat-template
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from selfdistill.data import load_examples, render_text
from selfdistill.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pruned", required=True)
    ap.add_argument("--parent", default="smollm2-135m-instruct")
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--recipe", default=None)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    report = json.loads((Path(args.pruned) / "pruning.json").read_text())
    model, tok = load_model(args.parent)
    model.model.norm = torch.nn.Identity()
    examples = load_examples(args.calibration, args.recipe, limit=args.samples)
    states = []
    with torch.no_grad():
        for e in examples:
            ids = tok(render_text(e, tok, args.chat_template), truncation=True, max_length=args.max_length,
                      add_special_tokens=False, return_tensors="pt").input_ids
            hidden = model(ids, output_hidden_states=True).hidden_states
            states.append([h[0, -1].double() for h in hidden])
    L = len(states[0]) - 1
    worst = 0.0
    for n, row in zip(report["scores"]["block_sizes"], report["scores"]["matrix"]):
        for l in range(L - n + 1):
            d = sum(math.acos(max(-1.0, min(1.0, torch.nn.functional.cosine_similarity(s[l], s[l + n], dim=0)
                                           .item()))) / math.pi for s in states) / len(states)
            worst = max(worst, abs(d - row[l]))
    n = report["n"]
    row = report["scores"]["distances_by_start"]
    chosen = report["removed_layers"][0]
    around = {l: round(row[l], 4) for l in range(max(0, chosen - 3), min(len(row), chosen + 4)) if row[l] is not None}
    print(f"samples {len(states)}, layers {L}, n {n}: chose {report['removed_range']}")
    print(f"d(l, {n}) around the choice: {around}")
    print(f"max |selfdistill - independent| over the whole {len(report['scores']['matrix'])}x{L} matrix: {worst:.2e}")


if __name__ == "__main__":
    main()
