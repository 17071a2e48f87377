"""docs/guarantees.md, tested: outputs never clobbered, resumes that check what they resume, one writer per
output, resume = the uninterrupted result, identical fine-tuning runs, bad input named before a model loads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_errors import one_line_error
from safetensors.torch import load_file

from selfdistill.cli import main
from selfdistill.config import from_dict
from selfdistill.distill import DistillConfig, distill
from selfdistill.errors import UserError
from selfdistill.finetune import FinetuneConfig, checkpoint_dir, finetune
from selfdistill.rundir import read_manifest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _distill_cfg(teacher, dataset, out, **kw) -> DistillConfig:
    base = dict(teacher=str(teacher), dataset=str(dataset), recipe="gsm8k", limit=2, batch_size=2,
                max_new_tokens=4, dtype="float32", device="cpu", out=str(out))
    return from_dict(DistillConfig, {**base, **kw})


def _rows(n: int = 8) -> list[dict]:
    return [{"id": f"r{i}", "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}],
             "original": f"{2 * i}", "rewrite": f"{i} plus {i} makes {2 * i}.", "used": "rewrite",
             "response": f"{i} plus {i} makes {2 * i}."} for i in range(n)]


@pytest.fixture()
def train_data(tmp_path) -> Path:
    path = tmp_path / "distilled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    return path


def _ft_cfg(model, data, out, **kw) -> FinetuneConfig:
    base = dict(model=str(model), data=str(data), out=str(out), dtype="float32", batch_size=2, grad_accum=1,
                max_steps=2, learning_rate=1e-2, save_steps=50, seed=0)
    return FinetuneConfig(**{**base, **kw})


# 1. An output path never replaces what this stage did not write --------------------------------------------


def test_prune_refuses_a_foreign_file_and_overwrites_only_when_asked(tiny_model_dir, gsm8k_train, tmp_path, capsys):
    out = tmp_path / "out.json"
    out.write_text("x\n")
    argv = ["prune", "--model", str(tiny_model_dir), "--num-layers", "2", "--calibration", str(gsm8k_train),
            "--recipe", "gsm8k", "--calibration-samples", "2", "--max-length", "32", "--out", str(out)]
    assert "is a file, not the folder that prune writes; pass --overwrite" in one_line_error(capsys, argv)
    assert out.read_text() == "x\n"
    assert main([*argv, "--overwrite"]) == 0
    assert read_manifest(out)["writer"] == "prune"
    assert main(argv) == 0  # its own output: replaced without asking
    assert not list(tmp_path.glob(".out.json.*"))  # no lock, no leftover old copy


def test_finetune_never_deletes_an_unrelated_folder(tiny_model_dir, train_data, tmp_path, no_model_loads):
    out = tmp_path / "outdir"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists and was not written by finetune; pass --overwrite"):
        finetune(_ft_cfg(tiny_model_dir, train_data, out))
    foreign_ckpt = checkpoint_dir(tmp_path / "o2")
    foreign_ckpt.mkdir()
    (foreign_ckpt / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="o2.checkpoints already exists and was not written by finetune"):
        finetune(_ft_cfg(tiny_model_dir, train_data, tmp_path / "o2"))
    assert (out / "keep.txt").read_text() == "mine" and (foreign_ckpt / "notes.txt").read_text() == "mine"


def test_distill_refuses_a_foreign_file_and_a_foreign_stats_json(tiny_model_dir, gsm8k_train, tmp_path):
    out = tmp_path / "d.jsonl"
    out.write_text("x\n")
    with pytest.raises(UserError, match="d.jsonl already exists and was not written by distill"):
        distill(_distill_cfg(tiny_model_dir, gsm8k_train, out))
    assert out.read_text() == "x\n"
    stats = tmp_path / "stats.json"
    stats.write_text('{"mine": 1}')
    with pytest.raises(UserError, match="stats.json already exists and was not written by distill"):
        distill(_distill_cfg(tiny_model_dir, gsm8k_train, tmp_path / "new.jsonl"))
    assert stats.read_text() == '{"mine": 1}' and not (tmp_path / "new.jsonl").exists()
    distill(_distill_cfg(tiny_model_dir, gsm8k_train, out, overwrite=True))
    assert len(out.read_text().splitlines()) == 2 and json.loads(stats.read_text())["rows"] == 2


# 2. A resume checks what it resumes -----------------------------------------------------------------------


def test_distill_resume_with_other_settings_is_refused_or_restarted(tiny_model_dir, gsm8k_train, tmp_path):
    out = tmp_path / "d1.jsonl"
    distill(_distill_cfg(tiny_model_dir, gsm8k_train, out, max_new_tokens=4))
    before, stats = out.read_bytes(), (tmp_path / "stats.json").read_bytes()
    with pytest.raises(UserError, match=r"^max_new_tokens: 4 in d1.jsonl, 6 now; pass --restart to start over "
                                        r"or use another --out$"):
        distill(_distill_cfg(tiny_model_dir, gsm8k_train, out, max_new_tokens=6))
    assert out.read_bytes() == before and (tmp_path / "stats.json").read_bytes() == stats
    assert distill(_distill_cfg(tiny_model_dir, gsm8k_train, out, limit=3))["rows_this_run"] == 1  # more rows: fine
    result = distill(_distill_cfg(tiny_model_dir, gsm8k_train, out, max_new_tokens=6, restart=True))
    assert result["resumed_after"] == 0 and result["rows"] == 2
    assert all(json.loads(line)["generated_tokens"] == 6 for line in out.read_text().splitlines())


def test_finetune_resume_from_checkpoints_of_other_settings_is_refused(tiny_model_dir, train_data, tmp_path):
    out = tmp_path / "ft"
    finetune(_ft_cfg(tiny_model_dir, train_data, out, save_steps=1, keep_checkpoints=True))
    shutil.rmtree(out)  # as if killed after its checkpoints
    with pytest.raises(UserError, match=r"learning_rate: 0.01 in ft.checkpoints, 0.02 now; pass --restart \(or drop "
                                        r"--resume\) to start over"):
        finetune(_ft_cfg(tiny_model_dir, train_data, out, learning_rate=2e-2, resume=True))
    result = finetune(_ft_cfg(tiny_model_dir, train_data, out, learning_rate=2e-2, resume=True, restart=True))
    assert result["steps"] == 2 and read_manifest(out)["config"]["learning_rate"] == 2e-2


# 3. One writer per output -------------------------------------------------------------------------------


def _hold(path: Path, stage: str, folder: bool) -> subprocess.Popen:
    code = ("import sys, time\nfrom pathlib import Path\nfrom selfdistill.guard import claim_output, lock_run_dir\n"
            "c = lock_run_dir(sys.argv[1]) if sys.argv[2] == 'run' else "
            "claim_output(sys.argv[1], sys.argv[2], folder=sys.argv[3] == '1')\nprint('held', flush=True)\n"
            "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), stage, "1" if folder else "0"], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_and_kill_9_leaves_no_stale_lock(tiny_model_dir, gsm8k_train, tmp_path):
    out = tmp_path / "d.jsonl"
    holder = _hold(out, "distill", folder=False)
    try:
        with pytest.raises(UserError, match=rf"d.jsonl is being written by pid {holder.pid} on .+; wait for it"):
            distill(_distill_cfg(tiny_model_dir, gsm8k_train, out))
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert not out.exists()
    assert distill(_distill_cfg(tiny_model_dir, gsm8k_train, out))["rows"] == 2  # the dead holder's lock is gone


def test_one_pipeline_per_run_directory(gsm8k_train, tmp_path):
    from selfdistill.pipeline import DatasetSpec, PipelineConfig, run

    root = tmp_path / "run"
    holder = _hold(root, "run", folder=True)
    try:
        cfg = PipelineConfig(run_dir=str(root), datasets=[DatasetSpec(name="g", local=str(gsm8k_train), reserve=50)])
        with pytest.raises(UserError, match=rf"run is being written by pid {holder.pid}"):
            run(cfg)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert not root.exists()


# 4. Resume = the uninterrupted result --------------------------------------------------------------------


@pytest.mark.parametrize("settings", [dict(temperature=1.0, top_p=0.9, batch_size=1),
                                      dict(dtype="bfloat16", batch_size=3, max_new_tokens=12)],
                         ids=["sampled-fp32", "greedy-bf16"])
def test_distill_resume_equals_the_uninterrupted_run(settings, tiny_model_dir, gsm8k_train, tmp_path):
    cfg = dict(limit=11, max_new_tokens=6, draft_tokens=0) | settings  # blocks of 8 x batch_size rows
    full = tmp_path / "full.jsonl"
    distill(_distill_cfg(tiny_model_dir, gsm8k_train, full, **cfg))
    lines = full.read_bytes().splitlines(keepends=True)
    for cut in (9, 5):  # inside the second block, inside the first
        out = tmp_path / f"cut{cut}.jsonl"
        out.write_bytes(b"".join(lines[:cut]) + lines[cut][:10])  # killed while writing row cut + 1
        stats = distill(_distill_cfg(tiny_model_dir, gsm8k_train, out, **cfg))
        assert stats["resumed_after"] == cut and out.read_bytes() == full.read_bytes(), cut


# 5. Identical fine-tuning runs give identical weights, and a resumed run the uninterrupted one's ---------------


def test_two_finetune_runs_with_one_seed_give_identical_weights(tiny_model_dir, train_data, tmp_path):
    weights = []
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(100 + i)  # as two processes would be: the run must not depend on the RNG it finds
        finetune(_ft_cfg(tiny_model_dir, train_data, tmp_path / name, max_steps=3))
        weights.append(load_file(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_finetune_resumed_after_kill_equals_the_uninterrupted_run(tiny_model_dir, train_data, tmp_path):
    kw = dict(max_steps=6, save_steps=2, lora_dropout=0.3)  # 1.5 epochs: data order and dropout RNG both matter
    finetune(_ft_cfg(tiny_model_dir, train_data, tmp_path / "whole", **kw))
    out = tmp_path / "cut"
    args = [sys.executable, "-m", "selfdistill", "finetune", "--model", str(tiny_model_dir), "--data", str(train_data),
            "--out", str(out), "--dtype", "float32", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "6",
            "--save-steps", "2", "--lora-dropout", "0.3", "--learning-rate", "0.01"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = checkpoint_dir(out) / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state.exists() and read_manifest(out) is None
    finetune(_ft_cfg(tiny_model_dir, train_data, out, resume=True, **kw))
    whole, resumed = (load_file(tmp_path / n / "model.safetensors") for n in ("whole", "cut"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    losses = [[e["loss"] for e in map(json.loads, (tmp_path / n / "train_log.jsonl").read_text().splitlines())
               if "loss" in e] for n in ("whole", "cut")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


@pytest.mark.slow
def test_real_parent_bf16_resume_equals_the_uninterrupted_run(real_model_dir, gsm8k_train, tmp_path):
    """The issue's case: 16 rows cut after 13; in bf16, which rows share a batch changes greedy output."""
    cfg = dict(limit=16, batch_size=4, max_new_tokens=48, dtype="bfloat16", verifiers=["none"])
    full = tmp_path / "full.jsonl"
    distill(_distill_cfg(real_model_dir, gsm8k_train, full, **cfg))
    out = tmp_path / "cut.jsonl"
    out.write_bytes(b"".join(full.read_bytes().splitlines(keepends=True)[:13]))
    assert distill(_distill_cfg(real_model_dir, gsm8k_train, out, **cfg))["resumed_after"] == 13
    assert out.read_bytes() == full.read_bytes()


