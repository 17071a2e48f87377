"""`selfdistill report`: a run without an evaluated child is refused (naming what is missing) unless
`--partial`; perplexity retention is its own table and its own bars beside accuracy retention."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from selfdistill.cli import main
from selfdistill.evaluate import EvalConfig, evaluate

sys.path.insert(0, str(Path(__file__).parent))
from lm_data import write_small_lm_data  # noqa: E402
from tiny import save_tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFDISTILL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, data_dir) -> Path:
    root = tmp_path_factory.mktemp("lmdata")
    write_small_lm_data(root, data_dir, articles=2, lines_each=2)
    return root


def _evaluate(out: Path, models: list[Path], baseline: Path | None, data: Path) -> None:
    evaluate(EvalConfig(model=[str(m) for m in models], baseline=str(baseline) if baseline else "", preset="cpu",
                        tasks=["lambada", "wikitext"], limit=4, data_dir=str(data), batch_size=4, dtype="float32",
                        bootstrap_iters=200, out=str(out)))


def test_a_run_with_no_evaluated_child_names_what_is_missing_unless_partial(tmp_path, tiny_model_dir, small_data,
                                                                            capsys):
    run = tmp_path / "run"
    _evaluate(run / "parent-eval", [tiny_model_dir], None, small_data)
    (run / "pruned").mkdir()
    (run / "pruned" / ".stage_key").write_text("abc")  # prune started and was stopped
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("selfdistill: error: ") and "no child has been evaluated" in err
    assert "pruned (unfinished)" in err and "evaluate (not started)" in err and "finished: parent-eval" in err
    assert not (run / "report").exists()
    assert main(["report", str(run), "--partial"]) == 0
    md = (run / "report" / "report.md").read_text()
    assert "**Partial report**: incomplete stages: pruned (unfinished), evaluate (not started)" in md
    assert f"| {tiny_model_dir.name} |" in md  # what is finished: the parent's own scores


def test_perplexity_retention_is_shown_beside_accuracy_retention(tmp_path, tiny_model_dir, small_data):
    run = tmp_path / "run"
    child = save_tiny(tmp_path / "pruned", layers=4, seed=1)
    _evaluate(run / "evaluate", [child], tiny_model_dir, small_data)
    assert main(["report", str(run)]) == 0
    md = (run / "report" / "report.md").read_text()
    scores = json.loads((run / "evaluate" / "scores.json").read_text())
    section = md[md.index("## Language modelling"):]
    assert "accuracy retention above does not include it" in section
    row = next(line for line in section.splitlines() if line.startswith("| pruned |"))
    wiki = scores["models"][str(child)]["perplexity_retention"]["wikitext"]
    lo, hi = wiki["ci95"]
    assert f"{wiki['retention']:.1f}" in row and f"{lo:.1f} … {hi:.1f}" in row
    # the models table's accuracy retention is LAMBADA accuracy's alone, not mixed with any perplexity
    assert scores["tasks"] == ["lambada"]
    from selfdistill.report.plots import retention_series

    series = retention_series(scores, lambda n: Path(n).name)
    # (a random parent gets no LAMBADA word right, so there is no accuracy retention to draw here)
    assert [name for name, _ in series][-2:] == ["lambada perplexity retention", "wikitext perplexity retention"]
    assert series[-1][1] == [("pruned", pytest.approx(wiki["retention"]), pytest.approx(wiki["ci95"]))]
    assert (run / "report" / "retention.png").read_bytes()[:4] == b"\x89PNG"
