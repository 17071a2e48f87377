"""`backend: shared` (evaluate/shared.py): HFLM's log-likelihoods from one pass per context."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from selfdistill.cli import main
from selfdistill.evaluate import EvalConfig, evaluate

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_model, make_tokenizer, save_tiny  # noqa: E402

LOCAL_TASKS = ["arc_easy", "arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "winogrande", "gsm8k"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFDISTILL_CACHE", str(tmp_path / "cache"))


def backends(model, tok, max_length=64, batch_size=4, **extra):
    from lm_eval.models.huggingface import HFLM

    from selfdistill.evaluate.shared import SharedContextLM

    kw = dict(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_length, device="cpu", **extra)
    return HFLM(**kw), SharedContextLM(**kw)


def instances(pairs):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]


def words(rnd, n):
    return " ".join(rnd.choice(["cat", "sat", "on", "the", "mat", "dog", "ran", "far", "why", "0"]) for _ in range(n))


def fed_tokens(model):
    """A counter of the token positions the decoder's embedding sees (how much work a backend did)."""
    seen = [0]
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.__setitem__(0, seen[0] + args[0].numel()))
    return seen


def shared_contexts(rnd):  # 3 contexts x 4 choices of different lengths
    contexts = [f"Q: {words(rnd, 8)}\nA:" for _ in range(3)]
    return [(ctx, " " + words(rnd, k)) for ctx in contexts for k in (1, 2, 5, 9)]


def no_shared_contexts(rnd):
    return [(f"{words(rnd, 6)} {i}", " " + words(rnd, 1 + i % 4)) for i in range(7)]


def long_contexts(rnd):  # longer than max_length (64 byte tokens): HFLM keeps the right end, per continuation
    ctx = words(rnd, 40)
    return [(ctx, " " + words(rnd, k)) for k in (1, 3, 6)] + [(words(rnd, 30), " " + words(rnd, 2))]


def one_token_answers(rnd):  # MMLU-like: few-shot contexts, answers of one token (no row needs a mask)
    contexts = [f"{words(rnd, 12)}\nAnswer:" for _ in range(3)]
    return [(ctx, letter) for ctx in contexts for letter in "ABCD"]


@pytest.mark.parametrize("make_pairs", [shared_contexts, no_shared_contexts, long_contexts, one_token_answers])
def test_log_likelihoods_equal_hflm_in_fp32(make_pairs):
    model, tok = make_model(), make_tokenizer()
    hf, shared = backends(model, tok)
    pairs = make_pairs(random.Random(0))
    if make_pairs is long_contexts:
        assert all(len(tok(c + k)["input_ids"]) > 65 for c, k in pairs)
    seen = fed_tokens(model)
    want = hf.loglikelihood(instances(pairs), disable_tqdm=True)
    hf_tokens, seen[0] = seen[0], 0
    got = shared.loglikelihood(instances(pairs), disable_tqdm=True)
    assert len(got) == len(want) == len(pairs)
    for (ll_a, greedy_a), (ll_b, greedy_b) in zip(want, got, strict=True):
        assert abs(ll_a - ll_b) < 1e-4 and greedy_a == greedy_b
    if make_pairs is shared_contexts:
        assert seen[0] < 0.7 * hf_tokens  # each context was run once, not once per choice (padding counted)


def test_a_context_longer_than_a_row_still_runs_once_for_all_its_continuations(monkeypatch):
    from selfdistill.evaluate import shared as shared_module

    monkeypatch.setattr(shared_module, "ROW_TOKENS", 16)  # every context below is longer than a row
    model, tok = make_model(), make_tokenizer()
    hf, shared = backends(model, tok)
    pairs = one_token_answers(random.Random(4)) + shared_contexts(random.Random(4))
    want = hf.loglikelihood(instances(pairs), disable_tqdm=True)
    seen = fed_tokens(model)
    got = shared.loglikelihood(instances(pairs), disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(want, got, strict=True)) < 1e-4
    once = sum(len(tok(c)["input_ids"]) for c in {c for c, _ in pairs})
    fed = sum(len(tok(k)["input_ids"]) - 1 for _, k in pairs)
    # The decoder's positions, padding included: each context once (once per choice would be over 3x).
    assert seen[0] < 1.5 * (once + fed)


