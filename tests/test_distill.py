"""Self-data distillation stage: engine exactness, order, resume, shards, stats, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny import lively

from selfdistill.config import from_dict
from selfdistill.distill import DistillConfig, distill
from selfdistill.distill.prompts import MATH_PREFILL
from selfdistill.engine import GenParams, generate_hf, length_sorted
from selfdistill.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _cfg(teacher, dataset, out, /, **kw) -> DistillConfig:
    base = dict(teacher=str(teacher), dataset=str(dataset), recipe="gsm8k", limit=6, batch_size=3,
                max_new_tokens=6, dtype="float32", device="cpu", out=str(out))
    return from_dict(DistillConfig, {**base, **kw})


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, gsm8k_train, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "distilled.jsonl"
    distill(_cfg(tiny_model_dir, gsm8k_train, out))
    return out


def _random_prompts(n: int, seed: int = 0) -> list[tuple[int, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return [(i, torch.randint(3, 260, (int(k),), generator=g).tolist())
            for i, k in enumerate(torch.randint(2, 30, (n,), generator=g))]


def _generate_one(model, ids: list[int], max_new: int, stops: tuple[int, ...]) -> list[int]:
    """Plain greedy `generate` for one prompt: the reference the engine must match (stop token included)."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new, do_sample=False, eos_token_id=list(stops), pad_token_id=2)
    return out[0, len(ids):].tolist()


