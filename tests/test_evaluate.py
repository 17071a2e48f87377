"""Stage `evaluate`: local lm-eval tasks end to end on a tiny model, retention maths, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from selfdistill.cli import main
from selfdistill.evaluate import EvalConfig, drift, drift_many, evaluate
from selfdistill.evaluate.presets import PRESETS
from selfdistill.evaluate.retention import chance_of, paired_bootstrap, retention, signal_tasks, task_score

sys.path.insert(0, str(Path(__file__).parent))
from tiny import save_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFDISTILL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_child(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama4", layers=4, seed=1)


def test_every_local_task_runs_on_a_tiny_model(tmp_path, tiny_model_dir, tiny_child, data_dir):
    out = tmp_path / "ev"
    result = evaluate(EvalConfig(model=[str(tiny_child)], baseline=str(tiny_model_dir), preset="openllm-v1-local",
                                 tasks=["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "winogrande", "gsm8k"],
                                 limit=2, data_dir=str(data_dir), batch_size=4, dtype="float32", max_gen_toks=8,
                                 out=str(out)))
    scores = json.loads((out / "scores.json").read_text())
    assert scores["baseline"] == str(tiny_model_dir) and set(scores["models"]) == {str(tiny_model_dir), str(tiny_child)}
    for name, m in scores["models"].items():
        for task, s in m["tasks"].items():
            assert s["n"] == 2 and 0 <= s["value"] <= 1, (name, task, s)
            assert isinstance(s["at_chance"], bool) and math.isfinite(s["stderr"])
            assert s["metric"] == scores["settings"]["tasks"][task]["metric"]
    chance = scores["models"][str(tiny_model_dir)]["tasks"]
    assert chance["mmlu"]["chance"] == 0.25 and chance["winogrande"]["chance"] == 0.5 and chance["gsm8k"]["chance"] == 0
    assert 0 < chance["truthfulqa_mc2"]["chance"] < 1
    assert scores["settings"]["n_shot"]["sd_arc_challenge"] == 25
    assert {k: v for k, v in scores["settings"]["n_shot"].items() if k.startswith("sd_mmlu_")} and all(
        v == 5 for k, v in scores["settings"]["n_shot"].items() if k.startswith("sd_mmlu_"))
    assert "retention" in scores["models"][str(tiny_child)] and math.isfinite(result["average"][str(tiny_child)])
    full = json.loads((out / "results" / "llama4.json").read_text())
    leaves = {k for k in full["samples"] if k.startswith("sd_mmlu_")}  # mmlu is a group of subjects, as on the hub
    assert set(full["samples"]) - leaves == {f"sd_{t}" for t in scores["tasks"]} - {"sd_mmlu"}
    assert sum(len(full["samples"][k]) for k in leaves) == 2 and "sd_mmlu" in full["group_subtasks"]
    assert (out / "scores.png").stat().st_size > 1000 and "| model |" in (out / "scores.md").read_text()
    assert (out / "manifest.json").is_file()


def test_parent_is_evaluated_once_and_a_second_child_gets_a_bootstrap(tmp_path, tiny_model_dir, tiny_child, data_dir):
    other = save_tiny(tmp_path / "llama4b", layers=4, seed=2)
    base = dict(baseline=str(tiny_model_dir), preset="cpu", tasks=["arc_easy"], limit=6, data_dir=str(data_dir),
                batch_size=8, dtype="float32", bootstrap_iters=200)
    evaluate(EvalConfig(model=[str(tiny_child)], out=str(tmp_path / "a"), **base))
    evaluate(EvalConfig(model=[str(tiny_child), str(other)], out=str(tmp_path / "b"), **base))
    first = json.loads((tmp_path / "a" / "results" / "llama6.json").read_text())
    second = json.loads((tmp_path / "b" / "results" / "llama6.json").read_text())
    assert first["selfdistill"]["wall_time_s"] == second["selfdistill"]["wall_time_s"]  # served from the cache
    pairs = json.loads((tmp_path / "b" / "scores.json").read_text())["pairwise"]
    assert pairs[0]["a"] == str(tiny_child) and pairs[0]["b"] == str(other) and pairs[0]["iters"] == 200
    ids = [s["doc_id"] for s in first["samples"]["sd_arc_easy"]]
    assert len(ids) == 6 and ids != list(range(6))  # a seeded subset, not the first rows


def test_each_task_is_cached_on_its_own(tmp_path, tiny_model_dir, data_dir, caplog):
    """A task added to a finished evaluation is the only one scored; the first task's result is reused whole."""
    base = dict(model=[str(tiny_model_dir)], preset="cpu", limit=4, data_dir=str(data_dir), batch_size=8,
                dtype="float32", bootstrap_iters=20)
    evaluate(EvalConfig(tasks=["arc_easy"], out=str(tmp_path / "a"), **base))
    with caplog.at_level("INFO", logger="selfdistill.evaluate"):
        evaluate(EvalConfig(tasks=["arc_easy", "hellaswag"], out=str(tmp_path / "b"), **base))
    assert "cached arc_easy" in caplog.text and "cached hellaswag" not in caplog.text
    first, both = (json.loads((tmp_path / d / "results" / "llama6.json").read_text()) for d in ("a", "b"))
    assert both["samples"]["sd_arc_easy"] == first["samples"]["sd_arc_easy"]
    assert len(both["samples"]["sd_hellaswag"]) == 4
    scores = json.loads((tmp_path / "b" / "scores.json").read_text())
    assert set(scores["models"][str(tiny_model_dir)]["tasks"]) == {"arc_easy", "hellaswag"}