def test_greedy_flag_is_true_for_the_models_own_continuation():
    model, tok = make_model(), make_tokenizer()
    hf, shared = backends(model, tok)
    ctx = "the cat sat on"
    ids = tok(ctx, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:]
    cont = tok.decode(greedy)
    assert tok(ctx + cont)["input_ids"][ids.shape[1]:] == greedy.tolist()  # byte tokens round-trip
    pairs = [(ctx, cont), (ctx, cont[:-1] + ("x" if cont[-1] != "x" else "y"))]
    got = shared.loglikelihood(instances(pairs), disable_tqdm=True)
    want = hf.loglikelihood(instances(pairs), disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in want] == [True, False]


class FP32Head(torch.nn.Module):
    """An LM head that computes the logits in fp32 on a bf16 model (what a 16-bit eval wants for its sums)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(linear.weight.detach().float(), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float() @ self.weight.T


@pytest.mark.parametrize("fp32_head", [False, True])
def test_bf16_with_and_without_an_fp32_head_is_close_to_hflm(fp32_head):
    model = make_model().to(torch.bfloat16)
    if fp32_head:
        model.config.tie_word_embeddings = False
        model.lm_head = FP32Head(model.lm_head)
    hf, shared = backends(model, make_tokenizer())
    pairs = shared_contexts(random.Random(1))
    want = hf.loglikelihood(instances(pairs), disable_tqdm=True)
    got = shared.loglikelihood(instances(pairs), disable_tqdm=True)
    # bf16 rounds differently at other batch shapes; a wrong mask or position would be off by whole nats.
    assert max(abs(a[0] - b[0]) for a, b in zip(want, got, strict=True)) < (0.05 if fp32_head else 0.3)


def test_bf16_with_an_fp32_softmax_sums_closer_to_fp32_than_a_bf16_softmax():
    """The evaluate stage's softmax_dtype float32: both backends take the log-softmax and the sum in fp32,
    so a bf16 model's summed log-likelihoods lose the bf16 rounding steps of the sum."""
    pairs = shared_contexts(random.Random(2))
    exact = backends(make_model(), make_tokenizer())[0].loglikelihood(instances(pairs), disable_tqdm=True)
    errors = {}
    for softmax in ("bfloat16", "float32"):
        hf, shared = backends(make_model().to(torch.bfloat16), make_tokenizer(), softmax_dtype=softmax)
        want = hf.loglikelihood(instances(pairs), disable_tqdm=True)
        got = shared.loglikelihood(instances(pairs), disable_tqdm=True)
        errors[softmax] = max(abs(a[0] - e[0]) for a, e in zip(got, exact, strict=True))
        errors[softmax, "hf"] = max(abs(a[0] - b[0]) for a, b in zip(want, got, strict=True))
    assert errors["float32"] < errors["bfloat16"] / 10  # measured 0.005 against 0.40
    assert errors["float32", "hf"] < 1e-3  # and the two backends still agree


def test_evaluate_gives_identical_scores_and_samples_with_either_backend(tmp_path, tiny_model_dir, data_dir):
    base = dict(baseline=str(tiny_model_dir), preset="cpu", tasks=LOCAL_TASKS, limit=3, data_dir=str(data_dir),
                batch_size=4, dtype="float32", max_gen_toks=4, bootstrap_iters=10)
    runs = {}
    for backend in ("hf", "shared"):
        evaluate(EvalConfig(backend=backend, out=str(tmp_path / backend), **base))
        runs[backend] = (json.loads((tmp_path / backend / "scores.json").read_text()),
                         json.loads((tmp_path / backend / "results" / "llama6.json").read_text()))
    (hf_scores, hf_res), (sh_scores, sh_res) = runs["hf"], runs["shared"]
    assert hf_scores["settings"]["backend"] == "hf" and sh_scores["settings"]["backend"] == "shared"
    assert hf_scores["models"] == sh_scores["models"]
    assert set(sh_res["samples"]) == set(hf_res["samples"])  # MMLU logs its drawn subjects' tasks
    assert all(any(k.startswith(f"sd_{t}") for k in sh_res["samples"]) for t in LOCAL_TASKS)
    for task, samples in hf_res["samples"].items():
        for a, b in zip(samples, sh_res["samples"][task], strict=True):
            assert a["doc_id"] == b["doc_id"] and a["target"] == b["target"]
            if task == "sd_gsm8k":
                assert a["resps"] == b["resps"]  # generation is HFLM's in both
                continue
            for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a["filtered_resps"], b["filtered_resps"], strict=True):
                assert abs(float(ll_a) - float(ll_b)) < 1e-4 and greedy_a == greedy_b
    # one cache entry per task and backend: the backends never share one
    assert len(list((tmp_path / "cache" / "eval").glob("*.json"))) == 2 * len(LOCAL_TASKS)


