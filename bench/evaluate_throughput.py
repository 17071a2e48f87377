"""Items/s of the evaluate stage's `shared` backend vs plain HFLM (`hf`), same model, same items, one run.

Both backends wrap one loaded copy of the built-in SmolLM2-135M-Instruct and run lm-eval's
`simple_evaluate` (through the stage's own `run_tasks`) on the same seeded subsets of ARC-Easy and
HellaSwag (0-shot, the `cpu` preset's tasks). Runs alternate hf, shared, shared, hf, ... so drift in
the machine's load hits both alike. Per item it compares every choice's log-likelihood and the
acc / acc_norm outcome between the backends; `--reference-batch-size` also compares HFLM with itself
at another batch size, the floor below which two 16-bit runs cannot agree.

    .venv/bin/python bench/evaluate_throughput.py --items 300 --dtype bfloat16
    .venv/bin/python bench/evaluate_throughput.py --items 300 --dtype bfloat16 --softmax-dtype model
    .venv/bin/python bench/evaluate_throughput.py --items 300 --dtype bfloat16 --reference-batch-size 4
    .venv/bin/python bench/evaluate_throughput.py --items 1200 --dtype float32 --rounds 1
    .venv/bin/python bench/evaluate_throughput.py --tasks mmlu truthfulqa_mc2 --items 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from selfdistill.evaluate.presets import select_tasks  # noqa: E402
from selfdistill.evaluate.runner import load_tasks, run_tasks, task_manager  # noqa: E402
from selfdistill.models import DEFAULT_MODEL, load_model  # noqa: E402
from selfdistill.paths import default_data_dir  # noqa: E402

TASKS = ["arc_easy", "hellaswag"]


def make_backend(name: str, model: Any, tok: Any, batch_size: int, softmax_dtype: str) -> Any:
    from lm_eval.models.huggingface import HFLM

    from selfdistill.evaluate.shared import SharedContextLM

    cls = SharedContextLM if name == "shared" else HFLM
    softmax = {"softmax_dtype": softmax_dtype} if softmax_dtype != "model" else {}
    return cls(pretrained=model, tokenizer=tok, batch_size=batch_size, device=str(model.device), **softmax)


def per_item(res: dict[str, Any]) -> dict[tuple[str, Any], dict[str, Any]]:
    """(task, doc_id) -> the choices' log-likelihoods and the item's acc / acc_norm."""
    out = {}
    for task, samples in res["samples"].items():
        for s in samples:
            lls = [float(r[0]) for r in s["filtered_resps"]]
            # MMLU and TruthfulQA report acc only.
            out[(task, s["doc_id"])] = {"lls": lls, "acc": s["acc"], "acc_norm": s.get("acc_norm", s["acc"])}
    return out


def timed_run(lm: Any, tasks: dict[str, Any], seed: int) -> tuple[dict[str, Any], float, float]:
    """lm-eval output, wall seconds of simple_evaluate, and seconds inside loglikelihood (model work)."""
    inner = {"s": 0.0}
    original = lm.loglikelihood

    def counted(requests: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(requests, **kwargs)
        finally:
            inner["s"] += time.perf_counter() - t0
    lm.loglikelihood = counted
    t0 = time.perf_counter()
    res = run_tasks(lm, tasks["objs"], tasks["samples"], tasks["tm"], limit=None, seed=seed,
                    apply_chat_template=False, max_gen_toks=None)
    wall = time.perf_counter() - t0
    lm.loglikelihood = original
    return res, wall, inner["s"]


def compare(a: dict[tuple[str, Any], dict[str, Any]], b: dict[tuple[str, Any], dict[str, Any]],
            tasks: list[str] = TASKS) -> dict[str, Any]:
    keys = sorted(a, key=str)
    diffs = [abs(x - y) for k in keys for x, y in zip(a[k]["lls"], b[k]["lls"], strict=True)]
    out: dict[str, Any] = {"items": len(keys), "max_abs_ll_diff": max(diffs)}
    for metric in ("acc", "acc_norm"):
        # Items whose right/wrong outcome flips; TruthfulQA mc2's acc is a probability mass, not an outcome.
        outcomes = [k for k in keys if {a[k][metric], b[k][metric]} <= {0, 1}]
        out[f"{metric}_items_differing"] = sum(a[k][metric] != b[k][metric] for k in outcomes)
        for task in tasks:
            mine = [k for k in keys if k[0] == f"sd_{task}" or k[0].startswith(f"sd_{task}_")]  # groups: subtasks
            if mine:
                out[f"{task}_{metric}"] = [sum(d[k][metric] for k in mine) / len(mine) for d in (a, b)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=300, help="seeded items per task")
    ap.add_argument("--tasks", nargs="+", default=TASKS, help="local tasks (default: the study's two)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--softmax-dtype", default="float32", choices=["float32", "model"],
                    help="both backends' log-softmax dtype (the evaluate stage's softmax_dtype)")
    ap.add_argument("--rounds", type=int, default=1, help="pairs of runs (hf+shared), order alternating")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", default="", help="also write the figures here")
    ap.add_argument("--reference-batch-size", type=int, default=0,
                    help="also run hf at this batch size and compare hf with itself: the reference's own noise "
                         "floor (in 16-bit, other batch shapes round differently)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    specs = select_tasks("cpu", args.tasks)
    tm = task_manager(specs, default_data_dir(str(ROOT.parent / "shared" / "data")))
    objs, samples = load_tasks(specs, tm, limit=args.items, seed=args.seed)
    tasks = {"objs": objs, "samples": samples, "tm": tm}
    model, tok = load_model(DEFAULT_MODEL, dtype=args.dtype)
    lms = {name: make_backend(name, model, tok, args.batch_size, args.softmax_dtype) for name in ("hf", "shared")}
    n_items = args.items * len(args.tasks)
    runs: dict[str, list[dict[str, float]]] = {"hf": [], "shared": []}
    items: dict[str, Any] = {}
    for r in range(args.rounds):
        for name in (("hf", "shared") if r % 2 == 0 else ("shared", "hf")):
            res, wall, model_s = timed_run(lms[name], tasks, args.seed)
            runs[name].append({"wall_s": wall, "loglikelihood_s": model_s, "items_per_s": n_items / wall})
            items[name] = per_item(res)
            print(f"round {r} {name:6s}: {wall:7.1f} s wall ({model_s:.1f} s in loglikelihood), "
                  f"{n_items / wall:.2f} items/s", flush=True)
    best = {name: max(x["items_per_s"] for x in v) for name, v in runs.items()}
    summary = {"items": n_items, "dtype": args.dtype, "softmax_dtype": args.softmax_dtype,
               "batch_size": args.batch_size, "threads": _threads(),
               "runs": runs, "items_per_s": best, "ratio": best["shared"] / best["hf"],
               "tasks": args.tasks, **compare(items["hf"], items["shared"], args.tasks)}
    if args.reference_batch_size:
        other = make_backend("hf", model, tok, args.reference_batch_size, args.softmax_dtype)
        summary["hf_vs_hf"] = {"batch_sizes": [args.batch_size, args.reference_batch_size],
                               **compare(items["hf"], per_item(timed_run(other, tasks, args.seed)[0]), args.tasks)}
    print(json.dumps(summary, indent=1, default=float))  # lm-eval scores may be numpy numbers
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=float))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
