"""Pruning: scorer invariants, surgery on every supported architecture, the CLI and its bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny import ARCHS, make_model, make_tokenizer

from selfdistill.cli import main
from selfdistill.config import from_dict
from selfdistill.data import Example
from selfdistill.errors import UserError
from selfdistill.models import decoder_layers
from selfdistill.prune import PruneConfig, calibration_data, prune
from selfdistill.prune.calibration import build
from selfdistill.prune.scoring import SCORERS, angular_distance_matrix
from selfdistill.prune.surgery import remove_layers


def _texts_file(tmp_path: Path, n: int = 6) -> Path:
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "seven", "dogs", "ran", "far", "away",
             "to", "eat", "forty", "two", "apples"]
    rows = [{"text": " ".join(words[i % 5:]) * (1 + i % 3)} for i in range(n)]
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _batches(tmp_path: Path, tok, max_length: int = 48):
    cfg = PruneConfig(calibration=str(_texts_file(tmp_path)), max_length=max_length, batch_size=4)
    return calibration_data(cfg, tok, "cpu").batches


def _make_identity(layer) -> None:
    """Zero the two projections that write into the residual stream: the layer then returns its input."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def test_angular_distances_lie_in_unit_interval(tmp_path):
    model, tok = make_model(layers=6), make_tokenizer()
    scores = SCORERS["angular"](model, _batches(tmp_path, tok), 2)
    values = [v for row in scores.matrix for v in row if v is not None]
    assert len(scores.matrix) == 5 and len(values) == sum(6 - n + 1 for n in range(1, 6))
    assert all(0.0 <= v <= 1.0 for v in values)
    assert scores.removed == [scores.per_start.index(min(v for v in scores.per_start if v is not None)) + i
                              for i in range(2)]


@pytest.mark.parametrize("scorer", ["angular", "loss"])
def test_identity_block_has_zero_score_and_is_chosen(tmp_path, scorer):
    model, tok = make_model(layers=6, seed=1), make_tokenizer()
    for layer in decoder_layers(model)[3:5]:
        _make_identity(layer)
    scores = SCORERS[scorer](model, _batches(tmp_path, tok), 2)
    assert abs(scores.per_start[3]) < 1e-6
    assert all(abs(v) > 1e-4 for i, v in enumerate(scores.per_start) if v is not None and i != 3)
    if scorer == "angular":  # a random block can *lower* the loss of a random model, so only angular must pick it
        assert scores.removed == [3, 4]


def test_block_influence_picks_identity_layers_even_when_apart(tmp_path):
    model, tok = make_model(layers=6, seed=2), make_tokenizer()
    for i in (1, 4):
        _make_identity(decoder_layers(model)[i])
    scores = SCORERS["block_influence"](model, _batches(tmp_path, tok), 2)
    assert scores.removed == [1, 4]
    assert scores.per_layer[1] < 1e-6 and scores.per_layer[4] < 1e-6


def test_angular_matches_independent_unbatched_computation(tmp_path):
    """Our hooked, padded, batched matrix equals the definition computed sample by sample."""
    model, tok = make_model(layers=5, seed=3), make_tokenizer()
    batches = _batches(tmp_path, tok, max_length=40)
    ours = SCORERS["angular"](model, batches, 1).matrix
    norm = model.model.norm
    model.model.norm = torch.nn.Identity()  # so the last hidden state is the pre-norm residual stream
    per_sample = []
    with torch.no_grad():
        for batch in batches:
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                seq = ids[mask.bool()].unsqueeze(0)
                hidden = model(seq, output_hidden_states=True).hidden_states
                per_sample.append(torch.stack([h[0, -1] for h in hidden]))
    model.model.norm = norm
    L = 5
    for n in range(1, L):
        for l in range(L - n + 1):
            expected = sum(math.acos(max(-1.0, min(1.0, torch.nn.functional.cosine_similarity(
                s[l].double(), s[l + n].double(), dim=0).item()))) / math.pi for s in per_sample) / len(per_sample)
            assert ours[n - 1][l] == pytest.approx(expected, abs=1e-5)


def test_score_position_is_the_content_end_not_the_template_close():
    """With the chat template on, T is the answer's last token, not `<|im_end|>` or the newline after it."""
    tok = make_tokenizer()
    example = Example(id="0", messages=[{"role": "user", "content": "What is 2+3?"}], reference="It is 5.")
    for template in (True, False):
        data = build([example], [], tok, chat_template=template, max_length=128, batch_size=1, device="cpu",
                     source="x")
        ids, position = data.batches[0]["input_ids"][0], int(data.batches[0]["positions"][0])
        assert tok.decode(ids[: position + 1]).endswith("It is 5.")
        assert (data.trailing_tokens > 0) == template  # the template closes the turn after the content


