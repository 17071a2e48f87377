"""Repairing the cut (prune --replace linear | cosine | ffn): the fit, the fold, the ffn child, block choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import lively, make_model, make_tokenizer

from selfdistill.cli import main
from selfdistill.models import decoder_layers
from selfdistill.prune import PruneConfig, calibration_data, prune
from selfdistill.prune.repair import Repair, cut
from selfdistill.prune.replace import RepairSettings, fit_map, linear_stats
from selfdistill.prune.scoring import mean_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _texts(tmp_path: Path, n: int = 12, name: str = "calib.jsonl") -> Path:
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "seven", "dogs", "ran", "far", "away", "to", "eat",
             "forty", "two", "apples"]
    rows = [{"text": " ".join(words[i % 7:] + words[:i % 7]) * (1 + i % 2)} for i in range(n)]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _silence(layer, attention: bool = True, mlp: bool = True) -> None:
    """Zero what a layer writes into the residual stream (attention and/or MLP)."""
    with torch.no_grad():
        if attention:
            layer.self_attn.o_proj.weight.zero_()
        if mlp:
            layer.mlp.down_proj.weight.zero_()


def _saved(tmp_path: Path, model, name: str) -> Path:
    path = tmp_path / name
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _batches(tmp_path: Path, batch_size: int = 4, n: int = 12, max_length: int = 40):
    cfg = PruneConfig(calibration=str(_texts(tmp_path, n)), calibration_samples=n, heldout_samples=0,
                      max_length=max_length, batch_size=batch_size)
    return calibration_data(cfg, make_tokenizer(), "cpu").batches


def test_linear_fit_recovers_the_map_of_an_exactly_linear_block(tmp_path):
    """A block that passes its input through is exactly y = r + x I: least squares must return I."""
    model = lively(make_model(layers=6))
    for layer in decoder_layers(model)[2:4]:
        _silence(layer)
    batches = _batches(tmp_path)
    for weighting in ("none", "inverse_norm"):
        t, info = fit_map(model, batches, 2, 2, RepairSettings(method="linear", ridge=0.0, weighting=weighting))
        assert info["tokens"] > 32
        torch.testing.assert_close(t.float(), torch.eye(32), atol=1e-4, rtol=0)


def test_padding_does_not_enter_the_fit(tmp_path):
    """One padded batch and the same rows one per batch (no padding) give the same X^T X and X^T Z."""
    model = lively(make_model(layers=6))
    padded, single = _batches(tmp_path, 4, max_length=512), _batches(tmp_path, 1, max_length=512)
    assert any(bool((b["attention_mask"] == 0).any()) for b in padded)
    a = linear_stats(model, padded, 3, 2, exclude_first=0, weighting="none")
    b = linear_stats(model, single, 3, 2, exclude_first=0, weighting="none")
    real = sum(int(x["attention_mask"].sum()) for x in single)
    assert a[2] == b[2] == real
    torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-6)


def test_folded_child_equals_cut_plus_the_map_applied(tmp_path):
    """W <- T^T W in the layer before the block gives the logits of the plain cut with T applied to that
    layer's MLP output, to 1e-5 in fp32."""
    ids = torch.randint(3, 200, (2, 24))
    t = torch.eye(32, dtype=torch.float64) + 0.3 * torch.randn(32, 32, dtype=torch.float64)
    folded = lively(make_model(layers=6))
    hooked = lively(make_model(layers=6))
    cut(folded, [2, 3], Repair("linear", 2, 2, t=t))
    cut(hooked, [2, 3], None)
    decoder_layers(hooked)[1].mlp.register_forward_hook(lambda m, a, out: out @ t.float())
    with torch.no_grad():
        torch.testing.assert_close(folded(ids).logits, hooked(ids).logits, atol=1e-5, rtol=1e-5)
    assert folded.config.num_hidden_layers == 4 and folded.config.replaced_block["method"] == "linear"


def _heldout_loss(child: Path, calib: Path, cfg: PruneConfig) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(child, dtype=torch.float32).eval()
    with torch.no_grad():
        return mean_loss(model, calibration_data(cfg, make_tokenizer(), "cpu").heldout)


@pytest.mark.parametrize("method", ["linear", "cosine"])
def test_linear_and_cosine_children_are_plain_checkpoints_that_keep_their_measured_loss(tmp_path, method):
    parent = _saved(tmp_path, lively(make_model(layers=6)), "parent")
    calib = _texts(tmp_path, n=16)
    out = tmp_path / method
    cfg = PruneConfig(model=str(parent), layers="2:4", calibration=str(calib), calibration_samples=10,
                      heldout_samples=6, max_length=40, replace=method, replace_steps=20, out=str(out))
    plain = prune(PruneConfig(**{**cfg.__dict__, "replace": "none", "out": str(tmp_path / "plain")}))
    result = prune(cfg)
    record = json.loads((out / "pruning.json").read_text())["replacement"]
    assert record["method"] == method and record["rows"] == 10 and record["heldout_rows"] == 6
    assert record["tokens"] > 0 and record["excluded_positions"] == "padding"
    assert result["parameters_after"] == plain["parameters_after"]  # folded: no parameter added
    expected = record["heldout_loss_replaced"] if record["applied"] else record["heldout_loss_plain"]
    assert _heldout_loss(out, calib, cfg) == pytest.approx(expected, abs=1e-4)
    assert record["applied"] == (record["heldout_loss_replaced"] < record["heldout_loss_plain"])
    if method == "cosine":
        assert record["fit"]["cosine_steps"] == 20 and len(record["fit"]["cosine_loss_curve"]) >= 2