def test_auto_is_shared_for_local_presets_and_hf_for_the_hub_suite(tiny_model_dir):
    from selfdistill.evaluate.runner import resolve_backend

    paths = {"m": str(tiny_model_dir)}
    assert resolve_backend("auto", "cpu", paths) == resolve_backend("auto", "openllm-v1-local", paths) == "shared"
    assert resolve_backend("auto", "openllm-v1", paths) == "hf" and resolve_backend("hf", "cpu", paths) == "hf"


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "gemma2", arch="gemma2", layers=2)


def test_auto_falls_back_to_hf_for_the_whole_run_when_one_model_cannot_be_served(tiny_model_dir, tiny_gemma2):
    from selfdistill.evaluate.runner import resolve_backend

    assert resolve_backend("auto", "cpu", {"a": str(tiny_model_dir), "b": str(tiny_gemma2)}) == "hf"


@pytest.mark.parametrize(("backend", "message"), [
    ("fast", "'fast' is not one of auto, hf, shared, vllm"),
    ("shared", "--backend shared cannot serve --model GEMMA: architecture 'gemma2' is not one it serves"),
])
def test_bad_backend_is_one_line_before_any_model_loads(tmp_path, tiny_gemma2, data_dir, capsys, monkeypatch,
                                                        backend, message):
    import selfdistill.models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(selfdistill.models, "load_model", no_loading)
    code = main(["evaluate", "--model", str(tiny_gemma2), "--backend", backend, "--tasks", "arc_easy",
                 "--limit", "2", "--data-dir", str(data_dir), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("selfdistill: error: ") and "Traceback" not in "\n".join(err)
    assert message.replace("GEMMA", str(tiny_gemma2)) in err[-1]


def test_python_callers_get_the_same_error_for_an_unknown_backend():
    from selfdistill.errors import UserError

    with pytest.raises(UserError, match="unknown backend 'fast'"):
        EvalConfig(model=["m"], backend="fast")  # type: ignore[arg-type]


@pytest.mark.slow
def test_real_model_gives_hflm_log_likelihoods_on_every_local_task(tmp_path, real_model_dir, data_dir):
    base = dict(model=["smollm2-135m-instruct"], preset="cpu", tasks=LOCAL_TASKS, limit=3, data_dir=str(data_dir),
                batch_size=8, dtype="float32", max_gen_toks=8)
    samples = {}
    for backend in ("hf", "shared"):
        evaluate(EvalConfig(backend=backend, out=str(tmp_path / backend), **base))
        res = json.loads((tmp_path / backend / "results" / "smollm2-135m-instruct.json").read_text())
        samples[backend] = res["samples"]
    for task, rows in samples["hf"].items():
        for a, b in zip(rows, samples["shared"][task], strict=True):
            if task == "sd_gsm8k":
                assert a["resps"] == b["resps"]
                continue
            lls_a, lls_b = ([float(r[0]) for r in s["filtered_resps"]] for s in (a, b))
            assert max(abs(x - y) for x, y in zip(lls_a, lls_b, strict=True)) < 1e-4, (task, a["doc_id"])


def test_backend_is_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    from selfdistill.evaluate.shared import SharedContextLM

    assert get_model("selfdistill-shared") is SharedContextLM
