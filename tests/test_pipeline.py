"""The whole pipeline on a tiny random model: runs, resumes, and reruns exactly what a config change touches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfdistill.cli import main
from selfdistill.config import from_dict
from selfdistill.errors import UserError
from selfdistill.pipeline import PipelineConfig, run

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, parent: Path, data_dir: Path, **overrides) -> dict:
    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:12]]
    data = tmp_path / "gsm8k_small.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "run_dir": str(tmp_path / "run"), "parent": str(parent), "data_dir": str(data_dir),
        "datasets": [{"name": "gsm8k", "local": str(data), "recipe": "gsm8k", "limit": 4,
                      "heldout_local": "gsm8k/test.jsonl"}],
        "drift_general": {"name": "general", "local": "alpaca_eval/results/gpt4_1106_preview/model_outputs.json",
                          "recipe": "alpaca"},
        "arms": ["sft", "sdd"], "drift_prompts": 2, "drift_max_new_tokens": 4,
        "prune": {"num_layers": 2, "calibration_samples": 4, "max_length": 48},
        "prune_variants": [{"name": "linear", "replace": "linear"}], "recover_from": "linear",
        "distill": {"batch_size": 4, "max_new_tokens": 8, "dtype": "float32"},
        "finetune": {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "max_length": 640, "dtype": "float32",
                     "save_steps": 1},
        "evaluate": {"preset": "cpu", "tasks": ["arc_easy"], "limit": 2, "batch_size": 4, "dtype": "float32",
                     "cache": False, "bootstrap_iters": 20},
        "speculate": {"limit": 2, "max_new_tokens": 6, "k": 2, "hf_assisted": False},
        "profile": {"seq_len": 16, "runs": 1, "decode_tokens": 4, "dtype": "float32"},
    }
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    return cfg


def _stage_keys(run_dir: Path) -> dict[str, str]:
    keys = {}
    for folder in run_dir.iterdir():
        manifest = folder / "manifest.json"
        if manifest.is_file():
            keys[folder.name] = json.loads(manifest.read_text())["stage_key"]
    return keys


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, data_dir):
    tmp = tmp_path_factory.mktemp("pipeline")
    data = _config(tmp, tiny_model_dir, data_dir)
    result = run(from_dict(PipelineConfig, data))
    return tmp, data, result


def test_the_whole_loop_writes_every_stage_and_a_report(finished_run):
    tmp, _, result = finished_run
    run_dir = Path(result["run_dir"])
    expected = {"parent-eval", "pruned", "pruned-linear", "distill-gsm8k", "sft", "sdd", "evaluate", "drift",
                "speculate", "profile", "report"}
    assert expected <= set(_stage_keys(run_dir))
    scores = json.loads((run_dir / "evaluate" / "scores.json").read_text())
    assert {Path(m).name for m in scores["models"]} >= {"pruned", "pruned-linear", "sft", "sdd"}
    # the variant is a repaired cut of the same block, and the arms start from it (recover_from)
    plain, linear = (json.loads((run_dir / f / "pruning.json").read_text()) for f in ("pruned", "pruned-linear"))
    assert linear["replacement"]["method"] == "linear" and plain["replacement"] is None
    assert linear["removed_layers"] == plain["removed_layers"]
    assert json.loads((run_dir / "sft" / "manifest.json").read_text())["config"]["model"] == str(run_dir / "pruned-linear")
    html = (run_dir / "report" / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html
    md = (run_dir / "report" / "report.md").read_text()
    assert "| sft |" in md and "| sdd |" in md and "Pruning" in md
    cut_row = next(line for line in md.splitlines() if line.startswith("| pruned-linear |"))
    assert "| linear |" in cut_row and f"{linear['replacement']['heldout_loss_replaced']:.3f}" in cut_row


def test_a_rerun_skips_everything(finished_run, caplog):
    tmp, data, _ = finished_run
    before = _stage_keys(Path(data["run_dir"]))
    mtimes = {p: p.stat().st_mtime_ns for p in Path(data["run_dir"]).glob("*/manifest.json")}
    run(from_dict(PipelineConfig, data))
    assert _stage_keys(Path(data["run_dir"])) == before
    assert {p: p.stat().st_mtime_ns for p in Path(data["run_dir"]).glob("*/manifest.json")} == mtimes


def test_changing_finetune_reruns_only_it_and_what_follows(finished_run):
    tmp, data, _ = finished_run
    run_dir = Path(data["run_dir"])
    mtimes = {p.parent.name: p.stat().st_mtime_ns for p in run_dir.glob("*/manifest.json")}
    changed = dict(data, finetune=dict(data["finetune"], learning_rate=5e-4))
    run(from_dict(PipelineConfig, changed))
    now = {p.parent.name: p.stat().st_mtime_ns for p in run_dir.glob("*/manifest.json")}
    rerun = {name for name in now if now[name] != mtimes.get(name)}
    assert rerun == {"sft", "sdd", "evaluate", "drift", "speculate", "report"}


def test_an_interrupted_stage_resumes_and_loses_nothing(finished_run):
    tmp, data, _ = finished_run
    run_dir = Path(data["run_dir"])
    (run_dir / "sdd" / "manifest.json").unlink()  # as if killed before the stage finished
    distill_mtime = (run_dir / "distill-gsm8k" / "manifest.json").stat().st_mtime_ns
    run(from_dict(PipelineConfig, data))
    assert (run_dir / "sdd" / "manifest.json").is_file()
    assert (run_dir / "distill-gsm8k" / "manifest.json").stat().st_mtime_ns == distill_mtime


def test_bad_config_is_rejected_before_any_stage(tmp_path, tiny_model_dir, data_dir, capsys):
    data = _config(tmp_path, tiny_model_dir, data_dir)
    data["datasets"][0]["local"] = str(tmp_path / "missing.jsonl")
    (tmp_path / "c.yaml").write_text(json.dumps(data))
    assert main(["run", str(tmp_path / "c.yaml")]) == 2
    assert "missing.jsonl' not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["run", str(tmp_path / "c.yaml"), "finetune.lora_rank=4"]) == 2
    assert "unknown config key 'finetune.lora_rank'" in capsys.readouterr().err
    data["datasets"][0]["local"] = str(tmp_path / "gsm8k_small.jsonl")
    for key, value, message in (("recover_from", "cosine", "recover_from 'cosine' is not a prune variant"),
                                ("prune_variants", [{"replace": "linear"}], "unique name"),
                                ("prune_variants", [{"name": "x", "replace": "magic"}], "unknown replace method"),
                                ("speculate_only", ["sdd-kd"], "'sdd-kd' is not a child of this run")):
        (tmp_path / "c.yaml").write_text(json.dumps({**data, key: value}))
        assert main(["run", str(tmp_path / "c.yaml")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    from selfdistill.config import load_config
    from selfdistill.pipeline import stage_config

    cfg = load_config(PipelineConfig, path)  # validates every stage section too
    assert cfg.datasets and stage_config(cfg, "prune").num_layers == 6


def test_report_renders_in_headless_chromium(finished_run):
    """Tables and embedded plots render in a real browser (skipped where Chromium is not installed)."""
    import shutil
    import sys

    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("chromium not installed (apt-get install chromium)")
    sys.path.insert(0, str(ROOT / "scripts"))
    from check_report_html import check

    _, data, _ = finished_run
    counts = check(Path(data["run_dir"]) / "report" / "report.html")
    assert counts["tables"] >= 4 and counts["rows"] >= 8
    assert counts["images"] >= 2 and counts["decoded"] == counts["images"]


def test_from_stage_reruns_that_stage_and_everything_after(finished_run):
    _, data, _ = finished_run
    run_dir = Path(data["run_dir"])
    mtimes = {p.parent.name: p.stat().st_mtime_ns for p in run_dir.glob("*/manifest.json")}
    run(from_dict(PipelineConfig, dict(data, from_stage="speculate")))
    now = {p.parent.name: p.stat().st_mtime_ns for p in run_dir.glob("*/manifest.json")}
    assert {name for name in now if now[name] != mtimes.get(name)} == {"speculate", "profile", "report"}


def _prompts(source: str, recipe: str | None, offset: int, limit: int | None, split: str = "train") -> set[str]:
    from selfdistill.data import load_examples

    return {e.instruction.strip() for e in load_examples(source, recipe, offset=offset, limit=limit, split=split)}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_measured_rows_are_rows_no_arm_trains_on(path, data_dir):
    """Drift and drafts read rows outside every arm's training rows: by index within one file, by content across."""
    from selfdistill.config import load_config
    from selfdistill.pipeline import measured_sets, resolve_dataset

    cfg = load_config(PipelineConfig, path, [f"data_dir={data_dir}"])
    sets = measured_sets(cfg, data_dir)
    assert sets[0].name.endswith("-heldout") and len(sets) == 2  # every shipped config measures out of domain too
    for s in sets:
        for d in cfg.datasets:
            source = resolve_dataset(d, data_dir)
            if source == s.source:
                end = d.train_offset + (d.limit if d.limit is not None else 10**9)
                assert s.offset + s.limit <= d.train_offset or s.offset >= end
            elif Path(source).is_file() and Path(s.source).is_file():
                trained = _prompts(source, d.recipe, d.train_offset, d.limit)
                assert not trained & _prompts(s.source, s.recipe, s.offset, s.limit)


