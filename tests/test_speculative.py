"""speculate stage: exact statistics on fake models, losslessness on tiny models, the stage end to end."""

from __future__ import annotations

import json

import pytest
from tiny import lively, make_model, make_tokenizer

from selfdistill.config import from_dict
from selfdistill.errors import UserError
from selfdistill.speculative import SpeculateConfig, speculate
from selfdistill.speculative.loop import ModelRunner, greedy_generate, speculative_generate

VOCAB = 50


class FakeRunner:
    """A 'model' whose greedy next token is a fixed function of the sequence so far; it counts forward passes."""

    def __init__(self, rule):
        self.rule, self.seq, self.passes = rule, [], 0

    def __len__(self):
        return len(self.seq)

    def feed(self, tokens):
        self.passes += 1
        preds = []
        for tok in tokens:
            self.seq.append(tok)
            preds.append(self.rule(self.seq))
        return preds

    def crop(self, length):
        assert length <= len(self.seq)
        del self.seq[length:]


PROMPT = [1, 2, 3]


def target_rule(seq):
    return (7 * len(seq) + 3) % VOCAB + 10  # never the eos id 0


def wrong_at(positions):
    """A draft that agrees with the target except where the generated-token index is in `positions`."""
    def rule(seq):
        index = len(seq) - len(PROMPT)  # index of the token being predicted among the new tokens
        good = target_rule(seq)
        return good + 1 if positions(index) else good
    return rule


def run(draft_rule, k=4, max_new=16):
    target, draft = FakeRunner(target_rule), FakeRunner(draft_rule)
    tokens, stats = speculative_generate(target, draft, PROMPT, k, max_new, eos={0})
    reference = greedy_generate(FakeRunner(target_rule), PROMPT, max_new, eos={0})
    assert tokens == reference  # lossless in every case
    return stats.summary(), target


def test_always_accept_exact_counts():
    s, target = run(target_rule, k=4, max_new=16)  # prefill gives 1 token, then 3 rounds of 4 + 1 bonus
    assert (s["num_drafts"], s["num_draft_tokens"], s["num_accepted_tokens"]) == (3, 12, 12)
    assert s["draft_acceptance_rate"] == 1.0 and s["mean_acceptance_length"] == 5.0
    assert s["acceptance_per_position"] == [1.0, 1.0, 1.0, 1.0]
    assert s["target_forward_passes"] == 4 == target.passes and s["emitted_tokens"] == 16


def test_never_accept_exact_counts():
    s, target = run(wrong_at(lambda i: True), k=4, max_new=10)  # one token per verify pass
    assert (s["num_drafts"], s["num_draft_tokens"], s["num_accepted_tokens"]) == (9, 36, 0)
    assert s["draft_acceptance_rate"] == 0.0 and s["mean_acceptance_length"] == 1.0
    assert s["acceptance_per_position"] == [0.0] * 4
    assert s["target_forward_passes"] == 10 == target.passes


@pytest.mark.parametrize("j", [1, 2, 3, 4])
def test_accept_until_position_j(j):
    # Wrong at every j-th new token: each round accepts exactly j - 1 proposals and rejects at position j.
    s, _ = run(wrong_at(lambda i: i % j == 0), k=4, max_new=1 + 5 * j)
    rounds = 5
    assert s["num_drafts"] == rounds and s["num_accepted_tokens"] == rounds * (j - 1)
    assert s["acceptance_per_position"] == [1.0] * (j - 1) + [0.0] * (4 - j + 1)
    assert s["mean_acceptance_length"] == j
    assert s["draft_acceptance_rate"] == (j - 1) / 4


def test_eos_inside_accepted_run_stops_output():
    def rule(seq):  # emits eos (0) as the 6th new token
        return 0 if len(seq) - len(PROMPT) == 5 else target_rule(seq)

    tokens, _ = speculative_generate(FakeRunner(rule), FakeRunner(rule), PROMPT, 4, 50, eos={0})
    assert tokens == greedy_generate(FakeRunner(rule), PROMPT, 50, eos={0}) and tokens[-1] == 0 and len(tokens) == 6


def test_lossless_on_tiny_random_pair():
    target, draft = lively(make_model(layers=4), 0), lively(make_model(layers=4), 0)
    del draft.model.layers[2]  # a pruned child: it agrees with its parent only part of the time
    draft.config.num_hidden_layers = 3
    for i, layer in enumerate(draft.model.layers):
        layer.self_attn.layer_idx = i
    accepted = proposed = 0
    for prompt in ([100, 3, 77], [250, 251, 252, 253, 254, 255]):
        reference = greedy_generate(ModelRunner(target), prompt, 24, eos={2})
        assert len(set(reference)) > 3  # a non-degenerate continuation
        for k in (1, 3):
            tokens, stats = speculative_generate(ModelRunner(target), ModelRunner(draft), prompt, k, 24, eos={2})
            assert tokens == reference, k
            assert stats.target_passes == 1 + stats.drafts and stats.emitted == len(tokens)
            accepted, proposed = accepted + stats.accepted, proposed + stats.proposed
    assert 0 < accepted < proposed  # both the accept and the rollback paths ran


