"""Every stage of configs/llama31-8b-paper.yaml at tiny limits, on CUDA, with the figures that matter.

On a GPU (one H200, <= 8 minutes): a random-weight model of Llama-3.2-1B's shape (--shape llama-3.1-8b for
the 8B's) built in-process, GSM8K-style rows written here, then prune -> distill with the HF engine (greedy,
sampled, and the eager-attention decode path) -> finetune LoRA on each distilled set (and `partial` where
FinetuneConfig has it) -> evaluate a few items -> SLERP-merge the two children -> speculate -> profile.
Printed: HF-engine distill tokens/s against plain batch-1 `generate` on the same prompts, fine-tuning tokens/s,
evaluation items/s, peak GPU memory; all of it also in OUT/gpu_check.json. A stage whose library is missing
(the GPU machine has no TRL or lm-eval) is skipped with a printed line; a failing stage fails the run.

    bash scripts/gpu_check.sh            # GPU
    bash scripts/gpu_check.sh --cpu      # the same on a tiny model here (tests/test_gpu_check.py runs it)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_check_setup import build_parent, load_tokenizer, missing, prompt_ids, write_rows  # noqa: E402

# Per mode: rows distilled, engine slots, tokens per rewrite, plain-generate prompts, fine-tuning steps, ...
LIMITS = {
    "gpu": dict(rows=64, batch=32, new=128, plain=8, steps=10, ft_batch=4, ft_len=512, items=8, spec=4,
                spec_new=64, seq=512, decode=32, runs=3, calib=16, calib_len=256, prune=4),
    "cpu": dict(rows=6, batch=3, new=8, plain=2, steps=2, ft_batch=2, ft_len=640, items=2, spec=2,
                spec_new=6, seq=16, decode=4, runs=1, calib=4, calib_len=48, prune=2),
}


class Check:
    """Runs the stages in order, records ok / skipped / FAILED and their figures."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.cpu = args.cpu
        self.device, self.dtype = ("cpu", "float32") if args.cpu else ("cuda", "bfloat16")
        self.lim = LIMITS["cpu" if args.cpu else "gpu"]
        self.out = Path(args.out)
        self.paths: dict[str, str] = {}
        self.report: dict[str, Any] = {"mode": "cpu" if args.cpu else "gpu", "shape": args.shape, "stages": {}}

    def stage(self, name: str, fn: Any, needs: tuple[str, ...] = (), after: tuple[str, ...] = ()) -> None:
        lib = missing(*needs)
        gap = next((a for a in after if a not in self.paths), None)
        if lib or gap:
            why = f"{lib} is not installed" if lib else f"needs {gap}, which did not run"
            print(f"{name}: skipped ({why})", flush=True)
            self.report["stages"][name] = {"status": f"skipped: {why}"}
            return
        t0 = time.time()
        try:
            figures = fn() or {}
        except Exception as e:  # noqa: BLE001 - report every stage, then fail the run
            traceback.print_exc()
            print(f"{name}: FAILED ({type(e).__name__}: {e})", flush=True)
            self.report["stages"][name] = {"status": "FAILED", "error": f"{type(e).__name__}: {e}"}
            return
        figures = {"status": "ok", "wall_s": round(time.time() - t0, 1), **figures}
        self.report["stages"][name] = figures
        print(f"{name}: ok  " + "  ".join(f"{k}={v}" for k, v in figures.items() if k != "status"), flush=True)

    def common(self, **extra: Any) -> dict[str, Any]:
        return {"dtype": self.dtype, "device": self.device, **extra}


def prune_stage(c: Check) -> dict[str, Any]:
    from selfdistill.config import from_dict
    from selfdistill.prune import PruneConfig, prune

    out = c.out / "pruned"
    result = prune(from_dict(PruneConfig, c.common(
        model=c.paths["parent"], num_layers=c.lim["prune"], calibration=c.paths["data"], recipe="gsm8k",
        calibration_samples=c.lim["calib"], max_length=c.lim["calib_len"], out=str(out))))
    c.paths["pruned"] = str(out)
    return {"removed": result["removed"]}


