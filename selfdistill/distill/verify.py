"""Verifiers that decide whether a parent's rewrite replaces the reference answer.

SDFT's rule (Yang et al., arXiv 2402.13669): reject rewrites that talk about the prompt ("reference
answer", "your response", ...), and for math keep only rewrites whose final answer equals the
reference's. The final answer is read as '#### n' (GSM8K), else the last \boxed{...}, else 'the answer
is n', else the last number; two plain numbers are compared numerically (GSM8K's case: 1,000 == 1000.0),
anything else (LaTeX such as \frac{1}{2}, sets, expressions) with `math-verify`. Each verifier returns None
(pass) or a reason "<verifier>/<kind>: detail"; stats group rejections by the part before ':'.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from selfdistill.data import Example

log = logging.getLogger(__name__)

BLACKLIST = ("reference answer", "your response", "my response", "your own response", "now it's your turn")
BLACKLIST_START = ("your turn",)


@dataclass(frozen=True)
class VerifyOptions:
    similarity_floor: float = 0.0  # ROUGE-L F1 against the reference; used by the `similarity` verifier


Verifier = Callable[[str, Example, VerifyOptions], "str | None"]


def blacklist(rewrite: str, example: Example, options: VerifyOptions) -> str | None:
    text = rewrite.lower()
    for phrase in BLACKLIST:
        if phrase in text:
            return f"blacklist: contains '{phrase}'"
    if text.lstrip().startswith(BLACKLIST_START):
        return "blacklist: starts with 'Your turn'"
    return None


_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None


def final_answer(text: str) -> str | None:
    """The final answer of a solution: '#### n', then \\boxed{...}, then 'the answer is n', then the last number."""
    hashes = re.findall(r"####\s*(" + _NUMBER + r"|[^\n]+)", text)
    if hashes:
        return hashes[-1].strip()
    boxed = _boxed(text)
    if boxed:
        return boxed
    stated = re.findall(r"answer is[:\s]*(" + _NUMBER + ")", text, flags=re.IGNORECASE)
    if stated:
        return stated[-1]
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def end_at_final_answer(text: str) -> tuple[str, bool]:
    """(the text up to the end of its first '#### n' line, whether anything followed it).

    A GSM8K-style answer ends at that line; what a small parent writes after it (a second, different
    derivation, a new question) would otherwise be trained on, and the last '####' is the one `final_answer`
    reads. Text without a '####' line is returned as it is."""
    match = re.search(r"####\s*(" + _NUMBER + r"|[^\n]+)", text)
    end = text.find("\n", match.end()) if match else -1
    if end < 0 or not text[end:].strip():
        return text, False
    return text[:end].rstrip(), True


def _number(answer: str) -> float | None:
    cleaned = re.sub(r"(?<=\d),(?=\d)", "", answer).replace("$", "").replace(" ", "").rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def same_answer(a: str, b: str) -> bool:
    """Numeric equality when both are numbers (1,000 == 1000.0); otherwise math-verify's comparison."""
    x, y = _number(a), _number(b)
    if x is not None and y is not None:
        return abs(x - y) <= 1e-6 * max(1.0, abs(y))
    from math_verify import parse, verify

    def wrap(s: str) -> str:
        return s if s.startswith("$") or _number(s) is not None else f"${s}$"

    try:
        return bool(verify(parse(wrap(b)), parse(wrap(a))))
    except Exception as e:  # noqa: BLE001 - a parser failure means "not shown equal"
        log.debug("math-verify failed on %r vs %r: %s", a, b, e)
        return False


def math(rewrite: str, example: Example, options: VerifyOptions) -> str | None:
    reference = example.final_answer or final_answer(example.reference)
    if reference is None:
        return "math/no_reference: the reference answer has no final answer"
    found = final_answer(rewrite)
    if found is None:
        return "math/no_answer: no final answer in the rewrite"
    if not same_answer(found, reference):
        return f"math/wrong_answer: {found} != {reference}"
    return None


def similarity(rewrite: str, example: Example, options: VerifyOptions) -> str | None:
    from rouge_score import rouge_scorer

    score = rouge_scorer.RougeScorer(["rougeL"]).score(example.reference, rewrite)["rougeL"].fmeasure
    if score < options.similarity_floor:
        return f"similarity: ROUGE-L {score:.3f} < {options.similarity_floor}"
    return None


def none(rewrite: str, example: Example, options: VerifyOptions) -> str | None:
    return None


VERIFIERS: dict[str, Verifier] = {"blacklist": blacklist, "math": math, "similarity": similarity, "none": none}
DEFAULT_VERIFIERS = {"math": ["blacklist", "math"], "general": ["blacklist"]}


def verify(rewrite: str, example: Example, names: list[str],
           options: VerifyOptions = VerifyOptions()) -> tuple[dict[str, bool], str | None]:
    """Run every verifier in `names`: ({name: passed}, reason of the first failure or None)."""
    if not rewrite.strip():
        return {name: False for name in names}, "empty: the rewrite is empty"
    verdicts, reason = {}, None
    for name in names:
        why = VERIFIERS[name](rewrite, example, options)
        verdicts[name] = why is None
        reason = reason or why
    return verdicts, reason