def _write_prompts(path, n=3):
    rows = [{"question": f"What is {i} plus {i + 1}?", "answer": f"It is {2 * i + 1}.\n#### {2 * i + 1}"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_stage_two_drafts_table_and_json(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    child = tmp_path / "child"  # the target with its final norm negated: its argmax is the target's argmin
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.neg_()
    model.save_pretrained(child)
    make_tokenizer().save_pretrained(child)
    out = tmp_path / "spec.json"
    cfg = SpeculateConfig(target=str(tiny_model_dir), draft=[str(tiny_model_dir), str(child)],
                          prompts=str(_write_prompts(tmp_path / "p.jsonl")), recipe="gsm8k", k=3, limit=3,
                          max_new_tokens=12, hf_assisted=True, out=out)
    result = speculate(cfg)
    self_row, child_row = result["drafts"]
    assert self_row["draft_acceptance_rate"] == 1.0 and self_row["lossless"] and child_row["lossless"]
    assert self_row["hf_assisted_matches_target"] == 3
    assert child_row["draft_acceptance_rate"] == 0.0 and child_row["mean_acceptance_length"] == 1.0
    assert child_row["target_forward_passes"] == result["target_tokens"]  # one token per target pass
    assert self_row["target_forward_passes"] < child_row["target_forward_passes"]
    saved = json.loads(out.read_text())
    assert saved["drafts"][1]["num_drafts"] == child_row["num_drafts"]
    for row in saved["drafts"]:  # the per-prompt counts add up to the totals the intervals are drawn around
        assert len(row["per_prompt"]["drafts"]) == 3 and sum(row["per_prompt"]["drafts"]) == row["num_drafts"]
        assert sum(row["per_prompt"]["accepted"]) == row["num_accepted_tokens"]
        lo, hi = row["mean_acceptance_length_ci95"]
        assert lo <= row["mean_acceptance_length"] <= hi
    (ratio,) = saved["comparisons"]
    assert ratio["draft"] == str(child) and ratio["against"] == str(tiny_model_dir)
    assert ratio["mal_ratio"] == pytest.approx(1.0 / self_row["mean_acceptance_length"])
    md = out.with_suffix(".md").read_text()
    assert "| " + str(child) in md and "MAL of " in md


def test_bad_input(tiny_model_dir, tmp_path):
    prompts = str(_write_prompts(tmp_path / "p.jsonl"))
    with pytest.raises(UserError, match="k must be"):
        from_dict(SpeculateConfig, {"draft": ["x"], "prompts": prompts, "k": 0})
    with pytest.raises(UserError, match="draft"):
        from_dict(SpeculateConfig, {"prompts": prompts})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError):
        speculate(SpeculateConfig(target=str(tiny_model_dir), draft=[str(tiny_model_dir)], prompts=str(empty)))
    other = tmp_path / "other"  # same model, different vocabulary
    from transformers import AutoTokenizer

    tok = make_tokenizer()
    tok.add_tokens(["<extra>"])
    make_model(layers=2).save_pretrained(other)
    tok.save_pretrained(other)
    AutoTokenizer.from_pretrained(other)
    with pytest.raises(UserError, match="different tokenizer"):
        speculate(SpeculateConfig(target=str(tiny_model_dir), draft=[str(other)], prompts=prompts, limit=1,
                                  max_new_tokens=2))


@pytest.mark.slow
def test_real_model_as_its_own_draft_accepts_everything(real_model_dir, data_dir, tmp_path):
    cfg = SpeculateConfig(target=str(real_model_dir), draft=[str(real_model_dir)],
                          prompts=str(data_dir / "gsm8k" / "test.jsonl"), recipe="gsm8k", k=4, limit=1,
                          max_new_tokens=16, hf_assisted=False)
    row = speculate(cfg)["drafts"][0]
    assert row["lossless"] and row["draft_acceptance_rate"] == 1.0
    assert row["acceptance_per_position"] == [1.0] * 4 and row["mean_acceptance_length"] == 5.0
    assert row["emitted_tokens"] == 16 and row["target_forward_passes"] == 1 + 3  # prefill + 3 rounds of 5


def test_reference_ignores_the_checkpoints_sampling_settings():
    from selfdistill.speculative import _hf_generate

    model = lively(make_model(layers=2), 0)
    model.generation_config.repetition_penalty, model.generation_config.do_sample = 3.0, True
    cfg = SpeculateConfig(draft=["unused"], prompts="unused", max_new_tokens=12, k=2)
    reference = greedy_generate(ModelRunner(model), [100, 3, 77], 12, eos={2})
    assert _hf_generate(model, [100, 3, 77], cfg, {2}, 2) == reference
    assert _hf_generate(model, [100, 3, 77], cfg, {2}, 2, assistant=lively(make_model(layers=2), 1)) == reference
    assert model.generation_config.repetition_penalty == 3.0  # restored afterwards


def test_mal_interval_resamples_prompts_and_brackets_the_estimate():
    from selfdistill.speculative.intervals import mal_interval

    same = {"drafts": [10] * 8, "accepted": [20] * 8}  # every prompt has MAL 3: nothing varies
    assert mal_interval(same) == [3.0, 3.0]
    mixed = {"drafts": [10, 10, 10, 10, 5, 5, 5, 5], "accepted": [0, 0, 0, 0, 20, 20, 20, 20]}
    point = 1 + 80 / 60
    lo, hi = mal_interval(mixed)
    assert 1.0 < lo < point < hi < 5.0  # a ratio of sums, not a mean of per-prompt MALs (which is 3.0)


def test_mal_ratio_is_paired_over_prompts():
    from selfdistill.speculative.intervals import mal_ratio

    base = {"drafts": [10, 4, 7, 12, 3, 9], "accepted": [5, 8, 1, 20, 0, 9]}
    better = {"drafts": base["drafts"], "accepted": [a + d // 2 for a, d in zip(base["accepted"], base["drafts"])]}
    same = mal_ratio(base, base)
    assert same["mal_ratio"] == 1.0 and same["ci95"] == [1.0, 1.0]  # paired: a draft against itself never moves
    up = mal_ratio(better, base)
    assert up["mal_ratio"] > 1 and up["ci95"][0] > 1.0  # better on every prompt: the interval excludes 1
    with pytest.raises(ValueError, match="same prompts"):
        mal_ratio(base, {"drafts": [1], "accepted": [1]})