def distill_stage(c: Check, kind: str) -> dict[str, Any]:
    from selfdistill.config import from_dict
    from selfdistill.distill import DistillConfig, distill

    out = c.out / f"distill-{kind}" / "distilled.jsonl"
    sampled = {"temperature": 0.95, "top_p": 0.7} if kind == "sampled" else {}  # SDFT's sampling
    stats = distill(from_dict(DistillConfig, c.common(
        teacher=c.paths["parent"], dataset=c.paths["data"], recipe="gsm8k", limit=c.lim["rows"],
        batch_size=c.lim["batch"], max_new_tokens=c.lim["new"], verifiers=["blacklist"], keep_truncated=True,
        out=str(out), **sampled)))
    c.paths[f"distill-{kind}"] = str(out)
    return {"rows": stats["rows_this_run"], "tokens": stats["generated_tokens"], "tokens_per_s": stats["tokens_per_s"]}


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def plain_generate_stage(c: Check) -> dict[str, Any]:
    """Batch-1 greedy `generate` on the first distill prompts: the baseline of the engine's tokens/s."""
    import torch

    from selfdistill.models import load_model

    model, tok = load_model(c.paths["parent"], dtype=c.dtype, device=c.device)
    prompts = prompt_ids(Path(c.paths["data"]), tok, c.lim["plain"])
    tokens, seconds = 0, 0.0
    for ids in prompts:
        x = torch.tensor([ids], device=model.device)
        _synchronize(c.device)
        t0 = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=c.lim["new"], do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        _synchronize(c.device)
        seconds += time.perf_counter() - t0
        tokens += out.shape[1] - len(ids)
    engine = c.report["stages"].get("distill-greedy", {}).get("tokens_per_s")
    plain = round(tokens / seconds, 1)
    return {"prompts": len(prompts), "tokens_per_s": plain, "engine_speedup": round(engine / plain, 2) if engine
            else None}


def eager_decode_stage(c: Check) -> dict[str, Any]:
    """The engine's decode path for models without its slot attention (a CPU mask once reached a CUDA model)."""
    from selfdistill.engine import GenParams, generate_hf
    from selfdistill.models import load_model, stop_token_ids

    model, tok = load_model(c.paths["parent"], dtype=c.dtype, device=c.device, attn_implementation="eager")
    prompts = prompt_ids(Path(c.paths["data"]), tok, 3)
    params = GenParams(max_new_tokens=8, batch_size=2, temperature=0.95, top_p=0.7, stop_ids=stop_token_ids(tok))
    results = list(generate_hf(model, tok, enumerate(prompts), params))
    return {"rows": len(results), "tokens": sum(len(r.tokens) for r in results)}


def finetune_stage(c: Check, name: str, data: str, method: str = "lora") -> dict[str, Any]:
    from selfdistill.config import from_dict
    from selfdistill.finetune import FinetuneConfig, finetune

    out = c.out / name
    summary = finetune(from_dict(FinetuneConfig, c.common(
        model=c.paths["pruned"], data=c.paths[data], method=method, max_steps=c.lim["steps"],
        batch_size=c.lim["ft_batch"], grad_accum=1, max_length=c.lim["ft_len"], save_steps=1000,
        gradient_checkpointing=not c.cpu, out=str(out))))
    c.paths[name] = str(out)
    return {"steps": summary["steps"], "answer_tokens": summary["answer_tokens"],
            "tokens_per_s": summary["tokens_per_s"]}


def partial_available() -> bool:
    """Whether FinetuneConfig has `method: partial` (another change adds it)."""
    from selfdistill.finetune import FinetuneConfig

    return "partial" in typing.get_args(typing.get_type_hints(FinetuneConfig)["method"])


def evaluate_stage(c: Check) -> dict[str, Any]:
    from selfdistill.evaluate import EvalConfig, evaluate
    from selfdistill.paths import default_data_dir

    data_dir = default_data_dir("")
    if data_dir is None:
        return {"note": "no offline evaluation data (../shared/data or $SELFDISTILL_DATA_DIR): not run"}
    out = c.out / "evaluate"
    # The GPU run times MMLU (57 subject tasks: the hub's group structure); the CPU run keeps its test short.
    evaluate(EvalConfig(model=[c.paths["lora-greedy"]], baseline=c.paths["parent"], preset="cpu",
                        tasks=["arc_easy"] if c.cpu else ["arc_easy", "mmlu"], limit=c.lim["items"],
                        data_dir=str(data_dir), batch_size=8, dtype=c.dtype, device=c.device, cache=False,
                        bootstrap_iters=20, out=str(out)))
    scores = json.loads((out / "scores.json").read_text())
    items = sum(t["n"] for m in scores["models"].values() for t in m["tasks"].values())
    seconds = sum(scores["settings"]["wall_time_s"].values())
    return {"items": items, "items_per_s": round(items / seconds, 2)}


def merge_stage(c: Check) -> dict[str, Any]:
    from selfdistill.merge import MergeConfig, merge

    out = c.out / "merged"
    merge(MergeConfig(models=[c.paths["lora-greedy"], c.paths["lora-sampled"]], method="slerp", t=0.5,
                      dtype=c.dtype, out=out))
    c.paths["merged"] = str(out)
    return {}


