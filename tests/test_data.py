"""Dataset recipes on the real offline copies, and errors that name the file and line."""

from __future__ import annotations

import json

import pytest

from selfdistill.data import load_examples, render_text
from selfdistill.errors import UserError


def test_gsm8k_recipe_extracts_the_final_answer(gsm8k_train):
    examples = load_examples(gsm8k_train, "gsm8k", limit=3)
    assert len(examples) == 3 and examples[0].kind == "math"
    assert examples[0].final_answer == "72"  # Natalia's clips, the first training row
    assert examples[0].messages == [{"role": "user", "content": examples[0].instruction}]


def test_recipes_are_detected_and_context_joins_the_instruction(data_dir):
    dolly = load_examples(data_dir / "sdft" / "dolly" / "dolly_train.json", limit=50)
    with_context = [e for e in dolly if "\n\n" in e.instruction]
    assert with_context and all(e.kind == "general" for e in dolly)
    arc = load_examples(data_dir / "arc" / "ARC-Easy" / "ARC-Easy-Dev.jsonl", limit=2)
    assert "A. " in arc[0].instruction and arc[0].reference[0] in "ABCD1234"


def test_generic_mapping_and_offset(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("q,a\nfirst?,one\nsecond?,two\nthird?,three\n")
    examples = load_examples(path, "generic", fields={"prompt": "q", "response": "a"}, offset=1, limit=1)
    assert [(e.instruction, e.reference) for e in examples] == [("second?", "two")]


def test_text_rows_render_verbatim(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "plain calibration text"}) + "\n")
    (example,) = load_examples(path)
    assert render_text(example, tokenizer=None) == "plain calibration text"


@pytest.mark.parametrize(("content", "message"), [
    (b'{"question": "q?"}\n', "t.jsonl:1: missing field 'answer'"),
    (b'{"question": "q", "answer": "a #### 1"}\n{"question": "q2", "answer": "  "}\n', "t.jsonl:2: field 'answer' is empty"),
    (b'{"question": "q", "answer": "a #### 1"}\n\xff\n', "t.jsonl:2: line is not valid UTF-8"),
    (b'{"question": "q", "answer": "a #### 1"}\n{"question": "q2", "answer": 42}\n',
     "t.jsonl:2: field 'answer' has no '#### <number>' final-answer line"),
])
def test_bad_rows_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "t.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_examples(path, "gsm8k")


def test_bad_rows_can_be_skipped(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "a #### 1"}\n{"question": "x"}\n{"question": "z", "answer": "b #### 2"}\n'
                     b'{"question": "y", "answer": "#### two"}\n')
    skipped: list[str] = []
    examples = load_examples(path, "gsm8k", on_bad_row="skip", skipped=skipped)
    assert [e.reference for e in examples] == ["a #### 1", "b #### 2"] and [e.final_answer for e in examples] == ["1", "2"]
    assert [m.split(": ", 1)[0] for m in skipped] == [f"{path}:2", f"{path}:4"]


def test_unknown_recipe_and_missing_dataset(tmp_path):
    with pytest.raises(UserError, match="unknown recipe 'nope'"):
        load_examples(tmp_path / "x.jsonl", "nope")
    with pytest.raises(UserError, match="dataset not found"):
        load_examples(tmp_path / "missing.jsonl", "gsm8k")