# 6. Bad values and unusable paths are named at once, before a model loads -----------------------------------


def test_bad_finetune_values_are_one_line_errors(tiny_model_dir, train_data, tmp_path, capsys, no_model_loads):
    base = ["finetune", "--model", str(tiny_model_dir), "--data", str(train_data), "--out", str(tmp_path / "o")]
    for flags, message in [(["--limit", "0"], "limit must be at least 1"), (["--limit", "-2"], "limit must be"),
                           (["--learning-rate", "-1"], "learning_rate and epochs must be positive"),
                           (["--max-steps", "0"], "max_steps must be -1")]:
        assert message in one_line_error(capsys, base + flags)
    missing = tmp_path / "missing.jsonl"
    assert f"--data {missing}: file not found" in one_line_error(capsys, [*base[:3], "--data", str(missing), *base[5:]])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_rows(1)[0]) + "\n" + '{"id": "r1", "messages": [], "original": "x", "response": "y"}\n')
    assert "bad.jsonl:2: field 'messages'" in one_line_error(capsys, [*base[:3], "--data", str(bad), *base[5:]])
    assert not (tmp_path / "o").exists()


def test_unwritable_outputs_are_refused_before_a_model_loads(tiny_model_dir, gsm8k_train, tmp_path, capsys,
                                                             no_model_loads):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    prune = ["prune", "--model", str(tiny_model_dir), "--layers", "1:3"]
    assert f"{a_file} is a file, not a folder" in one_line_error(capsys, [*prune, "--out", str(a_file / "child")])
    folder = tmp_path / "folder"
    folder.mkdir()
    message = one_line_error(capsys, ["profile", "--model", str(tiny_model_dir), "--seq-len", "64", "--out", str(folder)])
    assert f"--out {folder} is a folder; give a file name" in message
    read_only = [Path("/sys/selfdistill-test")] if Path("/sys").is_dir() else []  # sysfs refuses even root
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        read_only.append(locked)
    for parent in read_only:
        out = parent / "d.jsonl"
        message = one_line_error(capsys, ["distill", "--teacher", str(tiny_model_dir), "--dataset", str(gsm8k_train),
                                  "--limit", "1", "--out", str(out)])
        assert f"cannot write --out {out}: folder" in message and "is not writable" in message