def speculate_stage(c: Check) -> dict[str, Any]:
    from selfdistill.speculative import SpeculateConfig, speculate

    # float32: random weights leave near-ties that bf16 rounding would flip between batched and stepwise passes
    result = speculate(SpeculateConfig(target=c.paths["parent"], draft=[c.paths["pruned"]], prompts=c.paths["data"],
                                       recipe="gsm8k", k=4, limit=c.lim["spec"], max_new_tokens=c.lim["spec_new"],
                                       dtype="float32", device=c.device, hf_assisted=False))
    row = result["drafts"][0]
    return {"acceptance_rate": round(row["draft_acceptance_rate"], 3), "speedup": round(row["speedup_ours"], 2)}


def profile_stage(c: Check) -> dict[str, Any]:
    from selfdistill.profile import ProfileConfig, profile

    result = profile(ProfileConfig(model=[c.paths["parent"], c.paths["pruned"]], seq_len=c.lim["seq"],
                                   decode_tokens=c.lim["decode"], runs=c.lim["runs"], dtype=c.dtype,
                                   device=c.device, executed_flops=c.cpu))
    parent, child = result["models"]
    return {"parent_prefill_tok_s": round(parent["prefill_tokens_per_s"]),
            "parent_decode_tok_s": round(parent["decode_tokens_per_s"], 1),
            "child_decode_speedup": round(child["decode_speedup"], 3)}


def run_all(c: Check, args: argparse.Namespace) -> None:
    tok, source = load_tokenizer(args.tokenizer)
    c.report["tokenizer"] = source
    c.paths["data"] = str(write_rows(c.out / "data" / "gsm8k.jsonl", c.lim["rows"]))
    c.stage("build", lambda: c.paths.update(parent=str(build_parent(args.shape, tok, c.out / "parent", c.dtype,
                                                                       c.device))))
    c.stage("prune", lambda: prune_stage(c), after=("parent",))
    for kind in ("greedy", "sampled"):
        c.stage(f"distill-{kind}", lambda k=kind: distill_stage(c, k), after=("parent",))
    c.stage("plain-generate", lambda: plain_generate_stage(c), after=("parent",))
    c.stage("eager-decode", lambda: eager_decode_stage(c), after=("parent",))
    for kind in ("greedy", "sampled"):
        c.stage(f"lora-{kind}", lambda k=kind: finetune_stage(c, f"lora-{k}", f"distill-{k}"),
                needs=("trl", "datasets"), after=("pruned", f"distill-{kind}"))
    if partial_available():
        c.stage("partial", lambda: finetune_stage(c, "partial", "distill-greedy", "partial"),
                needs=("trl", "datasets"), after=("pruned", "distill-greedy"))
    else:
        print("partial: not available (FinetuneConfig has no method 'partial')", flush=True)
    c.stage("evaluate", lambda: evaluate_stage(c), needs=("lm_eval", "datasets"), after=("lora-greedy",))
    c.stage("merge", lambda: merge_stage(c), after=("lora-greedy", "lora-sampled"))
    c.stage("speculate", lambda: speculate_stage(c), after=("pruned",))
    c.stage("profile", lambda: profile_stage(c), after=("pruned",))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="tiny model on the CPU (the script's own test)")
    ap.add_argument("--shape", default=None, help="llama-3.2-1b (GPU default), llama-3.1-8b, tiny (CPU default)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the built-in model's)")
    ap.add_argument("--export-tokenizer", default=None, help="write the built-in tokenizer to this folder, exit")
    ap.add_argument("--out", default="runs/gpu_check", help="work folder (models, data, gpu_check.json)")
    args = ap.parse_args(argv)
    if args.export_tokenizer:
        load_tokenizer(None)[0].save_pretrained(args.export_tokenizer)
        return 0
    args.shape = args.shape or ("tiny" if args.cpu else "llama-3.2-1b")
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the tiny CPU check")
        return 2
    if args.cpu:
        torch.set_num_threads(1)  # a tiny model gains nothing from threads, and on a shared box loses much
    c = Check(args)
    started = time.time()
    run_all(c, args)
    c.report["wall_s"] = round(time.time() - started, 1)
    if not args.cpu:
        c.report["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        c.report["gpu"] = torch.cuda.get_device_name()
    c.report["versions"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    (c.out / "gpu_check.json").write_text(json.dumps(c.report, indent=1))
    failed = [n for n, s in c.report["stages"].items() if s["status"] == "FAILED"]
    print(json.dumps({k: v for k, v in c.report.items() if k != "stages"}))
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'ok'} ({c.report['wall_s']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
