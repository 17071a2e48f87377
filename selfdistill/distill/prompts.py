"""SDFT rewrite prompts, rendered through the parent's own chat template.

Mode `rewrite`: the parent sees the question and the reference answer and writes its own answer (Yang
et al., SDFT, arXiv 2402.13669; used with the unpruned parent in Thangarasa et al., arXiv 2410.09982).
Mode `answer`: the parent sees only the training prompt, exactly as the child will, and answers it (its
own on-policy answer; the reference, where there is one, is used only by the verifiers).
Math answers are prefilled with "Great! Let's think step by step. ", which stays part of the rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from selfdistill.data import Example
from selfdistill.errors import UserError

GENERAL_SYSTEM = ("Below are an instruction that describes a task along with a reference answer. "
                  "Using the reference answer as a guide, write your own response.")
GENERAL_TEMPLATE = "### Instruction:\n{instruction}\n\n### Reference Answer:\n{reference}\n\n### Response:\n"
MATH_SYSTEM = ("You are an expert in math. Below are a math question and its reference answer. "
               "Refer to the reference answer and write a response that appropriately answers the question.")
MATH_TEMPLATE = "{instruction}\n\n{reference}"
MATH_PREFILL = "Great! Let's think step by step. "


@dataclass(frozen=True)
class RewritePrompt:
    """What the parent is asked to continue, per kind ('math' or 'general'); None fields keep SDFT's."""

    system: str | None = None
    template: str | None = None
    prefill: str | None = None

    def parts(self, kind: str) -> tuple[str, str, str]:
        math = kind == "math"
        system = self.system if self.system is not None else (MATH_SYSTEM if math else GENERAL_SYSTEM)
        template = self.template if self.template is not None else (MATH_TEMPLATE if math else GENERAL_TEMPLATE)
        prefill = self.prefill if self.prefill is not None else (MATH_PREFILL if math else "")
        return system, template, prefill


def check_template(template: str) -> None:
    """Reject a template that does not show both the instruction and the reference answer."""
    for name in ("{instruction}", "{reference}"):
        if name not in template:
            raise UserError(f"rewrite template must contain {name}: {template!r}")
    try:
        template.format(instruction="", reference="")
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"rewrite template {template!r}: bad placeholder ({e}); "
                        "use only {instruction} and {reference}, and {{ }} for braces") from None


def render_rewrite(example: Example, tokenizer: Any, prompt: RewritePrompt = RewritePrompt()) -> tuple[str, str]:
    """(full prompt text ending with the prefill, the prefill) for one example."""
    if example.kind == "text":
        raise UserError(f"{example.source}: plain-text rows have no answer to rewrite; use a recipe "
                        "with a prompt and a response field")
    system, template, prefill = prompt.parts(example.kind)
    user = template.format(instruction=example.instruction, reference=example.reference)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    if not getattr(tokenizer, "chat_template", None):
        # A base model without a template: SDFT's plain layout.
        return f"{system}\n\n{user}\n{prefill}", prefill
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + prefill, prefill


MODES = ("rewrite", "answer")


def render_answer(example: Example, tokenizer: Any, prompt: RewritePrompt = RewritePrompt()) -> tuple[str, str]:
    """(the training prompt itself, ending with the prefill, the prefill): no reference anywhere in it."""
    if example.kind == "text":
        raise UserError(f"{example.source}: plain-text rows have no prompt to answer; use a recipe "
                        "with a prompt field")
    _, _, prefill = prompt.parts(example.kind)
    if not getattr(tokenizer, "chat_template", None):
        return "\n\n".join(m["content"] for m in example.messages) + "\n" + prefill, prefill
    text = tokenizer.apply_chat_template(example.messages, tokenize=False, add_generation_prompt=True)
    return text + prefill, prefill


def render_prompt(example: Example, tokenizer: Any, prompt: RewritePrompt, mode: str) -> tuple[str, str]:
    """The parent's prompt for `mode` (see MODES)."""
    return render_answer(example, tokenizer, prompt) if mode == "answer" else render_rewrite(example, tokenizer, prompt)
