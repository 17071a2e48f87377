"""The language-modelling tasks (LAMBADA, WikiText-2): our local tasks give lm-eval's own `lambada_openai`
and `wikitext` scores on the same documents, with either backend; perplexity retention; bad files."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from selfdistill.cli import main
from selfdistill.evaluate import EvalConfig, evaluate

sys.path.insert(0, str(Path(__file__).parent))
from lm_data import LAMBADA_ROWS, write_small_lm_data  # noqa: E402
from tiny import save_tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, data_dir) -> tuple[Path, list[dict], list[dict]]:
    root = tmp_path_factory.mktemp("lmdata")
    lambada, pages = write_small_lm_data(root, data_dir)
    return root, lambada, pages


def _reference(tmp: Path, model_dir: Path, lambada: list[dict], pages: list[dict],
               samples: dict[str, list[int]] | None = None) -> dict:
    """lm-eval 0.4.13's own lambada_openai and wikitext task definitions, on the same documents as local
    JSON files, scored by plain HFLM in fp32."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    tmp.mkdir(parents=True, exist_ok=True)
    for name, docs, yaml_path in (("lambada", lambada, "lambada/lambada_openai.yaml"),
                                  ("wikitext", pages, "wikitext/wikitext.yaml")):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        (tmp / f"ref_{name}.yaml").write_text(
            f"include: {tasks_dir / yaml_path}\ntask: ref_{name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
            "training_split: null\nvalidation_split: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {tmp / f'{name}.jsonl'}\n", encoding="utf-8")
    lm = HFLM(pretrained=str(model_dir), dtype="float32", batch_size=4, device="cpu")
    tm = TaskManager(include_path=str(tmp), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["ref_lambada", "ref_wikitext"], task_manager=tm, samples=samples,
                                  bootstrap_iters=0, log_samples=True)
    return out["results"] | {"samples": out["samples"]}


def _ours(tmp: Path, model_dir: Path, data: Path, backend: str, limit: int | None = None) -> tuple[dict, dict]:
    out = tmp / f"ev-{backend}-{limit}"
    evaluate(EvalConfig(model=[str(model_dir)], preset="cpu", tasks=["lambada", "wikitext"], data_dir=str(data),
                        backend=backend, batch_size=4, dtype="float32", limit=limit, out=str(out)))
    scores = json.loads((out / "scores.json").read_text())
    full = json.loads(next((out / "results").glob("*.json")).read_text())
    return scores["models"][str(model_dir)], full


def _flat(resp: object) -> list[float]:
    """A logged response ([[ll, is_greedy]] or [ll]) as a flat list of numbers."""
    if isinstance(resp, list | tuple):
        return [x for r in resp for x in _flat(r)]
    return [float(resp)]


@pytest.mark.parametrize("backend", ["shared", "hf"])
def test_lambada_and_wikitext_equal_lm_evals_own_tasks(tmp_path, tiny_model_dir, small_data, backend):
    data, lambada, pages = small_data
    ref = _reference(tmp_path / "ref", tiny_model_dir, lambada, pages)
    m, full = _ours(tmp_path, tiny_model_dir, data, backend)
    assert m["tasks"]["lambada"]["n"] == LAMBADA_ROWS and m["perplexity"]["wikitext"]["n"] == len(pages)
    assert m["tasks"]["lambada"]["value"] == ref["ref_lambada"]["acc,none"]
    assert m["perplexity"]["lambada"]["value"] == pytest.approx(ref["ref_lambada"]["perplexity,none"], rel=1e-4)
    wiki = m["perplexity"]["wikitext"]
    for key, ours in (("word_perplexity", wiki["value"]), ("byte_perplexity", wiki["byte_perplexity"]),
                      ("bits_per_byte", wiki["bits_per_byte"])):
        assert ours == pytest.approx(ref["ref_wikitext"][f"{key},none"], rel=1e-4), key
    for task in ("lambada", "wikitext"):  # and document by document: the same log-likelihood (and greedy flag)
        ours = {d["doc_id"]: d["filtered_resps"] for d in full["samples"][f"sd_{task}"]}
        theirs = {d["doc_id"]: d["filtered_resps"] for d in ref["samples"][f"ref_{task}"]}
        assert ours.keys() == theirs.keys()
        for i, resp in theirs.items():
            assert _flat(ours[i]) == pytest.approx(_flat(resp), rel=1e-5), (task, i)
    assert "wikitext" not in m["tasks"]  # a perplexity is never an accuracy task
    assert m["average"] == m["tasks"]["lambada"]["value"]


def test_limit_draws_a_seeded_subset_scored_as_lm_eval_scores_it(tmp_path, tiny_model_dir, small_data):
    data, lambada, pages = small_data
    m, full = _ours(tmp_path, tiny_model_dir, data, "shared", limit=2)
    ids = {t: sorted(s["doc_id"] for s in full["samples"][f"sd_{t}"]) for t in ("lambada", "wikitext")}
    assert len(ids["lambada"]) == 2 and len(ids["wikitext"]) == 2 and m["perplexity"]["wikitext"]["n"] == 2
    ref = _reference(tmp_path / "ref", tiny_model_dir, lambada, pages,
                     samples={"ref_lambada": ids["lambada"], "ref_wikitext": ids["wikitext"]})
    assert m["perplexity"]["lambada"]["value"] == pytest.approx(ref["ref_lambada"]["perplexity,none"], rel=1e-4)
    assert m["perplexity"]["wikitext"]["value"] == pytest.approx(ref["ref_wikitext"]["word_perplexity,none"], rel=1e-4)


