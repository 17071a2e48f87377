"""Arms as configuration: an arm written only in YAML runs through the pipeline; bad arms fail before any stage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from selfdistill.config import from_dict
from selfdistill.errors import UserError
from selfdistill.pipeline import PipelineConfig, run

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import _config  # noqa: E402

YAML_ARM = {"name": "sdd-partial-kd", "responses": "distilled", "rows": 3, "kd_weight": 0.5,
            "finetune": {"method": "partial", "train_layers": "last:2", "kd_cache": True, "kd_top_k": 8,
                         "learning_rate": 1e-3}}


def test_an_arm_defined_only_in_yaml_runs(tmp_path, tiny_model_dir, data_dir):
    data = _config(tmp_path, tiny_model_dir, data_dir, arms=["sft", YAML_ARM], speculate_children=False)
    (tmp_path / "c.yaml").write_text(json.dumps(data))
    from selfdistill.config import load_config

    result = run(load_config(PipelineConfig, tmp_path / "c.yaml"))
    root = Path(result["run_dir"])
    assert set(result["children"]) == {"pruned", "pruned-linear", "sft", "sdd-partial-kd"}  # + _config's variant
    arm = json.loads((root / "sdd-partial-kd" / "manifest.json").read_text())
    config = arm["stage_manifest"]["config"] if "stage_manifest" in arm else arm["config"]
    assert config["method"] == "partial" and config["kd_weight"] == 0.5 and config["responses"] == "distilled"
    assert config["data"].endswith("train-gsm8k-3.jsonl") and config["learning_rate"] == 1e-3
    assert len((root / "train-gsm8k-3.jsonl").read_text().splitlines()) == 3
    caches = list((root / "kd-cache").glob("*/meta.json"))
    assert len(caches) == 1 and json.loads(caches[0].read_text())["top_k"] == 8
    sft = json.loads((root / "sft" / "result.json").read_text())
    assert sft["rows"] == 4  # the built-in arm still trains on every row, with the shared settings
    evaluated = json.loads((root / "evaluate" / "result.json").read_text())
    assert "sdd-partial-kd" in json.dumps(evaluated)


@pytest.mark.parametrize("arm,message", [
    ({"name": "x", "data": ["alpaca"]}, "dataset 'alpaca' is not under datasets"),
    ({"name": "pruned"}, "not a stage folder"),
    ({"name": "x", "finetune": {"responses": "original"}}, "finetune.responses is set by the pipeline"),
    ({"name": "x", "finetune": {"method": "partial", "lora_rank": 2}}, "unknown config key 'finetune.lora_rank'"),
    ("sdd-plus", "unknown arm 'sdd-plus'"),
    ({"name": "sft"}, "two arms are named 'sft'"),
])
def test_bad_arms_are_rejected_before_any_stage(tmp_path, tiny_model_dir, data_dir, arm, message):
    data = _config(tmp_path, tiny_model_dir, data_dir, arms=["sft", arm])
    with pytest.raises(UserError, match=message):
        from_dict(PipelineConfig, data)
    assert not (tmp_path / "run").exists()


def test_the_recovery_study_config_asks_for_what_the_issue_asks():
    """configs/smollm2-recovery.yaml: >= 4x the study's row-epochs per main arm, the four kinds of arm, a 3-point
    SFT/SDD data-size curve, >= 1,000 evaluation items per signal task, best-of-k and self-answers."""
    from selfdistill.config import load_config
    from selfdistill.pipeline import stage_config

    root = Path(__file__).resolve().parents[1] / "configs"
    study, new = (load_config(PipelineConfig, root / f"smollm2-{n}.yaml") for n in ("study", "recovery"))

    def row_epochs(cfg, arm):
        limits = {d.name: d.limit for d in cfg.datasets}
        rows = sum(min(limits[n], arm.rows or limits[n]) for n in arm.data)
        return rows * stage_config(cfg, "finetune", arm.finetune, model="-", data="-", out="-").epochs

    old = row_epochs(study, study.resolved_arms()[0])
    arms = {a.name: a for a in new.resolved_arms()}
    for name in ("sft", "sdd", "sdd-self", "sdd-kd"):
        assert row_epochs(new, arms[name]) >= 4 * old, name
    assert arms["sft"].responses == "original" and arms["sdd"].responses == "distilled"
    assert "gsm8k-self" in arms["sdd-self"].data and "gsm8k-self" not in arms["sdd"].data
    best = stage_config(new, "finetune", arms["sdd-kd"].finetune, model="-", data="-", out="-")
    assert best.method == "partial" and best.kd_cache and arms["sdd-kd"].kd_weight > 0
    for responses in ("original", "distilled"):  # the curve: >= 3 sizes per method
        sizes = {row_epochs(new, a) for a in arms.values() if a.responses == responses and a.kd_weight == 0
                 and not a.finetune and a.data == arms["sft"].data}
        assert len(sizes) >= 3, responses
    distill = {d.name: stage_config(new, "distill", d.distill, dataset="-", out="-") for d in new.datasets}
    assert distill["gsm8k"].samples == 8 and distill["gsm8k-self"].mode == "answer"
    evaluation = stage_config(new, "evaluate", model=["-"], out="-")
    assert evaluation.limit >= 1000 and set(evaluation.tasks) >= {"arc_easy", "hellaswag"}