def _parent(values: dict[str, tuple[float, float, float]]) -> dict:
    return {t: {"value": v, "stderr": se, "chance": c} for t, (v, se, c) in values.items()}


def test_retention_and_chance_corrected_retention_on_hand_made_numbers():
    parent = _parent({"a": (0.60, 0.02, 0.25), "b": (0.28, 0.02, 0.25)})
    child = _parent({"a": (0.50, 0.02, 0.25), "b": (0.27, 0.02, 0.25)})
    r = retention(child, parent)
    assert r["average"] == pytest.approx(0.385)
    assert r["retention"] == pytest.approx(0.385 / 0.44 * 100)
    assert r["chance_corrected_retention"] == pytest.approx((0.25 + 0.02) / (0.35 + 0.03) * 100)
    assert r["per_task_ratio"]["b"] == pytest.approx(0.27 / 0.28 * 100)
    assert r["per_task_chance_corrected"]["a"] == pytest.approx(0.25 / 0.35 * 100)
    assert signal_tasks(parent) == ["a"]  # b: 0.28 is within 2 x 0.02 of chance 0.25
    assert retention(child, parent, ["a"])["retention"] == pytest.approx(0.5 / 0.6 * 100)


def test_task_score_stderr_and_chance_from_samples():
    samples = [{"doc_id": i, "filter": "none", "acc": float(i % 2), "arguments": [["q", " x"]] * (2 + i % 2)}
               for i in range(10)]
    s = task_score(samples, "acc,none")
    assert s["value"] == 0.5 and s["n"] == 10
    assert s["stderr"] == pytest.approx(np.std([i % 2 for i in range(10)], ddof=1) / math.sqrt(10))
    assert s["chance"] == pytest.approx((5 * 0.5 + 5 / 3) / 10)
    mc2 = [{"doc_id": 0, "filter": "none", "acc": 0.4, "doc": {"mc2_targets": {"labels": [1, 1, 0, 0, 0]}}}]
    assert chance_of(mc2, "acc,none") == pytest.approx(0.4)


def test_paired_bootstrap_interval_contains_the_truth_and_separates_clear_differences():
    rng = np.random.default_rng(0)
    n = 400
    parent = {"t": {i: float(v) for i, v in enumerate(rng.random(n) < 0.6)}}
    same = {"t": dict(parent["t"])}
    worse = {"t": {i: v * float(rng.random() < 0.7) for i, v in parent["t"].items()}}
    tie = paired_bootstrap(same, same, parent, iters=500)
    assert tie["retention_diff"] == 0 and tie["ci95"] == [0, 0]
    gap = paired_bootstrap(same, worse, parent, iters=500)
    assert gap["retention_diff"] == pytest.approx(100 - sum(worse["t"].values()) / sum(parent["t"].values()) * 100)
    assert 0 < gap["ci95"][0] < gap["retention_diff"] < gap["ci95"][1]
    swapped = paired_bootstrap(worse, same, parent, iters=500)
    assert swapped["ci95"][1] < 0


def test_drift_is_zero_for_the_parent_itself_and_positive_for_a_child(tiny_model_dir, tiny_child):
    prompts = ["What is 2 + 2?", "Name a colour."]
    same = drift(str(tiny_model_dir), str(tiny_model_dir), prompts, max_new_tokens=6, batch_size=2)
    assert same["tokens"] > 0 and same["kl"] == pytest.approx(0, abs=1e-5) and same["agreement"] == 1.0
    other = drift(str(tiny_model_dir), str(tiny_child), prompts, max_new_tokens=6, batch_size=2)
    assert other["tokens"] == same["tokens"] and other["kl"] > 0.001 and 0 <= other["agreement"] <= 1
    # several children at once (the parent answers once) give each child's own numbers
    both = drift_many(str(tiny_model_dir), {"self": str(tiny_model_dir), "child": str(tiny_child)}, prompts,
                      max_new_tokens=6, batch_size=2)
    assert both["self"]["kl"] == pytest.approx(same["kl"], abs=1e-6)
    assert both["child"]["kl"] == pytest.approx(other["kl"], rel=1e-5)
    assert both["child"]["agreement"] == other["agreement"]