def test_drift_and_drafts_record_the_heldout_rows_they_used(finished_run, data_dir):
    _, data, _ = finished_run
    run_dir = Path(data["run_dir"])
    spec = json.loads((run_dir / "speculate" / "speculate.json").read_text())
    assert spec["prompts_source"].endswith("gsm8k/test.jsonl") and spec["rows"] == ["gsm8k-0", "gsm8k-1"]
    drift = json.loads((run_dir / "drift" / "result.json").read_text())
    assert list(drift["sets"]) == ["gsm8k-heldout", "general"]
    held = drift["sets"]["gsm8k-heldout"]
    assert held["source"].endswith("gsm8k/test.jsonl") and len(held["rows"]) == 2
    child = held["children"]["sft"]
    assert child["kl_ci95"][0] <= child["kl"] <= child["kl_ci95"][1]
    assert {(p["a"], p["b"]) for p in held["paired"]} >= {("sft", "sdd")}
    assert "Drift from the parent" in (run_dir / "report" / "report.md").read_text()


def test_a_first_dataset_without_heldout_rows_is_refused(tmp_path, tiny_model_dir, data_dir):
    data = _config(tmp_path, tiny_model_dir, data_dir)
    del data["datasets"][0]["heldout_local"]
    with pytest.raises(UserError, match="held-out rows"):
        from_dict(PipelineConfig, data)
    data["datasets"][0]["reserve"] = 1
    with pytest.raises(UserError, match="reserve 1 is fewer than the 2 rows"):
        from_dict(PipelineConfig, data)