def test_perplexity_retention_is_parent_over_child_with_an_interval(tmp_path, tiny_model_dir, small_data):
    data, _, _ = small_data
    child = save_tiny(tmp_path / "child", layers=4, seed=1)
    out = tmp_path / "ev"
    evaluate(EvalConfig(model=[str(child)], baseline=str(tiny_model_dir), preset="cpu", tasks=["lambada", "wikitext"],
                        data_dir=str(data), batch_size=4, dtype="float32", bootstrap_iters=300, out=str(out)))
    scores = json.loads((out / "scores.json").read_text())
    assert scores["tasks"] == ["lambada"] and scores["perplexity_tasks"] == ["lambada", "wikitext"]
    parent, kid = scores["models"][str(tiny_model_dir)], scores["models"][str(child)]
    for t in ("lambada", "wikitext"):
        ret = kid["perplexity_retention"][t]
        expected = parent["perplexity"][t]["value"] / kid["perplexity"][t]["value"] * 100
        assert ret["retention"] == pytest.approx(expected, rel=1e-9)
        lo, hi = ret["ci95"]
        assert lo <= ret["retention"] <= hi and lo < hi and math.isfinite(lo)
        assert parent["perplexity_retention"][t]["retention"] == pytest.approx(100)
    # the accuracy retention stays the accuracy tasks' own (LAMBADA's last-word accuracy only here)
    assert kid["retention_ci95"] is not None and "perplexity" in (out / "scores.md").read_text()


def test_a_perplexity_only_evaluation_shows_its_perplexities_not_an_empty_accuracy_table(tmp_path, tiny_model_dir,
                                                                                       small_data):
    data, _, _ = small_data
    child = save_tiny(tmp_path / "child", layers=4, seed=1)
    out = tmp_path / "ev"
    result = evaluate(EvalConfig(model=[str(child)], baseline=str(tiny_model_dir), preset="cpu", tasks=["wikitext"],
                                 data_dir=str(data), batch_size=4, dtype="float32", bootstrap_iters=100, out=str(out)))
    text = (out / "scores.md").read_text()
    assert "| average |" not in text and "wikitext (word_perplexity)" in text
    assert "average" not in result and result["perplexity_retention"][str(child)]["wikitext"] > 0
    assert (out / "scores.png").stat().st_size > 1000


@pytest.mark.parametrize(("which", "content", "message"), [
    ("lambada", '{"text": "one two three"}\n{"txt": "no text field"}\n', "lambada_test.jsonl:2: field 'text'"),
    ("lambada", '{"text": "one two"}\nnot json\n', "lambada_test.jsonl:2: not a JSON object"),
    ("wikitext", "just some text\r\nwithout any heading\r\n", "wiki.test.raw: no article heading"),
    ("wikitext", None, "wiki.test.raw is missing"),
])
def test_a_missing_or_malformed_file_is_one_line_before_anything_is_written(tmp_path, tiny_model_dir, small_data,
                                                                            capsys, which, content, message):
    data = tmp_path / "data"
    shutil.copytree(small_data[0], data)
    target = data / ("lambada/lambada_test.jsonl" if which == "lambada" else "wikitext2/wiki.test.raw")
    if content is None:
        target.unlink()
    else:
        target.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    code = main(["evaluate", "--model", str(tiny_model_dir), "--tasks", "lambada", "wikitext", "--data-dir", str(data),
                 "--dtype", "float32", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("selfdistill: error: ") and message in err[-1], err
    assert not out.exists()


def test_rolling_windows_per_forward_are_bounded_and_scores_unchanged(tmp_path, tiny_model_dir, small_data,
                                                                      monkeypatch):
    """A real model's 8,192-token windows at --batch-size 16 would need tens of GB of logits; the stage scores
    at most ROLLING_TOKENS window tokens per forward, with the same perplexities."""
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    from selfdistill.evaluate import runner

    widths: list[tuple[int, int]] = []
    forward = LlamaForCausalLM.forward

    def recording(self, input_ids=None, **kwargs):
        widths.append(tuple(input_ids.shape))
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", recording)

    def wikitext(tokens: int) -> tuple[float, int]:
        monkeypatch.setattr(runner, "ROLLING_TOKENS", tokens)
        widths.clear()
        out = tmp_path / f"ev{tokens}"
        evaluate(EvalConfig(model=[str(tiny_model_dir)], preset="cpu", tasks=["wikitext"], data_dir=str(small_data[0]),
                            backend="hf", batch_size=4, dtype="float32", cache=False, out=str(out)))
        scores = json.loads((out / "scores.json").read_text())
        return scores["models"][str(tiny_model_dir)]["perplexity"]["wikitext"]["value"], max(b for b, _ in widths)

    wide, wide_batch = wikitext(8192)  # the tiny model's 512-token windows: --batch-size 4 of them per forward
    narrow, narrow_batch = wikitext(512)
    assert wide_batch == 4 and narrow_batch == 1
    assert narrow == pytest.approx(wide, rel=1e-5)
