"""scripts/gpu_check.sh --cpu: the GPU check's every stage on a tiny model here, so the script cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"build", "prune", "distill-greedy", "distill-sampled", "plain-generate", "eager-decode", "lora-greedy",
          "lora-sampled", "evaluate", "merge", "speculate", "profile"}


def test_gpu_check_cpu_mode_runs_every_stage(tmp_path, data_dir):
    env = {**os.environ, "PYTHON": sys.executable, "SELFDISTILL_DATA_DIR": str(data_dir)}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["stages"]) >= STAGES
    assert all(s["status"] == "ok" for s in report["stages"].values()), report["stages"]
    stages = report["stages"]
    assert stages["distill-greedy"]["tokens_per_s"] > 0 and stages["plain-generate"]["engine_speedup"] > 0
    assert stages["lora-greedy"]["tokens_per_s"] > 0 and stages["evaluate"]["items_per_s"] > 0
    assert "gpu_check: ok" in proc.stdout
    partial = "partial" in report["stages"]
    assert partial or "partial: not available" in proc.stdout


def test_gpu_check_refuses_a_machine_without_cuda_unless_asked_for_cpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2 and "--cpu" in proc.stdout