@pytest.mark.parametrize(("args", "message"), [
    (["--preset", "huge"], "huge"),
    (["--tasks", "piqa"], "unknown task 'piqa'"),
    (["--data-dir", "EMPTY"], "arc/ARC-Easy/ARC-Easy-Test.jsonl is missing"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
])
def test_bad_input_is_one_line(tmp_path, tiny_model_dir, data_dir, capsys, args, message):
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    if "--data-dir" not in args:
        args += ["--data-dir", str(data_dir)]
    model = [] if "--model" in args else ["--model", str(tiny_model_dir)]
    assert main(["evaluate", *model, *args, "--limit", "2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("selfdistill: error: ") and message in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_earlier_results_are_kept_when_a_later_model_fails(tmp_path, tiny_model_dir, data_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": "many"}')
    out = tmp_path / "out"
    code = main(["evaluate", "--model", str(tiny_model_dir), str(broken), "--tasks", "arc_easy", "--limit", "2",
                 "--data-dir", str(data_dir), "--dtype", "float32", "--out", str(out)])
    assert code == 2 and (out / "results" / "llama6.json").is_file() and not (out / "manifest.json").exists()


def test_local_mmlu_is_the_hubs_tree_of_groups_and_subjects(data_dir):
    """sd_mmlu mirrors lm-eval's mmlu: four category groups over the same 57 subjects, split the same way."""
    import lm_eval
    import yaml
    from lm_eval.tasks import TaskManager

    from selfdistill.evaluate.presets import TASKS_DIR

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(data_dir)})
    ours = {g.removeprefix("sd_"): {t.removeprefix("sd_") for t in children}
            for g, children in tm.load(["sd_mmlu"])["group_map"].items()}
    hub: dict[str, set[str]] = {"mmlu": set()}  # read from lm-eval's YAMLs: loading them would need the hub
    for path in (Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default").glob("mmlu_*.yaml"):
        leaf = yaml.safe_load(path.read_text())
        group = leaf["tag"].removesuffix("_tasks")
        hub["mmlu"].add(group)
        hub.setdefault(group, set()).add(leaf["task"])
    assert ours == hub and sum(len(v) for k, v in ours.items() if k != "mmlu") == 57


def test_group_scores_pair_documents_by_subject_and_id():
    """A group's leaves number their documents from 0 each: scores and the bootstrap keep them apart (the
    hub preset's mmlu crashed here on ids like mmlu_abstract_algebra/0)."""
    from selfdistill.evaluate import score_models
    from selfdistill.evaluate.presets import TaskSpec

    def result(accs: dict[str, list[float]]) -> dict:
        return {"samples": {leaf: [{"doc_id": i, "filter": "none", "acc": a, "arguments": [0, 1, 2, 3]}
                                   for i, a in enumerate(v)] for leaf, v in accs.items()},
                "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": list(accs)}}
    parent = result({"mmlu_abstract_algebra": [1, 1, 0], "mmlu_anatomy": [1, 0]})
    child = result({"mmlu_abstract_algebra": [1, 0, 0], "mmlu_anatomy": [1, 0]})
    other = result({"mmlu_abstract_algebra": [0, 0, 0], "mmlu_anatomy": [0, 1]})
    scores = score_models({"p": parent, "c": child, "o": other}, {"mmlu": TaskSpec("mmlu", 5, "acc,none", local=False)},
                          "p", bootstrap_iters=50, seed=0)
    assert scores["models"]["c"]["tasks"]["mmlu"]["n"] == 5
    assert scores["models"]["c"]["tasks"]["mmlu"]["value"] == pytest.approx(2 / 5)
    assert scores["models"]["c"]["retention"] == pytest.approx(2 / 3 * 100)
    assert scores["pairwise"][0]["average_diff"] == pytest.approx(1 / 5)


