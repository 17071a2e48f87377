"""configs/llama31-8b-paper.yaml as written, every stage, on the CPU: a tiny random model stands in for the 8B
parent, the offline group-structured openllm-v1-local preset for the hub's openllm-v1, HF generation for vLLM,
CPU float32 for CUDA bfloat16, and every size is cut to a few items. Its structure is kept: three arms, two
distilled datasets whose SDD children are merged, drift, speculation, profile."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from selfdistill.config import from_dict
from selfdistill.pipeline import PipelineConfig, run

ROOT = Path(__file__).resolve().parents[1]
TINY_LIMITS = {
    "prune": {"num_layers": 2, "calibration_samples": 4, "max_length": 48},
    "distill": {"batch_size": 4, "max_new_tokens": 8},
    "finetune": {"max_steps": 2, "epochs": 1, "batch_size": 2, "grad_accum": 1, "max_length": 640,
                 "gradient_checkpointing": False, "save_steps": 1},
    "evaluate": {"limit": 2, "batch_size": 4, "max_gen_toks": 8, "cache": False, "bootstrap_iters": 20},
    "speculate": {"limit": 2, "max_new_tokens": 6, "hf_assisted": False},
    "profile": {"seq_len": 16, "runs": 1, "decode_tokens": 4},
    "drift": {"batch_size": 2, "bootstrap_iters": 20},
}


def _on_cpu(section: dict[str, Any]) -> dict[str, Any]:
    """The section with CUDA/bf16 swapped for CPU/fp32 and vLLM for the HF engine; every other key kept."""
    swaps = {("device", "cuda"): "cpu", ("dtype", "bfloat16"): "float32", ("backend", "vllm"): "hf"}
    return {k: swaps.get((k, v), v) if isinstance(v, str) else v for k, v in section.items()}


def _dolly_rows(path: Path) -> Path:
    rows = [{"instruction": f"Name a use of item {i}.", "context": "", "response": f"Item {i} holds things.",
             "category": "open_qa"} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def paper_on_cpu(tmp: Path, parent: Path, data_dir: Path) -> dict[str, Any]:
    cfg = yaml.safe_load((ROOT / "configs" / "llama31-8b-paper.yaml").read_text())
    gsm8k = tmp / "gsm8k.jsonl"
    gsm8k.write_text("".join((data_dir / "gsm8k" / "train.jsonl").read_text().splitlines(True)[:8]))
    local = {"gsm8k": gsm8k, "dolly": _dolly_rows(tmp / "dolly.jsonl")}  # dolly is hub-only in the config
    cfg["datasets"] = [{**d, "local": str(local[d["name"]]), "limit": 4} for d in cfg["datasets"]]
    cfg.update(run_dir=str(tmp / "run"), parent=str(parent), data_dir=str(data_dir), drift_prompts=2,
               drift_max_new_tokens=4)
    for name, limits in TINY_LIMITS.items():
        cfg[name] = {**_on_cpu(cfg[name]), **limits}
    assert cfg["evaluate"]["preset"] == "openllm-v1"
    cfg["evaluate"]["preset"] = "openllm-v1-local"
    return cfg


@pytest.mark.slow
def test_the_paper_config_runs_every_stage_on_a_tiny_parent(tmp_path, tiny_model_dir, data_dir):
    data = paper_on_cpu(tmp_path, tiny_model_dir, data_dir)
    assert data["arms"] == ["sft", "sdd", "sdd-kd"] and len(data["datasets"]) == 2 and data["merge_children"]
    result = run(from_dict(PipelineConfig, data))
    run_dir = Path(result["run_dir"])
    done = {p.parent.name for p in run_dir.glob("*/manifest.json")}
    assert {"parent-eval", "pruned", "distill-gsm8k", "distill-dolly", "sft", "sdd", "sdd-kd", "sdd-gsm8k",
            "sdd-dolly", "merged", "evaluate", "drift", "speculate", "profile", "report"} <= done
    scores = json.loads((run_dir / "evaluate" / "scores.json").read_text())
    assert set(scores["tasks"]) == {"arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "winogrande", "gsm8k"}
    assert {Path(m).name for m in scores["models"]} >= {"pruned", "sft", "sdd", "sdd-kd", "merged"}
    for model in scores["models"].values():
        assert model["tasks"]["mmlu"]["n"] == 2  # the MMLU group: two items drawn over its subjects
    assert all(m.get("retention") is not None for m in scores["models"].values())