def test_candidates_are_checked_on_heldout_rows(tmp_path, tiny_model_dir):
    out = tmp_path / "c"
    prune(PruneConfig(model=str(tiny_model_dir), num_layers=2, calibration=str(_texts_file(tmp_path, n=10)),
                      calibration_samples=6, heldout_samples=4, candidates=2, max_length=32, out=str(out)))
    report = json.loads((out / "pruning.json").read_text())
    check = report["heldout_check"]
    assert check["rows"] == 4 and len(check["candidates"]) in (2, 3)
    assert sum(c["chosen"] for c in check["candidates"]) == 1
    chosen = next(c for c in check["candidates"] if c["chosen"])
    assert chosen["start"] == report["removed_layers"][0]
    assert all(math.isfinite(c["heldout_loss_increase"]) for c in check["candidates"])
    assert "content" in report["calibration"]["position"]


def test_distance_of_a_state_with_itself_is_zero():
    states = torch.randn(3, 2, 8)
    d = angular_distance_matrix(states)
    assert torch.allclose(torch.diagonal(d, dim1=0, dim2=1), torch.zeros(2, 3, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_surgery_saves_and_reloads_with_identical_logits(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = make_model(arch, layers=6, seed=4)
    remove_layers(model, [2, 3])
    assert len(decoder_layers(model)) == 4 and model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in decoder_layers(model)] == [0, 1, 2, 3]
    if arch == "gemma2":  # alternating sliding/full attention must still describe the kept layers
        assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    ids = torch.tensor([[5, 9, 17, 33, 65, 100, 7, 8]])
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / arch)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / arch).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)
        # generation exercises the KV cache, which is indexed by the renumbered layer_idx
        cached = reloaded.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
        uncached = reloaded.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2, use_cache=False)
    assert torch.equal(cached, uncached)