def test_inputs_are_checked_before_a_model_loads(tiny_model_dir, gsm8k_train, tmp_path, capsys, no_model_loads):
    missing = tmp_path / "missing.jsonl"
    message = one_line_error(capsys, ["prune", "--model", str(tiny_model_dir), "--num-layers", "2", "--calibration",
                              str(missing), "--out", str(tmp_path / "p")])
    assert f"dataset not found: {missing}" in message
    other = tmp_path / "other-vocab"
    shutil.copytree(tiny_model_dir, other)
    tok_file = other / "tokenizer.json"
    data = json.loads(tok_file.read_text())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    tok_file.write_text(json.dumps(data))
    message = one_line_error(capsys, ["speculate", "--target", str(tiny_model_dir), "--draft", str(other), "--prompts",
                              str(gsm8k_train), "--recipe", "gsm8k", "--limit", "1"])
    assert f"draft '{other}' has a different tokenizer" in message
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    assert "is not a run directory" in one_line_error(capsys, ["report", str(not_a_run)])
    assert not (not_a_run / "report").exists()


def test_auto_map_is_named_when_ignored(tiny_model_dir, tmp_path, caplog):
    from selfdistill.models import load_model

    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "m.Custom"}}))
    with caplog.at_level("WARNING"):
        load_model(custom)
    assert "names custom model code (auto_map: AutoModelForCausalLM); it is not run" in caplog.text


