"""Parent vs pruned children on this machine: cost profile and speculative-decoding acceptance, side by side.

    .venv/bin/python bench/speculate_profile.py --child runs/prune-smollm2 --drop 18-23 --limit 4 \
        --max-new-tokens 48 --out-dir runs/bench-spec

`--drop A-B` also builds an unrecovered child by deleting layers A..B (inclusive) of the parent by hand.
Prints the two Markdown tables and writes profile.json / spec.json (+ .md) under --out-dir.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from selfdistill.models import DEFAULT_MODEL, decoder_layers, load_model, save_model
from selfdistill.profile import ProfileConfig, profile
from selfdistill.profile import table as profile_table
from selfdistill.speculative import SpeculateConfig, speculate
from selfdistill.speculative import table as spec_table


def drop_layers(parent: str, first: int, last: int, out: Path) -> Path:
    """A child without layers first..last (inclusive), nothing recovered; for acceptance comparisons only."""
    import torch

    model, tok = load_model(parent)
    layers = decoder_layers(model)
    keep = torch.nn.ModuleList(layer for i, layer in enumerate(layers) if not first <= i <= last)
    model.model.layers = keep
    model.config.num_hidden_layers = len(keep)
    for i, layer in enumerate(keep):
        layer.self_attn.layer_idx = i
    return save_model(model, tok, out, card={"title": f"{parent} without layers {first}..{last} (unrecovered)"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", default=DEFAULT_MODEL)
    ap.add_argument("--child", action="append", default=[], help="a pruned child folder (repeatable)")
    ap.add_argument("--drop", action="append", default=[], help="build a child without layers A-B (inclusive)")
    ap.add_argument("--prompts", default=str(Path(__file__).resolve().parents[2] / "shared/data/gsm8k/test.jsonl"))
    ap.add_argument("--recipe", default="gsm8k")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out-dir", type=Path, default=Path("runs/bench-spec"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    children = list(args.child)
    for spec in args.drop:
        first, last = (int(x) for x in spec.split("-"))
        children.append(str(drop_layers(args.parent, first, last, args.out_dir / f"drop-{first}-{last}")))
    prof = profile(ProfileConfig(model=[args.parent, *children], seq_len=args.seq_len,
                                 out=args.out_dir / "profile.json"))
    print(profile_table(prof))
    spec = speculate(SpeculateConfig(target=args.parent, draft=children, prompts=args.prompts, recipe=args.recipe,
                                     k=args.k, limit=args.limit, max_new_tokens=args.max_new_tokens,
                                     out=args.out_dir / "spec.json"))
    print(spec_table(spec))


if __name__ == "__main__":
    main()
