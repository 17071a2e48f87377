"""Verifiers on real GSM8K answers: what passes, what is rejected and why."""

from __future__ import annotations

import pytest

from selfdistill.data import Example, load_examples
from selfdistill.distill.verify import final_answer, same_answer, verify
from selfdistill.errors import UserError


@pytest.fixture(scope="module")
def gsm(gsm8k_train) -> list[Example]:
    return load_examples(gsm8k_train, "gsm8k", limit=20)


def _rows_with(gsm8k_train, needle: str) -> Example:
    examples = load_examples(gsm8k_train, "gsm8k")
    return next(e for e in examples if needle in e.reference.splitlines()[-1])


def test_reference_answers_verify_against_themselves(gsm):
    for ex in gsm:
        verdicts, reason = verify(ex.reference, ex, ["blacklist", "math"])
        assert reason is None and verdicts == {"blacklist": True, "math": True}, ex.id


def test_wrong_final_answer_is_rejected(gsm):
    ex = gsm[0]  # Natalia: 72
    rewrite = "Great! Let's think step by step. She sold 48 + 24 = 70 clips.\n#### 70"
    verdicts, reason = verify(rewrite, ex, ["blacklist", "math"])
    assert verdicts == {"blacklist": True, "math": False}
    assert reason.startswith("math/wrong_answer") and "70 != 72" in reason


@pytest.mark.parametrize("text", [
    "So in total 48 + 24 = 72 clips. The answer is 72.",
    "Natalia sold \\boxed{72} clips.",
    "She sold 72 clips altogether.",
    "#### 72.0",
])
def test_answer_formats(gsm, text):
    assert verify(text, gsm[0], ["math"]) == ({"math": True}, None)


def test_commas_decimals_and_negatives(gsm8k_train):
    big = _rows_with(gsm8k_train, ",")  # a reference like '#### 1,000,000'-style
    assert "," not in big.final_answer
    shown = big.reference.splitlines()[-1].split("####")[-1].strip()
    assert verify(f"The answer is {shown}.", big, ["math"])[1] is None
    neg = _rows_with(gsm8k_train, "#### -")
    assert verify(f"The answer is {neg.final_answer}", neg, ["math"])[1] is None
    assert verify(f"The answer is {neg.final_answer.lstrip('-')}", neg, ["math"])[1].startswith("math/wrong")
    assert same_answer("2.50", "2.5") and same_answer("$1,200", "1200") and not same_answer("2.49", "2.5")
    assert same_answer("\\frac{1}{2}", "0.5") and not same_answer("\\frac{1}{3}", "0.5")


def test_no_answer_and_empty(gsm):
    assert verify("I am not sure how to do this.", gsm[0], ["math"])[1].startswith("math/no_answer")
    verdicts, reason = verify("   ", gsm[0], ["blacklist", "math"])
    assert reason.startswith("empty") and not any(verdicts.values())
    assert final_answer("no digits here") is None


@pytest.mark.parametrize("text", [
    "Using the reference answer, 48/2 = 24 so 72.",
    "Your turn: 72",
    "Now it's your turn to check: 72",
    "Here is my response: 72",
])
def test_blacklist_rejects_prompt_leaks(gsm, text):
    verdicts, reason = verify(text, gsm[0], ["blacklist", "math"])
    assert verdicts["blacklist"] is False and reason.startswith("blacklist")
    assert verdicts["math"] is True  # every verifier in the chain still reports


def test_similarity_floor():
    ex = Example(id="x", messages=[{"role": "user", "content": "Name a color."}], reference="The sky is blue.")
    from selfdistill.distill.verify import VerifyOptions

    opts = VerifyOptions(similarity_floor=0.5)
    assert verify("The sky is blue today.", ex, ["similarity"], opts)[1] is None
    assert verify("Bananas are yellow fruit.", ex, ["similarity"], opts)[1].startswith("similarity")


def test_unknown_verifier_is_a_config_error():
    from selfdistill.config import from_dict
    from selfdistill.distill import DistillConfig

    with pytest.raises(UserError, match="unknown verifier 'exact'"):
        from_dict(DistillConfig, {"dataset": "x.jsonl", "verifiers": ["blacklist", "exact"]})


def test_latex_answers_are_compared_by_math_verify():
    from selfdistill.distill.verify import final_answer, same_answer

    assert same_answer(final_answer("so the result is \\boxed{\\frac{2}{4}}"), "\\frac{1}{2}")
    assert same_answer("\\frac{1}{2}", "0.5")
    assert not same_answer("\\sqrt{2}", "2")