# 7. Pickle-only weights are refused wherever a library would load the path itself ---------------------------


@pytest.fixture()
def pickle_only(tiny_model_dir, tmp_path) -> Path:
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_only_weights_are_refused_before_lm_eval_or_vllm_load_them(pickle_only, gsm8k_train, data_dir,
                                                                           tmp_path, monkeypatch, no_model_loads):
    from selfdistill.evaluate import EvalConfig, evaluate
    from selfdistill.evaluate.runner import make_lm

    refused = "holds only pickle weights"
    with pytest.raises(UserError, match=refused):
        evaluate(EvalConfig(model=[str(pickle_only)], data_dir=str(data_dir), out=str(tmp_path / "e")))
    assert not (tmp_path / "e").exists()
    with pytest.raises(UserError, match=refused):  # not "vLLM is not installed": the path is checked first
        make_lm("m", str(pickle_only), backend="vllm", dtype="float32", device="cpu", batch_size=1, max_length=None)
    monkeypatch.setenv("WORLD_SIZE", "2")  # data parallel: HFLM(pretrained=path) loads the folder itself
    with pytest.raises(UserError, match=refused):
        make_lm("m", str(pickle_only), backend="hf", dtype="float32", device="cpu", batch_size=1, max_length=None)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(UserError, match=refused):
        distill(_distill_cfg(pickle_only, gsm8k_train, tmp_path / "d.jsonl", backend="vllm"))


def test_distill_never_appends_to_its_own_dataset(tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"{i}+1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(3)))
    before = data.read_bytes()
    with pytest.raises(UserError, match="data.jsonl already exists and was not written by distill"):
        distill(_distill_cfg(tiny_model_dir, data, data, limit=3))  # its ids match the input's: still not a distill output
    assert data.read_bytes() == before