def test_prune_cli_writes_model_report_and_heatmap(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "child"
    code = main(["prune", "--model", str(tiny_model_dir), "--num-layers", "2", "--calibration",
                 str(_texts_file(tmp_path)), "--max-length", "32", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "pruning.json").read_text())
    assert report["layers_after"] == 4 and len(report["removed_layers"]) == 2
    assert len(report["scores"]["distances_by_start"]) == 6
    assert report["parameters"]["after"] < report["parameters"]["before"]
    assert (out / "distances.png").stat().st_size > 1000 and (out / "manifest.json").is_file()
    child = AutoModelForCausalLM.from_pretrained(out)
    assert child.config.num_hidden_layers == 4 and child.config.removed_layers == report["removed_layers"]


def test_explicit_range_needs_no_calibration(tmp_path, tiny_model_dir):
    result = prune(PruneConfig(model=str(tiny_model_dir), layers="4:6", out=str(tmp_path / "c")))
    assert result["removed_layers"] == [4, 5] and result["layers_after"] == 4


def _bad_calibration(tmp_path: Path, kind: str) -> str:
    path = tmp_path / f"{kind}.jsonl"
    content = {"empty": b"", "json": b'{"text": "ok"}\n{"text": broken\n',
               "utf8": b'{"text": "\xff\xfe"}\n'}[kind]
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "/nonexistent/model", "--num-layers", "1", "--layers", "0:1"], "model not found"),
    (["--model", "smollm9-unknown", "--num-layers", "1", "--layers", "0:1"], "built-in alias"),
    (["--num-layers", "6", "--calibration", "CAL"], "smaller than the model's 6 layers"),
    (["--num-layers", "0", "--calibration", "CAL"], "at least 1"),
    (["--layers", "5:8"], "END 8 is past the model's 6 layers"),
    (["--num-layers", "2", "--calibration", "EMPTY"], "no usable rows"),
    (["--num-layers", "2", "--calibration", "BADJSON"], "BADJSON:2: invalid JSON"),
    (["--num-layers", "2", "--calibration", "BADUTF8"], "BADUTF8:1: line is not valid UTF-8"),
    (["--num-layers", "2", "--scorer", "magic", "--calibration", "CAL"], "unknown scorer 'magic'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, capsys, args, message):
    files = {"CAL": str(_texts_file(tmp_path)), "EMPTY": _bad_calibration(tmp_path, "empty"),
             "BADJSON": _bad_calibration(tmp_path, "json"), "BADUTF8": _bad_calibration(tmp_path, "utf8")}
    args = [files.get(a, a) for a in args]
    message = next((message.replace(k, v) for k, v in files.items() if k in message), message)
    if "--model" not in args:
        args = ["--model", str(tiny_model_dir), *args]
    out = tmp_path / "out"
    assert main(["prune", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("selfdistill: error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_a_failed_rerun_keeps_the_previous_output(tmp_path, tiny_model_dir):
    out = tmp_path / "child"
    prune(PruneConfig(model=str(tiny_model_dir), layers="1:3", out=str(out)))
    before = (out / "model.safetensors").read_bytes()
    assert main(["prune", "--model", str(tiny_model_dir), "--layers", "1:9", "--out", str(out)]) == 2
    assert (out / "model.safetensors").read_bytes() == before and (out / "manifest.json").is_file()


@pytest.mark.slow
def test_real_model_templated_and_plain_calibration_choose_the_same_block(tmp_path, gsm8k_train):
    """SmolLM2-135M on 32 GSM8K rows: with the content position, the chat template no longer moves the cut."""
    chosen = {}
    for template in (True, False):
        result = prune(PruneConfig(model="smollm2-135m-instruct", num_layers=6, calibration=str(gsm8k_train),
                                   recipe="gsm8k", calibration_samples=32, heldout_samples=8, max_length=256,
                                   chat_template=template, out=str(tmp_path / f"t{template}")))
        chosen[template] = result["removed_layers"]
    assert chosen[True] == chosen[False] == list(range(10, 16))


@pytest.mark.slow
def test_real_model_prune_six_of_thirty(tmp_path, gsm8k_train, real_model_dir):
    """SmolLM2-135M: 30 -> 24 layers on 16 GSM8K samples; reloads, generates, and loses next-token quality."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smol24"
    result = prune(PruneConfig(model="smollm2-135m-instruct", num_layers=6, calibration=str(gsm8k_train),
                               calibration_samples=16, max_length=256, out=str(out)))
    assert result["layers_after"] == 24
    child = AutoModelForCausalLM.from_pretrained(out).eval()
    parent = AutoModelForCausalLM.from_pretrained(real_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert child.config.num_hidden_layers == 24
    held_out = [json.loads(line) for line in gsm8k_train.read_text().splitlines()[-4:]]
    texts = [f"{r['question']}\n{r['answer']}" for r in held_out]
    losses = {}
    with torch.no_grad():
        for name, model in (("parent", parent), ("child", child)):
            enc = [tok(t, return_tensors="pt").input_ids for t in texts]
            losses[name] = sum(model(ids, labels=ids).loss.item() for ids in enc) / len(enc)
        prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)
        generated = child.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    print(f"next-token loss on 4 held-out GSM8K rows: parent {losses['parent']:.3f}, child {losses['child']:.3f}")
    assert losses["child"] > losses["parent"]


def test_select_by_heldout_loss_removes_the_cheapest_candidate(tmp_path, tiny_model_dir):
    out = tmp_path / "c"
    result = prune(PruneConfig(model=str(tiny_model_dir), num_layers=2, calibration=str(_texts_file(tmp_path, n=10)),
                               calibration_samples=6, heldout_samples=4, candidates=3, select_by="heldout_loss",
                               max_length=32, out=str(out)))
    check = json.loads((out / "pruning.json").read_text())["heldout_check"]
    cheapest = min(check["candidates"], key=lambda c: c["heldout_loss_increase"])
    assert result["removed_layers"] == [cheapest["start"], cheapest["start"] + 1]
    with pytest.raises(UserError, match="select_by"):
        from_dict(PruneConfig, {"select_by": "magic"})


def test_prune_without_matplotlib_still_writes_the_child(tmp_path, tiny_model_dir, monkeypatch, caplog):
    """A bare GPU environment may lack matplotlib: the heatmap is skipped with a warning, the child is written."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                        find_spec(name, *a))
    out = tmp_path / "child"
    assert main(["prune", "--model", str(tiny_model_dir), "--num-layers", "2", "--calibration",
                 str(_texts_file(tmp_path)), "--max-length", "32", "--out", str(out)]) == 0
    assert (out / "pruning.json").is_file() and (out / "manifest.json").is_file()
    assert not (out / "distances.png").exists() and "matplotlib is not installed" in caplog.text