def test_presets_cover_the_leaderboard_suite():
    assert {t: s.shots for t, s in PRESETS["openllm-v1"].items()} == {
        "arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "truthfulqa_mc2": 0, "winogrande": 5, "gsm8k": 5}
    assert set(PRESETS["cpu"]) == set(PRESETS["openllm-v1-local"]) | {"arc_easy"}
    assert all(s.size for s in PRESETS["cpu"].values())


@pytest.mark.slow
def test_real_model_arc_easy_is_well_above_chance(tmp_path, real_model_dir, data_dir):
    result = evaluate(EvalConfig(model=["smollm2-135m-instruct"], preset="cpu", tasks=["arc_easy"], limit=20,
                                 data_dir=str(data_dir), out=str(tmp_path / "ev")))
    scores = json.loads((tmp_path / "ev" / "scores.json").read_text())["models"]["smollm2-135m-instruct"]
    assert result["average"]["smollm2-135m-instruct"] >= 0.4 and scores["tasks"]["arc_easy"]["chance"] < 0.27


@pytest.mark.parametrize("chance_tasks,lines", [([], 1), (["b"], 2)])
def test_markdown_prints_each_pair_once_unless_the_signal_tasks_differ(chance_tasks, lines):
    from selfdistill.evaluate.outputs import markdown

    task = {"value": 0.5, "stderr": 0.01}
    scores = {"models": {m: {"tasks": {"a": task, "b": task}, "average": 0.5} for m in ("p", "x", "y")},
              "tasks": ["a", "b"], "chance_tasks": chance_tasks,
              "settings": {"subset": "all items", "tasks": {t: {"metric": "acc", "shots": 0} for t in "ab"}},
              "pairwise": [{"a": "x", "b": "y", "over": over, "retention_diff": 1.0, "ci95": [-1.0, 3.0], "iters": 10}
                           for over in ("all", "signal")]}
    text = markdown(scores)
    assert text.count("Retention `x` − `y`") == lines
    assert ("over the tasks with signal" in text) == bool(chance_tasks)


def test_two_processes_shard_the_requests_and_match_one_process(tmp_path, tiny_model_dir, data_dir):
    """torchrun on CPU: both ranks evaluate their shard (gloo) and rank 0 writes what one process writes."""
    args = ["evaluate", "--model", str(tiny_model_dir), "--tasks", "arc_easy", "--limit", "6", "--preset", "cpu",
            "--data-dir", str(data_dir), "--batch-size", "8", "--dtype", "float32"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29541", "-m", "selfdistill", *args,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300,
                         env={**env, "SELFDISTILL_CACHE": str(tmp_path / "cache2")})  # no result from a cache
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "selfdistill", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300,
                         env={**env, "SELFDISTILL_CACHE": str(tmp_path / "cache1")})
    assert one.returncode == 0, one.stderr[-3000:]

    def samples(run: str) -> list:
        result = json.loads(next((tmp_path / run / "results").glob("*.json")).read_text())
        return [(s["doc_id"], s["resps"]) for s in result["samples"]["sd_arc_easy"]]
    assert len(samples("two")) == 6 and samples("two") == samples("one")


def test_selection_items_lie_outside_the_reported_subset(tmp_path, tiny_model_dir, data_dir):
    """What chooses a setting (merge t) never sees the items the evaluation reports."""
    base = {"model": [str(tiny_model_dir)], "preset": "cpu", "tasks": ["arc_easy"], "limit": 6, "seed": 3,
            "data_dir": str(data_dir), "batch_size": 8, "dtype": "float32", "bootstrap_iters": 0}

    def docs(out: str, **extra) -> set[int]:
        evaluate(EvalConfig(out=str(tmp_path / out), **base, **extra))
        res = json.loads((tmp_path / out / "results" / "llama6.json").read_text())
        return {s["doc_id"] for s in res["samples"]["sd_arc_easy"]}

    reported, selected = docs("reported"), docs("selection", selection=5)
    assert len(reported) == 6 and len(selected) == 5 and not reported & selected


def test_vllm_under_a_launch_runs_once_on_every_gpu(monkeypatch, tmp_path):
    """lm-eval's vLLM backend does not shard by rank: rank 0 gets WORLD_SIZE / tp replicas, the others step aside."""
    import types

    from selfdistill.evaluate.runner import make_lm

    built = {}
    fake = types.ModuleType("lm_eval.models.vllm_causallms")
    fake.VLLM = lambda **kwargs: built.update(kwargs)
    monkeypatch.setitem(sys.modules, "lm_eval.models.vllm_causallms", fake)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    make_lm("m", "/m", backend="vllm", dtype="bfloat16", device="cuda", batch_size=8, max_length=None,
            tensor_parallel_size=2)
    assert built["tensor_parallel_size"] == 2 and built["data_parallel_size"] == 2
    monkeypatch.setenv("RANK", "3")
    assert evaluate(EvalConfig(model=["/nonexistent"], backend="vllm", out=str(tmp_path / "ev"))) == {"rank": 3}
    assert not (tmp_path / "ev").exists()
