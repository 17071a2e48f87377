"""profile stage: parameter counts (the paper's 16.30 %), executed FLOPs, latency, the stage end to end."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import make_model

from selfdistill.config import from_dict
from selfdistill.errors import UserError
from selfdistill.profile import ProfileConfig, count_parameters, executed_flops, paper_flops_per_token, profile


def test_llama31_8b_six_layers_is_16_30_percent():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    with torch.device("meta"):  # shapes only: no 32 GB of weights
        model = AutoModelForCausalLM.from_config(config)
    before = count_parameters(model)
    assert before["total"] == 8_030_261_248 and before["embedding"] == 128256 * 4096
    assert len(before["per_layer"]) == 32 and set(before["per_layer"]) == {218_112_000}
    del model.model.layers[24:30]
    after = count_parameters(model)
    removed = before["total"] - after["total"]
    assert removed == 1_308_672_000 and len(after["per_layer"]) == 26
    assert round(removed / before["total"], 4) == 0.1630
    assert paper_flops_per_token(after["total"]) == 2 * after["total"]


def test_executed_flops_match_the_matmul_count():
    model = make_model(layers=3, hidden=32)
    seq, attn_before = 16, model.config._attn_implementation
    flops = executed_flops(model, seq)
    cfg = model.config
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear))  # q,k,v,o, MLP and the (tied) lm_head
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attention = cfg.num_hidden_layers * 2 * (2 * seq * seq * cfg.num_attention_heads * head_dim)  # QK^T and AV
    # transformers < 5.2x compute the rotary angles as one small matmul: inv_freq [head_dim / 2] x positions [seq]
    rotary = flops["by_op"]["bmm"] - attention
    assert rotary in (0, 2 * seq * head_dim // 2)
    assert flops["total"] == 2 * seq * linear + attention + rotary
    assert flops["per_token"] == flops["total"] // seq
    assert model.config._attn_implementation == attn_before  # eager only while counting
    assert torch.isfinite(model(torch.tensor([[5, 6]])).logits).all()


def test_profile_stage_parent_and_child(tmp_path):
    from tiny import save_tiny

    parent, child = save_tiny(tmp_path / "p", layers=6), save_tiny(tmp_path / "c", layers=4)
    out = tmp_path / "profile.json"
    result = profile(ProfileConfig(model=[str(parent), str(child)], seq_len=24, decode_tokens=4, runs=2,
                                   dtype="float32", out=out))
    p, c = result["models"]
    assert (p["layers"], c["layers"]) == (6, 4)
    per_layer = p["parameters"]["per_layer"][0]
    assert p["parameters"]["total"] - c["parameters"]["total"] == 2 * per_layer
    assert c["param_reduction_pct"] == pytest.approx(100 * 2 * per_layer / p["parameters"]["total"])
    assert p["param_reduction_pct"] == 0 and c["flops_per_token_executed"] < p["flops_per_token_executed"]
    for row in (p, c):
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0 and len(row["decode_runs"]) == 2
    assert json.loads(out.read_text())["models"][1]["layers"] == 4
    assert str(child) in out.with_suffix(".md").read_text()


def test_bad_input():
    with pytest.raises(UserError, match="seq_len"):
        from_dict(ProfileConfig, {"seq_len": 0})
    with pytest.raises(UserError, match="at least one"):
        from_dict(ProfileConfig, {"model": []})


@pytest.mark.slow
def test_real_model_executed_flops(real_model_dir):
    """SmolLM2-135M at 512 tokens: stack.md measured 155.8 GFLOP with eager attention (137.7 G of matmuls)."""
    result = profile(ProfileConfig(model=[str(real_model_dir)], seq_len=512, latency=False, dtype="float32"))
    row = result["models"][0]
    assert row["layers"] == 30 and row["parameters"]["total"] == 134_515_008
    assert row["flops_executed"]["total"] == pytest.approx(155.8e9, rel=1e-3)
    assert row["flops_executed"]["by_op"]["mm"] == pytest.approx(137.7e9, rel=1e-3)


def test_a_seq_len_past_the_model_or_the_memory_is_one_line_before_loading(tmp_path, capsys):
    """--seq-len 100000000 is refused by the model's max_position_embeddings (512 for the tiny model); one a
    config allows but no memory holds (eager attention scores alone would be petabytes) by the memory check."""
    import hashlib

    from tiny import save_tiny

    from selfdistill.cli import main

    model = save_tiny(tmp_path / "tiny", layers=2)
    roomy = save_tiny(tmp_path / "roomy", layers=2)
    config = json.loads((roomy / "config.json").read_text())
    (roomy / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 10**9}))
    mine = tmp_path / "results" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("mine\n")
    before = {p: hashlib.md5(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}
    out = tmp_path / "results" / "profile.json"
    cases = [(model, "100000000", "max_position_embeddings 512"), (roomy, "100000000", "GiB are available")]
    for source, seq_len, message in cases:
        capsys.readouterr()
        code = main(["profile", "--model", str(source), "--seq-len", seq_len, "--dtype", "float32",
                     "--out", str(out)])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("selfdistill: error:")]
        assert code == 2 and len(lines) == 1 and message in lines[0], err
        assert "Traceback" not in err
    assert not out.exists() and not out.with_suffix(".md").exists()
    assert before == {p: hashlib.md5(p.read_bytes()).hexdigest() for p in before}  # the user's files
