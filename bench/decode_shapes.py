"""The CPU facts the distill engine's decode step is built on, measured side by side on the built-in model's shapes.

1. Projections: 30 layers of q/k/v/o/gate/up/down for 16 ... 192 tokens at once (bf16). Below ~64 tokens
   the time hardly moves, which is why drafted tokens are nearly free once the batch thins.
2. Decode attention over 32 rows x 500 KV columns with 3, 6 or 15 queries per kv head (1, 2 or 5 tokens
   per row): sdpa with no mask, a bool mask, an additive bias; in fp32; and explicit matmul + softmax; the
   rate at which bf16 sdpa reads the KV, next to a plain sum over as many bytes (and 8x as many).
   Then the same projections and the 49k-row LM head on weights reordered once for oneDNN (the engine's
   packed linears) against plain F.linear, called alternately.
3. Greedy argmax over 120 rows of bf16 logits: fp32 upcast + argmax vs the engine's `greedy_ids`; and how
   many of the real model's logit rows (4 GSM8K rewrite prompts) have a negative maximum, greedy_ids' slow path.

    .venv/bin/python bench/decode_shapes.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.nn.functional import linear
from torch.nn.functional import scaled_dot_product_attention as sdpa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfdistill.data import load_examples  # noqa: E402
from selfdistill.distill.prompts import render_rewrite  # noqa: E402
from selfdistill.engine import greedy_ids  # noqa: E402
from selfdistill.engine.compat import onednn_linear, onednn_pack  # noqa: E402
from selfdistill.engine.packed_linears import PACK_ROWS  # noqa: E402
from selfdistill.models import DEFAULT_MODEL, load_model  # noqa: E402


def timed(fn, reps: int = 20) -> float:
    """Median ms of `reps` calls after 3 warm-up calls (the median resists the box's drift)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[reps // 2]


def alternating(runs: dict, reps: int = 15) -> dict[str, float]:
    """Median ms of each callable, calling them in turn `reps` times (after one warm-up each)."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1000 * sorted(t)[reps // 2] for name, t in times.items()}


def main() -> None:
    model, tok = load_model(DEFAULT_MODEL, dtype="bfloat16")
    cfg = model.config
    layer = model.model.layers[0]
    weights = [m.weight for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                  layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
    flops = 2 * sum(w.numel() for w in weights) * cfg.num_hidden_layers
    print(f"projections, {cfg.num_hidden_layers} layers (bf16, {torch.get_num_threads()} threads)")
    times = {}
    for tokens in (16, 32, 64, 128, 192):
        xs = {w.shape[1]: torch.randn(tokens, w.shape[1], dtype=torch.bfloat16) for w in weights}
        times[tokens] = ms = cfg.num_hidden_layers * timed(lambda: [linear(xs[w.shape[1]], w) for w in weights])
        print(f"  {tokens:4d} tokens: {ms:6.1f} ms  {flops * tokens / ms / 1e6:6.0f} GFLOP/s  {ms / tokens:.3f} ms/token")
    print("  time vs 64 tokens: " + "  ".join(f"{t}: x{ms / times[64]:.2f}" for t, ms in times.items()))

    # The engine's packed linears (engine/packed_linears.py): weights reordered once for oneDNN, timed alternately with
    # plain F.linear so both see the same drift.
    lm_head = model.lm_head.weight
    print("projections and LM head on weights packed once (engine/packed_linears.py) vs F.linear, alternating")
    for tokens in (16, 64, 128, 256, 1024):
        xs = {k: torch.randn(tokens, k, dtype=torch.bfloat16) for k in {w.shape[1] for w in weights}}
        packed = [onednn_pack(w, PACK_ROWS) for w in (*weights, lm_head)]
        runs = {"layer plain": lambda: [linear(xs[w.shape[1]], w) for w in weights],
                "layer packed": lambda: [onednn_linear(p, None, xs[w.shape[1]]) for w, p in zip(weights, packed)],
                "head plain": lambda: linear(xs[lm_head.shape[1]], lm_head),
                "head packed": lambda: onednn_linear(packed[-1], None, xs[lm_head.shape[1]])}
        assert torch.equal(runs["layer plain"]()[-1], runs["layer packed"]()[-1])
        assert torch.equal(runs["head plain"](), runs["head packed"]())
        ms = alternating(runs)
        print(f"  {tokens:4d} tokens: layer {ms['layer plain']:.2f} -> {ms['layer packed']:.2f} ms "
              f"(x{ms['layer packed'] / ms['layer plain']:.2f}); LM head {ms['head plain']:.2f} -> "
              f"{ms['head packed']:.2f} ms (x{ms['head packed'] / ms['head plain']:.2f})")

    rows, kv, dim, cols = 32, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, 500
    group = cfg.num_attention_heads // kv
    kv_bytes = 2 * rows * kv * cols * dim * 2  # K and V in bf16
    print(f"decode attention, {rows} rows x {kv} kv heads x {cols} columns, per call (one layer)")
    for per_row in (1, 2, 5):
        g = group * per_row
        row = {}
        for dtype in (torch.bfloat16, torch.float32):
            k, v = (torch.randn(rows, kv, cols, dim, dtype=dtype) for _ in range(2))
            q = torch.randn(rows, kv, g, dim, dtype=dtype)
            keep = torch.rand(rows, 1, g, cols, generator=torch.Generator().manual_seed(0)) > 0.1
            bias = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))
            name = "bf16" if dtype == torch.bfloat16 else "fp32"
            row[f"{name} no mask"] = timed(lambda: sdpa(q, k, v))
            row[f"{name} bool"] = timed(lambda: sdpa(q, k, v, attn_mask=keep))
            row[f"{name} bias"] = timed(lambda: sdpa(q, k, v, attn_mask=bias))
            row[f"{name} matmul+softmax"] = timed(
                lambda: torch.matmul((torch.matmul(q, k.transpose(-1, -2)) * dim ** -0.5 + bias).softmax(-1), v))
        cells = "  ".join(f"{n} {ms:.2f}" for n, ms in row.items())
        print(f"  {per_row} token(s)/row ({g} queries/kv head), ms: {cells}")
        print(f"    bf16 bias vs bool: x{row['bf16 bias'] / row['bf16 bool']:.2f}; fp32 vs bf16 (bias): "
              f"x{row['fp32 bias'] / row['bf16 bias']:.2f}; matmul+softmax vs sdpa (bf16, bias): "
              f"x{row['bf16 matmul+softmax'] / row['bf16 bias']:.2f}; bf16 sdpa (bias) reads the KV at "
              f"{kv_bytes / row['bf16 bias'] / 1e6:.1f} GB/s")
    # What reading memory costs here: a sum over a tensor well beyond the 2 cores' L2, the KV's size and 8x it.
    for mb in (kv_bytes // 2**20, 8 * kv_bytes // 2**20):
        big = torch.randn(mb * 2**19, dtype=torch.bfloat16)
        print(f"  reference: sum over {mb} MB of bf16 reads at {mb * 2**20 / timed(big.sum) / 1e6:.1f} GB/s")

    logits = torch.randn(120, cfg.vocab_size).bfloat16()
    assert torch.equal(greedy_ids(logits), logits.float().argmax(-1))
    upcast, bits = timed(lambda: logits.float().argmax(-1)), timed(lambda: greedy_ids(logits))
    print(f"greedy argmax, 120 x {cfg.vocab_size} bf16 logits: fp32 upcast {upcast:.2f} ms, greedy_ids {bits:.2f} ms "
          f"(x{bits / upcast:.2f})")
    # greedy_ids' fast path needs a row's maximum to be >= 0: how the real model's rows look on rewrite prompts.
    examples = load_examples(ROOT.parent / "shared/data/gsm8k/train.jsonl", "gsm8k", limit=4)
    with torch.inference_mode():
        maxima = torch.cat([model(input_ids=tok(render_rewrite(e, tok)[0], add_special_tokens=False,
                                                return_tensors="pt")["input_ids"]).logits[0].max(-1).values
                            for e in examples])
    print(f"  real logits (4 GSM8K rewrite prompts, every position): {int((maxima < 0).sum())} of {len(maxima)} rows "
          f"have a negative maximum; the smallest row maximum is {float(maxima.min()):.2f}")


if __name__ == "__main__":
    main()