def test_ffn_schedule_spans_exactly_the_steps_taken_over_several_shards(tmp_path, tiny_model_dir, monkeypatch):
    """The learning rate decays to 10 % at the last step, however the cached tokens fall into shards."""
    import selfdistill.prune.replace_ffn as ffn

    monkeypatch.setattr(ffn, "SHARD_TOKENS", 100)
    monkeypatch.setattr(ffn, "BATCH_TOKENS", 1000)  # one batch per shard
    prune(PruneConfig(model=str(tiny_model_dir), layers="2:4", calibration=str(_texts(tmp_path, n=16)),
                      calibration_samples=10, heldout_samples=6, max_length=40, batch_size=3, replace="ffn",
                      replace_epochs=2, out=str(tmp_path / "f")))
    fit = json.loads((tmp_path / "f" / "pruning.json").read_text())["replacement"]["fit"]
    assert fit["shards"] > 2
    assert fit["final_lr"] == pytest.approx(0.1 * fit["lr"], rel=1e-6)


def test_ffn_child_reloads_with_from_pretrained_and_matches_the_trained_stand_in(tmp_path):
    """Block 2..3 = a layer with no attention, then a pass-through layer: exactly what the ffn stand-in can
    represent. The plain cut loses that MLP; the ffn child keeps it, reloads with the model's own class,
    and scores the held-out loss prune measured in memory."""
    model = lively(make_model(layers=6))
    _silence(decoder_layers(model)[2], attention=True, mlp=False)
    _silence(decoder_layers(model)[3])
    parent = _saved(tmp_path, model, "parent")
    calib, out = _texts(tmp_path, n=16), tmp_path / "ffn"
    cfg = PruneConfig(model=str(parent), layers="2:4", calibration=str(calib), calibration_samples=10,
                      heldout_samples=6, max_length=40, replace="ffn", replace_epochs=2, out=str(out))
    result = prune(cfg)
    report = json.loads((out / "pruning.json").read_text())
    record = report["replacement"]
    assert record["applied"] and record["heldout_loss_replaced"] < record["heldout_loss_plain"]
    assert record["fit"]["loss_by_epoch"][0] < 1e-6  # the stand-in starts as the block's first layer
    assert not list(tmp_path.glob(".repair-cache-*"))  # the shards are removed
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 5 and config["removed_layers"] == [2, 3]
    assert result["layers_after"] == report["layers_after"] == 5  # the stand-in is a layer of its own
    assert result["parameters_after"] > prune(PruneConfig(**{**cfg.__dict__, "replace": "none",
                                                             "out": str(tmp_path / "plain")}))["parameters_after"]
    assert _heldout_loss(out, calib, cfg) == pytest.approx(record["heldout_loss_replaced"], abs=1e-4)


def test_select_by_replaced_loss_keeps_the_block_whose_repaired_child_loses_least(tmp_path):
    parent = _saved(tmp_path, lively(make_model(layers=6)), "parent")
    out = tmp_path / "r"
    result = prune(PruneConfig(model=str(parent), num_layers=2, calibration=str(_texts(tmp_path, n=16)),
                               calibration_samples=10, heldout_samples=6, max_length=40, candidates=3,
                               select_by="replaced_loss", replace="linear", out=str(out)))
    report = json.loads((out / "pruning.json").read_text())
    assert len(report["heldout_check"]["candidates"]) == 5  # every start is checked
    tried = report["replacement"]["candidates"]
    assert 2 <= len(tried) <= 3 and all(c["start"] > 0 for c in tried)

    def child_loss(c):
        return c["heldout_loss_replaced"] if c["applied"] else c["heldout_loss_plain"]
    best = min(tried, key=child_loss)
    assert result["removed_layers"] == [best["start"], best["start"] + 1]
    assert report["chosen_by"] == "replaced_loss"


def test_select_by_heldout_loss_all_checks_every_start(tmp_path, tiny_model_dir):
    out = tmp_path / "a"
    result = prune(PruneConfig(model=str(tiny_model_dir), num_layers=2, calibration=str(_texts(tmp_path, n=16)),
                               calibration_samples=10, heldout_samples=6, max_length=40,
                               select_by="heldout_loss_all", out=str(out)))
    check = json.loads((out / "pruning.json").read_text())["heldout_check"]
    assert sorted(c["start"] for c in check["candidates"]) == [0, 1, 2, 3, 4]
    cheapest = min(check["candidates"], key=lambda c: c["heldout_loss_increase"])
    assert result["removed_layers"][0] == cheapest["start"]


