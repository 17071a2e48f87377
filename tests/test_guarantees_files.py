"""docs/guarantees.md, the files: an input is never written, bad input writes no file (a log included), the run
log stays inside what the command owns, a foreign run directory is refused, and outputs follow the umask."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from cli_errors import one_line_error
from safetensors.torch import load_file
from tiny import save_tiny

from selfdistill.cli import main
from selfdistill.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _md5s(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) by relative path: what a user would compare."""
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def model(tiny_model_dir, tmp_path) -> Path:
    """A model folder the user owns (a copy: the tests check it byte for byte)."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _with_config(folder: Path, **entries) -> Path:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **entries}))
    return folder


def _pickled(source: Path, folder: Path, extra: bool = False) -> Path:
    """`source` with its weights as pytorch_model.bin; `extra`: a pickle holding more than tensors."""
    shutil.copytree(source, folder)
    state = load_file(folder / "model.safetensors")
    torch.save({"state": state, "note": Path("not a tensor")} if extra else state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


# 1. An output is never one of the stage's inputs, nor inside one, nor around one -----------------------------


def test_an_output_on_an_input_is_refused_and_the_input_kept(model, gsm8k_train, tmp_path, capsys):
    child = tmp_path / "child"  # an earlier prune output: prune's own folder, which it would otherwise replace
    assert main(["prune", "--model", str(model), "--layers", "1:3", "--out", str(child)]) == 0
    before, model_before = _md5s(child), _md5s(model)
    prune = ["prune", "--model", str(child), "--layers", "1:2", "--out"]
    assert f"--out {child} is the input --model {child}" in one_line_error(capsys, [*prune, str(child)])
    assert f"lies inside the input --model {child}" in one_line_error(capsys, [*prune, str(child / "grandchild")])
    assert f"--out {tmp_path} contains the input --model {child}" in one_line_error(capsys, [*prune, str(tmp_path)])
    message = one_line_error(capsys, ["distill", "--teacher", str(child), "--dataset", str(gsm8k_train), "--limit", "1",
                              "--out", str(child / "d.jsonl")])
    assert "lies inside the input --teacher" in message
    message = one_line_error(capsys, ["evaluate", "--model", str(model), "--out", str(model)])
    assert "is the input --model" in message
    assert _md5s(child) == before and _md5s(model) == model_before


# 2. The run log: inside the command's own output, only once it is claimed, never a file of the user's --------


def test_the_run_log_stays_in_the_output_and_bad_input_leaves_none(model, tmp_path, capsys):
    mine = tmp_path / "run.log"  # the user's own file, beside --out
    mine.write_text("my notes\n")
    child = tmp_path / "child"
    one_line_error(capsys, ["prune", "--model", str(tmp_path / "missing"), "--layers", "1:3", "--out", str(child)])
    assert not child.exists() and mine.read_text() == "my notes\n"
    assert main(["prune", "--model", str(model), "--layers", "1:3", "--out", str(child)]) == 0
    assert mine.read_text() == "my notes\n"
    log = (child / "run.log").read_text()
    assert "selfdistill.console: prune ..." in log and "prune done in" in log
    before = _md5s(child)
    assert "past the model's 6 layers" in one_line_error(capsys, ["prune", "--model", str(model), "--layers", "1:9",
                                                          "--out", str(child)])
    assert _md5s(child) == before  # the refused rerun's lines are taken back from our own log too
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    assert "is not a run directory" in one_line_error(capsys, ["report", str(not_a_run)])
    assert list(not_a_run.iterdir()) == []  # no run.log inside an input folder
    assert "run directory not found" in one_line_error(capsys, ["report", str(tmp_path / "gone")])
    assert not (tmp_path / "gone").exists()  # nor a folder made to hold one


def test_a_users_file_where_the_log_would_go_is_never_appended(model, tmp_path, capsys):
    out = tmp_path / "profile.json"
    (tmp_path / "profile.json.log").write_text("mine\n")
    assert main(["profile", "--model", str(model), "--no-latency", "--out", str(out)]) == 0
    assert (tmp_path / "profile.json.log").read_text() == "mine\n" and out.is_file()
    assert "was not written by selfdistill" in capsys.readouterr().err


# 3. `run` writes only into a run directory it wrote (or an empty one) --------------------------------------


def test_run_refuses_an_unrelated_run_dir(model, gsm8k_train, tmp_path):
    from selfdistill.guard import lock_run_dir
    from selfdistill.pipeline import DatasetSpec, PipelineConfig, run

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.txt").write_text("not a run\n")
    before = _md5s(folder)
    datasets = [DatasetSpec(name="g", local=str(gsm8k_train), reserve=50)]
    with pytest.raises(UserError, match="photos is not empty and was not written by selfdistill run; pass "
                                        "--overwrite"):
        run(PipelineConfig(run_dir=str(folder), parent=str(model), datasets=datasets))
    assert _md5s(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model", "photos"]
    with lock_run_dir(folder, overwrite=True) as claim:  # --overwrite: the user says it is theirs to use
        claim.commit()
    with lock_run_dir(folder):  # and from then on it is a run directory we wrote
        pass
    with pytest.raises(UserError, match="lies inside the input parent"):
        run(PipelineConfig(run_dir=str(model / "run"), parent=str(model), datasets=datasets))
    assert not (model / "run").exists()


# 6, 9. Pickle weights: --allow-pickle loads their tensors (weights_only) in prune, evaluate and merge ---------


def test_a_pickle_holding_more_than_tensors_is_one_line(model, tmp_path, capsys):
    pickled = _pickled(model, tmp_path / "pickled", extra=True)
    message = one_line_error(capsys, ["prune", "--model", str(pickled), "--allow-pickle", "--layers", "1:3",
                              "--out", str(tmp_path / "child")])
    assert "its pickle weights hold more than tensors; --allow-pickle loads tensors only" in message
    assert not (tmp_path / "child").exists()


def test_evaluate_and_merge_take_the_allow_pickle_they_advise(model, tmp_path, capsys):
    a, b = _pickled(model, tmp_path / "a"), _pickled(model, tmp_path / "b")
    evaluate = ["evaluate", "--model", str(a), "--data-dir", str(tmp_path / "no-data"), "--out", str(tmp_path / "e")]
    assert "pass --allow-pickle" in one_line_error(capsys, evaluate)
    assert "--data-dir" in one_line_error(capsys, [*evaluate, "--allow-pickle"])  # the model passed; the data is next
    assert "pass --allow-pickle" in one_line_error(capsys, ["merge", "--models", str(a), str(b), "--out", str(tmp_path / "m")])
    assert main(["merge", "--models", str(a), str(b), "--allow-pickle", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()


# 8. An output path the filesystem refuses is one line naming it ---------------------------------------------


def test_an_output_name_too_long_is_one_line(model, gsm8k_train, tmp_path, capsys, no_model_loads):
    long = tmp_path / ("x" * 300)
    message = one_line_error(capsys, ["prune", "--model", str(model), "--layers", "1:3", "--out", str(long)])
    assert f"cannot write --out {long}: File name too long" in message
    message = one_line_error(capsys, ["distill", "--teacher", str(model), "--dataset", str(gsm8k_train), "--limit", "1",
                              "--out", str(long)])
    assert "File name too long" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# 11, 12. Errors that name the real problem ---------------------------------------------------------------


def test_a_reversed_layer_range_says_start_must_be_below_end(model, tmp_path, capsys, no_model_loads):
    message = one_line_error(capsys, ["prune", "--model", str(model), "--layers", "5:3", "--out", str(tmp_path / "c")])
    assert "--layers 5:3: START must be below END" in message and "9223372036854775807" not in message


def test_evaluate_names_a_bad_model_before_the_data_dir(model, tmp_path, capsys, no_model_loads):
    no_data = ["--data-dir", str(tmp_path / "no-data"), "--out", str(tmp_path / "e")]
    assert "model not found" in one_line_error(capsys, ["evaluate", "--model", str(tmp_path / "missing"), *no_data])
    pickled = _pickled(model, tmp_path / "pickled")
    assert "holds only pickle weights" in one_line_error(capsys, ["evaluate", "--model", str(pickled), *no_data])


# 13. A child names no custom code it does not run; merge names the first real difference --------------------


def test_children_drop_auto_map_and_merge_names_the_layer_count(model, tmp_path, capsys):
    parent = _with_config(model, auto_map={"AutoModelForCausalLM": "modeling_a.A"})
    assert main(["prune", "--model", str(parent), "--layers", "1:3", "--out", str(tmp_path / "child")]) == 0
    assert "auto_map" not in json.loads((tmp_path / "child" / "config.json").read_text())
    other = _with_config(save_tiny(tmp_path / "other", layers=4), auto_map={"AutoModelForCausalLM": "modeling_b.B"})
    message = one_line_error(capsys, ["merge", "--models", str(parent), str(other), "--out", str(tmp_path / "m")])
    assert "config 'num_hidden_layers' differs (6 vs 4)" in message


# 14. Outputs are as readable as the user's umask makes new files ------------------------------------------


def test_outputs_follow_the_umask(model, tmp_path):
    old = os.umask(0o027)
    try:
        assert main(["prune", "--model", str(model), "--layers", "1:3", "--out", str(tmp_path / "child")]) == 0
    finally:
        os.umask(old)
    child = tmp_path / "child"
    assert child.stat().st_mode & 0o777 == 0o750
    modes = {p.name: p.stat().st_mode & 0o777 for p in child.iterdir()}
    assert {"model.safetensors", "manifest.json", "README.md", "pruning.json", "run.log"} <= set(modes)
    assert set(modes.values()) == {0o640}, modes