@contextmanager
def _watch_forwards(model) -> Iterator[list[dict]]:
    """What each forward of `model` within the block was given: input shape, logits kept (0 = every
    position: a packed decode step), the cache's class, and how many sdpa calls it made (one per layer and
    group of slots, with `_count_sdpa`)."""
    seen: list[dict] = []

    def before(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append({"shape": tuple(kwargs["input_ids"].shape), "keep": kwargs.get("logits_to_keep"),
                     "cache": type(cache).__name__, "sdpa": 0})
    handle = model.register_forward_pre_hook(before, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _count_sdpa(monkeypatch, seen: list[dict]) -> None:
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        seen[-1]["sdpa"] += 1
        return sdpa(*args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)


# one prompt per prefill chunk and one decode attention group per slot / all prompts in one chunk and group
@pytest.mark.parametrize("prefill_tokens,group_cost", [(1, 0), (1024, 10**6)])
def test_refill_engine_equals_one_at_a_time_generate(prefill_tokens, group_cost, monkeypatch):
    """Greedy ids of the refilling engine (3 slots, refills, left growth) == plain generate per prompt."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import make_model, make_tokenizer

    model, tok = lively(make_model(layers=3, seed=3)), make_tokenizer()
    assert model.config._attn_implementation == "sdpa"
    prompts, stops = _random_prompts(11), (17, 40, 99)
    params = GenParams(max_new_tokens=9, batch_size=3, stop_ids=stops, refill=1, prefill_tokens=prefill_tokens,
                       group_cost=group_cost)
    with _watch_forwards(model) as seen:
        _count_sdpa(monkeypatch, seen)
        got = {r.index: r for r in generate_hf(model, tok, length_sorted(prompts, 4), params)}
        monkeypatch.undo()
    assert sorted(got) == list(range(11))
    for i, ids in prompts:
        ref = _generate_one(model, ids, 9, stops)
        finish = "stop" if ref and ref[-1] in stops else "length"
        assert got[i].tokens == [t for t in ref if t not in stops] and got[i].finish == finish, i
    decode = [f for f in seen if f["keep"] == 0]  # packed decode steps: the ragged path ran
    assert decode and all(f["shape"][0] == 1 for f in decode)
    # 3 layers x (one group per slot / one group for all slots)
    assert max(f["sdpa"] for f in decode) == 3 * (3 if group_cost == 0 else 1)
    prefills = [f for f in seen if f["keep"] == 1]
    assert (max(f["shape"][0] for f in prefills) == 1) == (prefill_tokens == 1)
    assert model.config._attn_implementation == "sdpa"  # restored after each step


@pytest.mark.parametrize("draft_budget", [128, 6])  # every row drafts / only some steps have room to
def test_drafted_decoding_equals_plain_greedy(draft_budget):
    """Prompt-lookup drafts are verified against the argmax: same ids as `generate`, in fewer steps."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import make_model, make_tokenizer

    model, tok = lively(make_model(layers=3, seed=3)), make_tokenizer()
    prompts, stops = _random_prompts(11), (17, 40, 99)
    params = GenParams(max_new_tokens=40, batch_size=3, stop_ids=stops, refill=1, draft_tokens=4,
                       draft_budget=draft_budget)
    with _watch_forwards(model) as seen:
        got = {r.index: r.tokens for r in generate_hf(model, tok, length_sorted(prompts, 4), params)}
    steps = [f for f in seen if f["keep"] == 0]
    for i, ids in prompts:
        assert got[i] == [t for t in _generate_one(model, ids, 40, stops) if t not in stops], i
    assert max(f["shape"][1] for f in steps) > 3  # some step fed more tokens than there are slots: drafts
    assert max(f["shape"][1] for f in steps) <= max(3, draft_budget)
    # more tokens fed than all rows emitted (stop tokens and prefill included): some drafts were rejected
    assert sum(f["shape"][1] for f in steps) > sum(map(len, got.values())) + 2 * len(prompts)
    # each step emits at most one token per row without drafts: far fewer steps means drafts were kept
    assert len(steps) < 0.8 * sum(map(len, got.values())) / 3


def test_rows_longer_than_the_spare_columns_grow_the_kv_buffer():
    """300 new tokens outgrow the window's spare columns: the buffer grows mid-decode, ids stay generate's."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import make_model, make_tokenizer

    model, tok = lively(make_model(layers=2, seed=3)), make_tokenizer()
    prompts = _random_prompts(4)
    got = {r.index: r.tokens for r in generate_hf(model, tok, prompts, GenParams(max_new_tokens=300, batch_size=2,
                                                                                stop_ids=(1,), refill=1))}
    assert max(map(len, got.values())) == 300
    for i, ids in prompts:
        assert got[i] == [t for t in _generate_one(model, ids, 300, (1,)) if t != 1], i


def test_sampling_is_seeded_and_never_drafts():
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import make_model, make_tokenizer

    from selfdistill.engine import RefillEngine

    model, tok = make_model(layers=2, seed=1), make_tokenizer()
    params = GenParams(max_new_tokens=12, batch_size=4, stop_ids=(17,), temperature=0.9, top_p=0.9, seed=5)
    assert not RefillEngine(model, params, 2).drafting
    runs = [{r.index: r.tokens for r in generate_hf(model, tok, _random_prompts(6, seed=2), params)} for _ in range(2)]
    assert runs[0] == runs[1] and sorted(runs[0]) == list(range(6))
    assert all(len(t) <= 12 and 17 not in t for t in runs[0].values())


def test_ngram_drafter_proposes_the_latest_continuation_of_the_longest_match():
    from selfdistill.engine import NgramDrafter

    assert NgramDrafter([5, 6, 7, 1, 2, 5, 6], max_n=3).draft(3) == [7, 1, 2]
    assert NgramDrafter([5, 6, 7, 1, 5, 6, 8, 2, 5, 6], max_n=3).draft(2) == [8, 2]  # the latest "5 6"
    d = NgramDrafter([1, 2, 3, 9, 9, 2, 3, 4, 4, 1, 2, 3], max_n=3)
    assert d.draft(2) == [9, 9]  # the 3-gram 1 2 3 beats the later 2-gram 2 3 (-> 4 4)
    d.extend([7])
    assert d.draft(2) == []  # 7 never occurred before
    d.extend([1, 2])
    assert d.draft(4) == [3, 7, 1, 2]  # now "7 1 2" is new, "1 2" latest continues with 3 7 ...
    assert NgramDrafter([4], max_n=3).draft(2) == []


def test_greedy_ids_match_fp32_argmax_with_ties_and_negatives():
    from selfdistill.engine import greedy_ids

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        x = (torch.randn(7, 300, generator=g) * 5).to(dtype)
        x[1] = -x[1].abs() - 1  # all negative
        x[2, 10] = x[2, 200] = x[2].max()  # a tie: first index wins
        x[3] = 0.0
        x[4] = -x[4].abs() - 1
        x[4, 7] = x[4, 250] = x[4].max()  # a tie in an all-negative row
        x[5, :150] = -x[5, :150].abs() - 1  # the maximum in the second half
        assert torch.equal(greedy_ids(x), x.float().argmax(-1)), dtype
        assert torch.equal(greedy_ids(x[None]), x.float().argmax(-1)[None]), dtype
    assert greedy_ids(torch.tensor([[0.5, 2.0, 2.0]])).tolist() == [1]


def test_prefill_chunks_fill_the_token_budget_longest_first():
    """Prompts are prefilled longest first, as many per forward as fit in prefill_tokens once padded."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import make_model, make_tokenizer

    model, tok = lively(make_model(layers=2, seed=2)), make_tokenizer()
    g = torch.Generator().manual_seed(1)
    prompts = [(i, torch.randint(3, 260, (n,), generator=g).tolist()) for i, n in enumerate([10, 60, 30, 25, 120, 30, 5])]
    stops = (17, 40, 99)
    params = GenParams(max_new_tokens=3, batch_size=7, stop_ids=stops, prefill_tokens=90)
    with _watch_forwards(model) as seen:
        got = {r.index: r.tokens for r in generate_hf(model, tok, prompts, params)}
    # padded to its own longest, within the budget (3 x 30 fills it) unless one prompt alone exceeds it
    assert [f["shape"] for f in seen if f["keep"] == 1] == [(1, 120), (1, 60), (3, 30), (2, 10)]
    for i, ids in prompts:  # each prompt's KV went to its own slot
        assert got[i] == [t for t in _generate_one(model, ids, 3, stops) if t not in stops], i


def test_packed_linears_give_the_same_bf16_outputs_and_are_undone():
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import make_model

    from selfdistill.engine import can_pack, packed_linears

    model = make_model(layers=2, seed=4).to(torch.bfloat16)
    if not can_pack(model):
        pytest.skip("this CPU's oneDNN has no 16-bit linear")
    ids = torch.randint(3, 260, (3, 17), generator=torch.Generator().manual_seed(0))
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        with packed_linears(model) as n:
            assert n == len(linears) == 2 * 7 + 1 and all("forward" in vars(m) for m in linears)
            packed = model(input_ids=ids).logits
        assert not any("forward" in vars(m) for m in linears)
        assert torch.equal(model(input_ids=ids).logits, plain)
    assert torch.equal(packed, plain)
    with packed_linears(model.float()) as n:  # fp32 stays on the plain path
        assert n == 0


def test_split_slots_groups_rows_by_their_first_column():
    from selfdistill.engine.attention import split_slots

    # Two long rows then two short ones: splitting saves 2 x 90 columns, worth one extra call of cost 50.
    assert split_slots([0, 5, 90, 95], end=100, group_cost=50) == [(0, 2, 0), (2, 4, 90)]
    assert split_slots([0, 5, 90, 95], end=100, group_cost=1000) == [(0, 4, 0)]
    assert split_slots([3], end=10, group_cost=0) == [(0, 1, 3)]
    # Rows also end apart once drafts are accepted: a row far behind is cheaper in a group of its own.
    assert split_slots([0, 0, 0], end=[100, 100, 10], group_cost=50) == [(0, 2, 0), (2, 3, 0)]


def _without(monkeypatch, *features: str) -> None:
    """Make the engine's compat checks report `features` missing, with no warning given yet."""
    import dataclasses

    from selfdistill.engine import compat

    monkeypatch.setattr(compat, "_caps", dataclasses.replace(compat.capabilities(), **dict.fromkeys(features, False)))
    monkeypatch.setattr(compat, "_warned", set())


def _fallback_warnings(record) -> list[str]:
    """The features named by the engine's fallback warnings, one entry per warning."""
    return sorted(str(w.message).split(": ")[1].split()[0] for w in record
                  if str(w.message).startswith("selfdistill engine:"))


@pytest.mark.parametrize("missing", [("attention_registry",), ("attention_switch",), ("slot_cache",),
                                     ("attention_registry", "attention_switch", "slot_cache", "onednn_linear")])
def test_engine_falls_back_to_plain_transformers_when_private_apis_are_missing(missing, monkeypatch):
    """Without the private transformers APIs the engine takes the plain path: same greedy ids, one warning each."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import make_model, make_tokenizer

    model, tok = lively(make_model(layers=3, seed=3)), make_tokenizer()
    prompts, stops = _random_prompts(7, seed=4), (17, 40, 99)
    params = GenParams(max_new_tokens=9, batch_size=3, stop_ids=stops, refill=1)
    full = {r.index: r.tokens for r in generate_hf(model, tok, length_sorted(prompts, 4), params)}
    _without(monkeypatch, *missing)
    with pytest.warns(RuntimeWarning) as record, _watch_forwards(model) as seen:
        runs = [{r.index: r.tokens for r in generate_hf(model, tok, length_sorted(prompts, 4), params)}
                for _ in range(2)]
    assert runs[0] == runs[1] == full
    for i, ids in prompts:
        assert full[i] == [t for t in _generate_one(model, ids, 9, stops) if t not in stops], i
    assert max(len(set(t)) for t in full.values()) > 3  # a continuation that depends on the KV
    decode = [f for f in seen if f["keep"] == 1 and f["shape"][1] == 1 and f["shape"][0] == 3]
    assert decode and not any(f["keep"] == 0 for f in seen)  # [slots, 1] batch steps, no packed step
    assert all(f["cache"] == ("DynamicCache" if "slot_cache" in missing else "Cache") for f in decode)
    # one warning per missing feature the run needed, over both runs (fp32 never packs: no oneDNN warning)
    assert _fallback_warnings(record) == sorted(set(missing) - {"onednn_linear"})
    assert model.config._attn_implementation == "sdpa"


def test_packed_linears_fall_back_to_plain_linears_with_one_warning(monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import make_model, make_tokenizer

    from selfdistill.engine import packed_linears

    model, tok = make_model(layers=2, seed=4).to(torch.bfloat16), make_tokenizer()
    prompts = _random_prompts(4, seed=5)
    params = GenParams(max_new_tokens=6, batch_size=2, stop_ids=(17,), packed_linears=False)
    plain = [(r.index, r.tokens) for r in generate_hf(model, tok, prompts, params)]
    _without(monkeypatch, "onednn_linear")
    with pytest.warns(RuntimeWarning) as record:
        with packed_linears(model) as n:
            assert n == 0 and not any("forward" in vars(m) for m in model.modules())
        fallback = [(r.index, r.tokens) for r in generate_hf(model, tok, prompts, replace(params, packed_linears=True))]
    assert fallback == plain and _fallback_warnings(record) == ["onednn_linear"]


def test_a_packed_step_refuses_to_run_when_the_model_ignores_the_slot_attention(monkeypatch):
    """If transformers stopped reading the attention switch, the step stops instead of emitting wrong tokens
    (one slot: the model's own sdpa would run on the whole buffer without complaint)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from contextlib import nullcontext

    from tiny import make_model, make_tokenizer

    from selfdistill.engine import compat

    model, tok = make_model(layers=2, seed=3), make_tokenizer()
    monkeypatch.setattr(compat, "switched_attention", lambda config, name: nullcontext())
    with pytest.raises(RuntimeError, match="slot attention"):
        list(generate_hf(model, tok, _random_prompts(3), GenParams(max_new_tokens=4, batch_size=1, stop_ids=(17,))))


def test_rows_in_input_order_with_contract_fields(tiny_run, gsm8k_train):
    rows = _lines(tiny_run)
    assert [r["id"] for r in rows] == [f"gsm8k-{i}" for i in range(6)]
    first = json.loads(gsm8k_train.read_text().splitlines()[0])
    assert rows[0]["messages"] == [{"role": "user", "content": first["question"]}]
    assert rows[0]["original"] == first["answer"]
    for r in rows:
        assert r["rewrite"].startswith(MATH_PREFILL.strip())
        assert r["response"] == (r["rewrite"] if r["used"] == "rewrite" else r["original"])
        assert r["generated_tokens"] == 6 and r["finish"] == "length" and r["prompt_tokens"] > 100
        assert r["used"] == "original" and r["reason"].startswith("truncated")  # random model never stops
        assert set(r["verdicts"]) == {"blacklist", "math", "complete"}
    stats = json.loads((tiny_run.parent / "stats.json").read_text())
    assert stats["rows"] == 6 and stats["rewrites_rejected"] == 6 and stats["rejected_by_reason"] == {"truncated": 6}
    assert stats["generated_tokens"] == 36 and stats["tokens_per_s"] > 0


def test_keep_rewrite_when_verifiers_pass(tiny_model_dir, gsm8k_train, tmp_path):
    out = tmp_path / "d.jsonl"
    stats = distill(_cfg(tiny_model_dir, gsm8k_train, out, limit=2, verifiers=["none"], keep_truncated=True,
                         draft_tokens=0))  # the engine without drafts
    rows = _lines(out)
    assert stats["rewrites_kept"] == 2 and all(r["used"] == "rewrite" and r["response"] == r["rewrite"] for r in rows)


def test_resume_after_crash_mid_file(tiny_run, tiny_model_dir, gsm8k_train, tmp_path):
    full = tiny_run.read_bytes()
    lines = full.splitlines(keepends=True)
    out = tmp_path / "d.jsonl"
    out.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # killed while writing row 3
    stats = distill(_cfg(tiny_model_dir, gsm8k_train, out))
    assert out.read_bytes() == full
    assert stats["resumed_after"] == 2 and stats["rows_this_run"] == 4 and stats["rows"] == 6
    again = distill(_cfg(tiny_model_dir, gsm8k_train, out))  # complete: nothing to do, nothing duplicated
    assert out.read_bytes() == full and again["rows_this_run"] == 0


def test_bad_inputs_leave_partial_output_intact(tiny_run, tiny_model_dir, gsm8k_train, tmp_path):
    out = tmp_path / "d.jsonl"
    partial = b"".join(tiny_run.read_bytes().splitlines(keepends=True)[:2]) + b'{"id": "gsm8k-2", "mess'
    out.write_bytes(partial)
    cases = [
        (dict(dataset=str(tmp_path / "missing.jsonl")), "dataset not found"),
        (dict(teacher=str(tmp_path / "no-model")), "model not found"),
        (dict(recipe="poetry"), "unknown recipe 'poetry'"),
        (dict(offset=3), "does not match input row"),
        (dict(rewrite_template="{instruction} only"), "must contain {reference}"),
        (dict(draft_tokens=-1), "draft_tokens must be >= 0"),
    ]
    for overrides, message in cases:
        with pytest.raises(UserError, match=message):
            distill(_cfg(tiny_model_dir, gsm8k_train, out, **overrides))
        assert out.read_bytes() == partial
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"question": "q1", "answer": "a #### 1"}\n{"question": "q2", "answer": ""}\n\xff\xfe\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: field 'answer' is empty"):
        distill(_cfg(tiny_model_dir, bad, out))
    assert out.read_bytes() == partial
    with pytest.raises(UserError, match="not installed"):
        distill(_cfg(tiny_model_dir, gsm8k_train, tmp_path / "v.jsonl", backend="vllm"))


def test_cli_and_yaml(tiny_model_dir, gsm8k_train, tmp_path):
    yaml_file = tmp_path / "distill.yaml"
    yaml_file.write_text(f"teacher: {tiny_model_dir}\ndataset: {gsm8k_train}\nrecipe: gsm8k\nlimit: 2\n"
                         f"max_new_tokens: 3\ndtype: float32\nout: {tmp_path / 'y.jsonl'}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, "-m", "selfdistill", "distill", str(yaml_file), "--batch-size", "2"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert len(_lines(tmp_path / "y.jsonl")) == 2 and (tmp_path / "stats.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "selfdistill", "distill", str(yaml_file), "--verifiers", "exact"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "unknown verifier 'exact'" in bad.stderr and "Traceback" not in bad.stderr


def test_two_process_shards_merge_in_input_order(tiny_run, tiny_model_dir, gsm8k_train, tmp_path):
    out = tmp_path / "dp.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "selfdistill", "distill", "--teacher", str(tiny_model_dir), "--dataset", str(gsm8k_train),
           "--recipe", "gsm8k", "--limit", "6", "--batch-size", "3", "--max-new-tokens", "6",
           "--dtype", "float32", "--device", "cpu", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert out.read_bytes() == tiny_run.read_bytes()  # same rows, same order as one process
    assert not list(tmp_path.glob("dp.jsonl.part*"))
    assert json.loads((tmp_path / "stats.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_real_parent_distills_four_gsm8k_rows(real_model_dir, gsm8k_train, tmp_path):
    out = tmp_path / "real.jsonl"
    stats = distill(from_dict(DistillConfig, dict(teacher="smollm2-135m-instruct", dataset=str(gsm8k_train),
                                                  recipe="gsm8k", limit=4, batch_size=4, max_new_tokens=160,
                                                  out=str(out))))
    rows = _lines(out)
    assert [r["id"] for r in rows] == [f"gsm8k-{i}" for i in range(4)] and stats["rows"] == 4
    assert all(r["rewrite"].startswith("Great! Let's think step by step.") for r in rows)
    from selfdistill.distill.verify import final_answer, same_answer

    for r, ref in zip(rows, (json.loads(x)["answer"] for x in gsm8k_train.read_text().splitlines()[:4])):
        assert set(r["verdicts"]) >= {"blacklist", "math"}
        if r["used"] == "rewrite":  # a kept rewrite really reaches the reference's answer
            assert same_answer(final_answer(r["rewrite"]), ref.split("####")[-1].strip())
    assert stats["rewrites_kept"] + stats["rewrites_rejected"] == 4 and stats["generated_tokens"] > 20


class _FakeVLLM:
    """Stands in for the `vllm` module: records how the engine is built (vLLM itself needs CUDA)."""

    def __init__(self, replica: int = 0, replicas: int = 1) -> None:
        self.built: dict = {}
        self.layout = (replica, replicas)

    def LLM(self, **kwargs):  # noqa: N802 - vLLM's name
        from types import SimpleNamespace

        self.built = kwargs
        parallel = SimpleNamespace(data_parallel_rank=self.layout[0], data_parallel_size=self.layout[1])
        return SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=SimpleNamespace(parallel_config=parallel)),
                               get_tokenizer=lambda: None)


@pytest.mark.parametrize(("env", "tp", "expected"), [
    ({}, 2, {"tensor_parallel_size": 2}),
    ({"WORLD_SIZE": "4", "RANK": "3"}, 2, {"tensor_parallel_size": 2, "data_parallel_size": 2,
                                           "distributed_executor_backend": "external_launcher", "seed": 7}),
])
def test_vllm_engine_gets_tensor_parallel_and_the_external_launcher_under_a_launch(monkeypatch, env, tp, expected):
    from selfdistill.distill.backends import open_vllm, vllm_layout

    world = int(env.get("WORLD_SIZE", 1))
    fake = _FakeVLLM(*vllm_layout(int(env.get("RANK", 0)), world, tp)[:2]) if world > 1 else _FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("selfdistill.models.resolve_model", lambda name: name)
    open_vllm("some/model", "bfloat16", "cuda:3", tensor_parallel_size=tp, seed=7)
    assert {k: v for k, v in fake.built.items() if k not in ("model", "dtype", "enforce_eager")} == expected


def test_vllm_replicas_are_consecutive_ranks_and_their_first_rank_writes():
    from selfdistill.distill.backends import vllm_layout

    assert [vllm_layout(r, 4, 2) for r in range(4)] == [(0, 2, True), (0, 2, False), (1, 2, True), (1, 2, False)]
    assert vllm_layout(2, 4, 1) == (2, 4, True)
    with pytest.raises(UserError, match="must divide"):
        vllm_layout(0, 4, 3)
    with pytest.raises(UserError, match="only with backend vllm"):
        from_dict(DistillConfig, {"teacher": "t", "dataset": "d", "tensor_parallel_size": 2})


# --- best-of-k -----------------------------------------------------------------------------------------------


def test_attempts_share_one_prefill_and_sample_as_if_alone():
    """Copies of a prompt prefill once; each (prompt, key) draws the same tokens as when run alone (fp32)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import make_model, make_tokenizer

    from selfdistill.distill.sampled import SeededEngine, attempt_key, generate_seeded

    model, tok = make_model(layers=2, seed=1), make_tokenizer()
    params = GenParams(max_new_tokens=10, batch_size=9, stop_ids=(17,), temperature=0.95, top_p=0.7)
    rows = _random_prompts(3, seed=4)
    items = [(3 * r + n, ids) for r, ids in rows for n in range(3)]  # 3 attempts of each of 3 prompts
    keys = {k: attempt_key(0, f"row{k // 3}", k % 3 + 2) for k, _ in items}
    counters: dict = {}
    together = {r.index: r.tokens for r in generate_seeded(model, tok, items, params, keys, counters)}
    assert counters["prefilled_tokens"] == sum(len(ids) for _, ids in rows)  # one prefill per prompt
    for k, ids in items:
        alone = list(SeededEngine(model, GenParams(**{**params.__dict__, "batch_size": 1}), 2,
                                  {k: keys[k]}).run([(k, ids)]))
        assert alone[0].tokens == together[k], k
    assert len({tuple(together[k]) for k in range(3)}) > 1  # the copies really sample apart
    fewer_slots = GenParams(**{**params.__dict__, "batch_size": 4})  # refills split some copies over fills
    assert {r.index: r.tokens for r in generate_seeded(model, tok, items, fewer_slots, keys)} == together


def _parity(text, example, options):
    """A deterministic verifier that passes about a third of random texts."""
    return None if sum(text.encode()) % 3 == 0 else "parity: no"


@pytest.fixture
def parity_verifier(monkeypatch):
    from selfdistill.distill.verify import VERIFIERS

    monkeypatch.setitem(VERIFIERS, "parity", _parity)


def _best_of_k_cfg(tiny_model_dir, gsm8k_train, out, **kw):
    return _cfg(tiny_model_dir, gsm8k_train, out, limit=10, batch_size=4, max_new_tokens=5, samples=4,
                verifiers=["parity"], keep_truncated=True, **kw)


def test_best_of_k_keeps_the_first_verified_attempt(parity_verifier, tiny_model_dir, gsm8k_train, tmp_path):
    from selfdistill.distill.attempts import attempt_waves

    assert attempt_waves(8) == [[1], [2], [3, 4], [5, 6, 7, 8]] and attempt_waves(3) == [[1], [2], [3]]
    greedy = distill(_cfg(tiny_model_dir, gsm8k_train, tmp_path / "g.jsonl", limit=10, batch_size=4,
                          max_new_tokens=5, verifiers=["parity"], keep_truncated=True))
    stats = distill(_best_of_k_cfg(tiny_model_dir, gsm8k_train, tmp_path / "k" / "d.jsonl"))
    rows, first = _lines(tmp_path / "k" / "d.jsonl"), _lines(tmp_path / "g.jsonl")
    assert [r["id"] for r in rows] == [f"gsm8k-{i}" for i in range(10)]
    for row, g in zip(rows, first):
        reasons = row["attempt_reasons"]
        kept = next((j + 1 for j, why in enumerate(reasons) if why is None), None)
        # no wave after the kept attempt's wave ([1], [2], [3, 4]); its wave-mates still cost tokens
        assert row["attempt"] == kept and row["attempts"] == {1: 1, 2: 2, 3: 4, 4: 4, None: 4}[kept]
        assert row["used"] == ("rewrite" if kept else "original")
        assert (row["rewrite"] == g["rewrite"]) == (kept in (1, None))  # attempt 1 is the greedy rewrite
        if kept:
            assert _parity(row["rewrite"], None, None) is None
        assert row["generated_tokens"] == sum(row["attempt_tokens"])
    after = stats["kept_after_attempts"]
    assert after[0] == greedy["rewrites_kept"] and after[-1] == stats["rewrites_kept"] > after[0]
    assert after == sorted(after) and len(after) == 4
    assert sum(stats["tokens_by_attempt"]) == stats["generated_tokens"] == sum(r["generated_tokens"] for r in rows)
    assert stats["tokens_per_kept_row"] == round(stats["generated_tokens"] / stats["rewrites_kept"], 1)


def test_best_of_k_resumes_after_a_crash_between_attempts(parity_verifier, tiny_model_dir, gsm8k_train, tmp_path,
                                                         monkeypatch):
    from selfdistill.distill import attempts

    whole = tmp_path / "whole.jsonl"
    distill(_best_of_k_cfg(tiny_model_dir, gsm8k_train, whole, sample_block=6))
    out, waves = tmp_path / "crash" / "d.jsonl", []
    real = attempts._run_wave

    def crash_in_block_two(rows, wave, *args):
        waves.append((tuple(rows), tuple(wave)))
        if wave != [1] and min(rows) >= 6:  # the second block (rows 6..9), between its attempts
            raise KeyboardInterrupt
        return real(rows, wave, *args)
    monkeypatch.setattr(attempts, "_run_wave", crash_in_block_two)
    cfg = _best_of_k_cfg(tiny_model_dir, gsm8k_train, out, sample_block=6)
    with pytest.raises(KeyboardInterrupt):
        distill(cfg)
    written = _lines(out)
    assert 6 <= len(written) < 10 and written == _lines(whole)[:len(written)]
    monkeypatch.setattr(attempts, "_run_wave", real)
    stats = distill(cfg)
    assert out.read_bytes() == whole.read_bytes()  # nothing repeated, nothing lost, same samples
    assert stats["resumed_after"] == len(written) and stats["rows"] == 10


def test_answer_mode_never_shows_the_reference(tiny_model_dir, gsm8k_train, tmp_path, monkeypatch):
    from selfdistill.distill import BACKENDS

    seen = []
    real = BACKENDS["hf"]

    def recording(*args):
        tok, run = real(*args)

        def spy(prompts, params, **kw):
            prompts = list(prompts)
            seen.extend(tok.decode(ids) for _, ids in prompts)
            return run(prompts, params, **kw)
        return tok, spy
    monkeypatch.setitem(BACKENDS, "hf", recording)
    distill(_cfg(tiny_model_dir, gsm8k_train, tmp_path / "a.jsonl", limit=3, mode="answer", samples=2))
    rows = _lines(tmp_path / "a.jsonl")
    sources = [json.loads(x) for x in gsm8k_train.read_text().splitlines()[:3]]
    assert len(seen) >= 3 and json.loads((tmp_path / "stats.json").read_text())["mode"] == "answer"
    for src in sources:
        reference = src["answer"]
        assert not any(reference in text or reference.split("####")[0].strip()[:40] in text for text in seen)
        assert any(src["question"] in text for text in seen)
    assert all(r["original"] == s["answer"] for r, s in zip(rows, sources))
    assert all(r["verdicts"].get("math") is not None for r in rows)  # the recipe's verifier still checks


def test_bad_best_of_k_input_is_rejected_before_writing(tiny_run, tiny_model_dir, gsm8k_train, tmp_path):
    out = tmp_path / "d.jsonl"
    partial = b"".join(tiny_run.read_bytes().splitlines(keepends=True)[:2])
    out.write_bytes(partial)
    for overrides, message in [(dict(samples=0), "samples must be >= 1"), (dict(mode="chat"), "unknown mode 'chat'")]:
        with pytest.raises(UserError, match=message):
            distill(_cfg(tiny_model_dir, gsm8k_train, out, **overrides))
        assert out.read_bytes() == partial


@pytest.mark.slow
def test_real_parent_best_of_k_on_gsm8k_rows(real_model_dir, gsm8k_train, tmp_path):
    """SmolLM2-135M, 6 GSM8K rows, k = 4: every kept attempt reaches the reference's answer; more are kept."""
    from selfdistill.distill.verify import final_answer, same_answer

    out = tmp_path / "real.jsonl"
    stats = distill(from_dict(DistillConfig, dict(teacher="smollm2-135m-instruct", dataset=str(gsm8k_train),
                                                  recipe="gsm8k", offset=200, limit=6, batch_size=8, samples=4,
                                                  max_new_tokens=200, out=str(out))))
    rows, refs = _lines(out), [json.loads(x)["answer"] for x in gsm8k_train.read_text().splitlines()[200:206]]
    assert [r["id"] for r in rows] == [f"gsm8k-{i}" for i in range(200, 206)]
    for row, ref in zip(rows, refs):
        if row["used"] == "rewrite":
            assert same_answer(final_answer(row["rewrite"]), ref.split("####")[-1].strip())
            assert row["attempt_reasons"][row["attempt"] - 1] is None
            assert all(why is not None for why in row["attempt_reasons"][:row["attempt"] - 1])
        assert row["attempts"] in (1, 2, 4) and len(row["attempt_tokens"]) == row["attempts"]
    after = stats["kept_after_attempts"]
    assert after == sorted(after) and after[-1] == stats["rewrites_kept"]
    assert stats["prefilled_tokens"] > 0 and sum(stats["tokens_by_attempt"]) == stats["generated_tokens"]


def _md5s(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process: exit 2, exactly one `selfdistill: error:` line, no traceback."""
    from selfdistill.cli import main

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("selfdistill: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_gsm8k_answer_without_its_final_answer_line_is_named_or_skipped_and_counted(tiny_model_dir, tmp_path,
                                                                                     capsys):
    """`"answer": 42` has no '#### n' line: the verifier would take "42" for the reference's final answer."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}, {"question": "What is 6 * 7?", "answer": 42},
            {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}]
    dataset = data / "gsm.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    before = _md5s(data)
    out = tmp_path / "run" / "distilled.jsonl"
    argv = ["distill", "--teacher", str(tiny_model_dir), "--dataset", str(dataset), "--recipe", "gsm8k",
            "--max-new-tokens", "4", "--batch-size", "2", "--dtype", "float32", "--device", "cpu", "--out", str(out)]
    message = _cli_error(capsys, argv)
    assert f"{dataset}:2: field 'answer' has no '#### <number>' final-answer line" in message
    assert _md5s(data) == before and not out.exists()
    from selfdistill.cli import main

    assert main([*argv, "--on-bad-row", "skip"]) == 0
    stats = json.loads((out.parent / "stats.json").read_text())
    assert [r["id"] for r in _lines(out)] == ["gsm8k-0", "gsm8k-2"]
    assert stats["bad_rows_skipped"] == 1 and stats["rows"] == 2 and _md5s(data) == before


def test_a_math_rewrite_ends_at_its_final_answer_line(tiny_model_dir, gsm8k_train, tmp_path, monkeypatch):
    """A parent that goes on after '#### n' (a second derivation, a new question): the kept rewrite is cut at that
    line, the verifier judges the cut text (the first '####', not a later one), and stats.json counts the cuts."""
    from transformers import AutoTokenizer

    from selfdistill.distill import BACKENDS
    from selfdistill.engine import Result

    sources = [json.loads(x) for x in gsm8k_train.read_text().splitlines()[:3]]
    finals = [s["answer"].split("####")[-1].strip() for s in sources]
    answers = {  # by the row's question: what the fake parent writes after the prefill
        sources[0]["question"]: f"So it is {finals[0]}.\n#### {finals[0]}\nCheck: a second, wrong derivation gives 3.",
        sources[1]["question"]: f"#### {finals[1]}\n\nQuestion: what is 2 + 2?\nAnswer: 4\n#### 4",
        sources[2]["question"]: f"Done.\n#### {finals[2]}\n",
    }
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def fake_parent(*args):
        def generate(prompts, params, keys=None, counters=None):
            for index, ids in prompts:
                question = next(q for q in answers if q in tok.decode(ids))
                yield Result(index, tok(answers[question], add_special_tokens=False)["input_ids"], "stop")
        return tok, generate
    monkeypatch.setitem(BACKENDS, "hf", fake_parent)
    out = tmp_path / "d.jsonl"
    stats = distill(_cfg(tiny_model_dir, gsm8k_train, out, limit=3, max_new_tokens=512))
    rows = _lines(out)
    assert [r["used"] for r in rows] == ["rewrite"] * 3, [r["reason"] for r in rows]
    assert rows[0]["response"] == f"{MATH_PREFILL}So it is {finals[0]}.\n#### {finals[0]}"
    assert rows[1]["response"] == f"{MATH_PREFILL}#### {finals[1]}"
    assert rows[2]["response"] == f"{MATH_PREFILL}Done.\n#### {finals[2]}"
    assert [r["attempt_cut"] for r in rows] == [[True], [True], [False]]
    assert stats["cut_at_final_answer"] == {"attempts": 2, "kept": 2}
    assert json.loads((tmp_path / "stats.json").read_text())["cut_at_final_answer"] == {"attempts": 2, "kept": 2}