@pytest.mark.parametrize(("args", "message"), [
    (["--num-layers", "2", "--calibration", "CAL", "--replace", "magic"], "unknown replace method 'magic'"),
    (["--layers", "1:3", "--replace", "linear"], "give --calibration or --replace-calibration"),
    (["--layers", "0:2", "--calibration", "CAL", "--replace", "linear"], "starts at layer 0"),
    (["--layers", "1,3", "--calibration", "CAL", "--replace", "linear"], "must look like START:END"),
    (["--num-layers", "2", "--scorer", "block_influence", "--calibration", "CAL", "--replace", "cosine"],
     "contiguous block"),
    (["--layers", "1:3", "--calibration", "ONE", "--calibration-samples", "1", "--replace", "linear",
      "--replace-ridge", "0"], "underdetermined"),
    (["--layers", "1:3", "--calibration", "CAL", "--replace", "linear", "--replace-calibration", "MISSING"],
     "MISSING"),
    (["--num-layers", "2", "--calibration", "CAL", "--select-by", "replaced_loss"], "needs a replace method"),
])
def test_bad_repair_input_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, capsys, args, message):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "a short row"}) + "\n")
    files = {"CAL": str(_texts(tmp_path)), "ONE": str(one), "MISSING": str(tmp_path / "missing.jsonl")}
    args = [files.get(a, a) for a in args]
    out = tmp_path / "out"
    assert main(["prune", "--model", str(tiny_model_dir), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("selfdistill: error: ") and files.get(message, message) in err[-1], err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()


@pytest.mark.slow
def test_real_model_linear_repair_lowers_the_heldout_loss_of_the_cut(tmp_path, gsm8k_train):
    """SmolLM2-135M, the angular block 10..15 (30 -> 24 layers), a linear map fitted on 24 GSM8K rows."""
    out = tmp_path / "lin"
    result = prune(PruneConfig(model="smollm2-135m-instruct", layers="10:16", calibration=str(gsm8k_train),
                               recipe="gsm8k", calibration_samples=24, heldout_samples=8, max_length=128,
                               batch_size=16, replace="linear", out=str(out)))
    record = json.loads((out / "pruning.json").read_text())["replacement"]
    print(f"held-out loss: plain cut {record['heldout_loss_plain']:.3f}, linear {record['heldout_loss_replaced']:.3f}")
    assert record["applied"] and record["heldout_loss_replaced"] < record["heldout_loss_plain"] - 0.1
    assert result["layers_after"] == 24


def test_variants_of_one_cut_share_one_block_analysis(tmp_path, tiny_model_dir, monkeypatch, caplog):
    """A second prune of the same parent and calibration (another repair) reuses the scores and the check."""
    monkeypatch.setenv("SELFDISTILL_CACHE", str(tmp_path / "cache"))
    calib = _texts(tmp_path, n=16)
    cfg = dict(model=str(tiny_model_dir), num_layers=2, calibration=str(calib), calibration_samples=10,
               heldout_samples=6, max_length=40, select_by="heldout_loss_all")
    prune(PruneConfig(**cfg, out=str(tmp_path / "a")))
    with caplog.at_level("INFO", logger="selfdistill.prune"):
        prune(PruneConfig(**cfg, replace="linear", out=str(tmp_path / "b")))
    assert "from the cache" in caplog.text
    a, b = (json.loads((tmp_path / d / "pruning.json").read_text()) for d in "ab")
    assert a["scores"] == b["scores"] and a["heldout_check"] == b["heldout_check"]
    caplog.clear()
    with caplog.at_level("INFO", logger="selfdistill.prune"):  # other calibration rows: analysed anew
        prune(PruneConfig(**{**cfg, "calibration_samples": 9}, out=str(tmp_path / "c")))
    assert "from the cache" not in caplog.text


def _sharded_stats(rank: int, world: int, store: str, batches, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = lively(make_model(layers=6))
        xtx, xtz, tokens = linear_stats(model, batches[rank::world], 3, 2, exclude_first=0)
        if rank == 0:
            torch.save({"xtx": xtx, "xtz": xtz, "tokens": tokens}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_sums_sharded_over_ranks_equal_the_single_process_fit(tmp_path):
    """Two gloo ranks, each with half the calibration batches, all-reduce to the one-process X^T X and X^T Z."""
    import torch.multiprocessing as mp

    batches = _batches(tmp_path, batch_size=2)
    out = tmp_path / "rank0.pt"
    mp.spawn(_sharded_stats, args=(2, str(tmp_path / "store"), batches, str(out)), nprocs=2, join=True)
    sharded = torch.load(out)
    xtx, xtz, tokens = linear_stats(lively(make_model(layers=6)), batches, 3, 2, exclude_first=0)
    assert sharded["tokens"] == tokens
    torch.testing.assert_close(sharded["xtx"], xtx, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sharded["xtz"], xtz, rtol=1e-9, atol=1e-9)
