"""merge stage: SLERP/linear per tensor, endpoints, the parallel fallback, compatibility checks, t grid."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import make_model, make_tokenizer

from selfdistill.config import from_dict
from selfdistill.errors import UserError
from selfdistill.merge import MergeConfig, merge, merge_state, parse_t_groups, t_for
from selfdistill.merge.linear import lerp
from selfdistill.merge.slerp import slerp


def _save(path, layers=4, seed=0, hidden=32):
    model, tok = make_model(layers=layers, seed=seed, hidden=hidden), make_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    return _save(root / "a", seed=1), _save(root / "b", seed=2)


def test_slerp_matches_hand_formula():
    p, q = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])  # orthogonal: Ω = π/2
    out = slerp(p, q, 0.25)
    omega = math.pi / 2
    expected = math.sin(0.75 * omega) * p + math.sin(0.25 * omega) * q  # sin Ω = 1
    torch.testing.assert_close(out, expected)
    # A general 2x3 case, computed independently from the formula in PAPER.md §5.
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    cos = float((p.flatten() @ q.flatten()) / (p.norm() * q.norm()))
    om = math.acos(cos)
    hand = math.sin(0.3 * om) / math.sin(om) * p + math.sin(0.7 * om) / math.sin(om) * q
    torch.testing.assert_close(slerp(p, q, 0.7), hand)
    assert slerp(p, q, 0.7).shape == (2, 3)


def test_slerp_endpoints_are_exact():
    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert torch.equal(slerp(p, q, 0.0), p) and torch.equal(slerp(p, q, 1.0), q)
    assert torch.equal(lerp(p, q, 0.0), p) and torch.equal(lerp(p, q, 1.0), q)
    pb, qb = p.bfloat16(), q.bfloat16()
    assert torch.equal(slerp(pb, qb, 0.0), pb) and slerp(pb, qb, 0.5).dtype == torch.bfloat16


def test_nearly_parallel_takes_linear_path_without_nan():
    p = torch.randn(64, generator=torch.Generator().manual_seed(2))
    q = p * 1.5 + 1e-7  # cos Ω ≈ 1: sin Ω ≈ 0 would blow up the SLERP weights
    out = slerp(p, q, 0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, lerp(p, q, 0.5))
    zero = torch.zeros(4)
    assert torch.isfinite(slerp(zero, torch.ones(4), 0.5)).all()
    assert torch.equal(slerp(p, p, 0.3), p)


def test_t_groups_pick_first_match():
    groups = parse_t_groups(["self_attn=0.25", "mlp=0.75"])
    assert t_for("model.layers.0.self_attn.q_proj.weight", 0.5, groups) == 0.25
    assert t_for("model.layers.0.mlp.up_proj.weight", 0.5, groups) == 0.75
    assert t_for("model.norm.weight", 0.5, groups) == 0.5


def test_merge_state_identical_models_and_groups():
    a, b = make_model(layers=2, seed=3), make_model(layers=2, seed=4)
    same = merge_state(a, a, "slerp", 0.4)
    for key, tensor in a.state_dict().items():
        torch.testing.assert_close(same[key], tensor, rtol=0, atol=1e-6)
    merged = merge_state(a, b, "linear", 0.5, parse_t_groups(["mlp=0.0"]))
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged[key], a.state_dict()[key])  # mlp group pinned to A
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[q], (a.state_dict()[q] + b.state_dict()[q]) / 2)


def test_merge_stage_endpoints_card_and_manifest(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    a_dir, b_dir = pair
    for t, src in ((0.0, a_dir), (1.0, b_dir)):
        out = tmp_path / f"m{t}"
        result = merge(MergeConfig(models=[str(a_dir), str(b_dir)], t=t, out=out))
        assert result["t"] == t and (out / "manifest.json").is_file()
        got = AutoModelForCausalLM.from_pretrained(out).state_dict()
        ref = AutoModelForCausalLM.from_pretrained(src).state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    card = (tmp_path / "m0.0" / "README.md").read_text()
    assert str(a_dir) in card and str(b_dir) in card and "slerp" in card
    mid = tmp_path / "mid"
    merge(MergeConfig(models=[str(a_dir), str(b_dir)], t=0.5, out=mid))
    model = AutoModelForCausalLM.from_pretrained(mid)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.tensor([[5, 6, 7]])
    assert torch.isfinite(model(ids).logits).all()


def test_grid_search_keeps_best_with_injected_scorer(pair, tmp_path):
    a_dir, b_dir = pair
    seen = []

    def scorer(folder):  # prefers t = 0.25: reads the t recorded in the merged model's config
        t = json.loads((folder / "config.json").read_text())["selfdistill"]["t"]
        seen.append(t)
        return -abs(t - 0.25)

    out = tmp_path / "grid"
    result = merge(MergeConfig(models=[str(a_dir), str(b_dir)], t_grid=[0.75, 0.25, 0.5], out=out), scorer=scorer)
    assert seen == [0.75, 0.25, 0.5] and result["t"] == 0.25
    assert set(result["grid_scores"]) == {"0.75", "0.25", "0.5"}
    assert json.loads((out / "config.json").read_text())["selfdistill"]["t"] == 0.25
    assert json.loads((out / "grid.json").read_text())["best_t"] == 0.25
    assert (out / "manifest.json").is_file() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".merge-grid-*"))


def test_bad_input_one_line_errors(pair, tmp_path):
    a_dir, b_dir = pair
    with pytest.raises(UserError, match="outside"):
        from_dict(MergeConfig, {"models": [str(a_dir), str(b_dir)], "t": 1.5})
    with pytest.raises(UserError, match="exactly two"):
        from_dict(MergeConfig, {"models": [str(a_dir)]})
    with pytest.raises(UserError, match="method"):
        from_dict(MergeConfig, {"models": [str(a_dir), str(b_dir)], "method": "ties"})
    with pytest.raises(UserError, match="t_groups"):
        from_dict(MergeConfig, {"models": [str(a_dir), str(b_dir)], "t_groups": ["mlp"]})
    other = _save(tmp_path / "deeper", layers=6)
    out = tmp_path / "never"
    with pytest.raises(UserError, match="num_hidden_layers|only one"):
        merge(MergeConfig(models=[str(a_dir), str(other)], out=out))
    assert not out.exists()
    odd = tmp_path / "odd-vocab"  # same shapes, different tokenizer
    make_model(layers=4, seed=3).save_pretrained(odd)
    tok = make_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(odd)
    with pytest.raises(UserError, match="tokenizers differ"):
        merge(MergeConfig(models=[str(a_dir), str(odd)], out=out))


def test_cli_merge_error_exit_code(pair, tmp_path):
    import subprocess
    import sys

    a_dir, b_dir = pair
    proc = subprocess.run([sys.executable, "-m", "selfdistill", "merge", "--models", str(a_dir), str(b_dir),
                           "--t", "2", "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "outside [0, 1]" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_default_scorer_scores_outside_the_reported_items(monkeypatch, pair, tmp_path):
    """The t grid is scored on selection items: the reported evaluation's limit and seed are passed to exclude."""
    import selfdistill.evaluate as evaluate_stage
    from selfdistill.merge import default_scorer

    calls = []

    def evaluate(cfg):
        calls.append(cfg)
        return {"out": cfg.out, "average": {cfg.model[0]: 0.42}}

    monkeypatch.setattr(evaluate_stage, "evaluate", evaluate)
    cfg = MergeConfig(models=[str(p) for p in pair], t_grid=[0.5], eval_tasks=["arc_easy"], eval_limit=5,
                      eval_seed=7, eval_selection=3)
    assert default_scorer(cfg)(tmp_path) == 0.42
    got = calls[0]
    assert (got.limit, got.seed, got.selection, got.tasks, got.cache) == (5, 7, 3, ["arc_easy"], False)
