"""Drift of a child from its parent beyond accuracy: KL(parent || child) and top-1 agreement, with intervals.

The parent answers held-out prompts greedily; that answer is teacher-forced through both models and
compared position by position over the answer tokens. Self-data distillation (arXiv 2410.09982) is
meant to keep the child close to the parent, so a lower KL / higher agreement is its mechanism.

The parent stays loaded and answers each prompt once; children are loaded one at a time (an 8B parent
with five children would not fit in memory together). Intervals are bootstrap intervals over prompts
(each prompt's tokens stay together), and every pair of children gets a paired interval on the same draws.
"""

from __future__ import annotations

import gc
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from selfdistill.config import opt
from selfdistill.console import progress
from selfdistill.models import DEFAULT_MODEL, stop_token_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptSet:
    name: str = opt("", "label of this prompt set in the output (e.g. gsm8k-test, general)")
    source: str = opt("", "data file or hub dataset id")
    recipe: str | None = opt(None, "dataset recipe; detected when omitted")
    offset: int = opt(0, "skip this many rows first")
    limit: int = opt(50, "prompts to use")
    split: str = opt("train", "split, for hub datasets")
    subset: str | None = opt(None, "hub dataset config")


@dataclass(frozen=True)
class DriftConfig:
    parent: str = opt(DEFAULT_MODEL, "the unpruned parent")
    children: dict[str, str] = opt({}, "label -> child model (alias, folder or hub id)")
    sets: list[PromptSet] = opt([], "prompt sets no child was trained on")
    max_new_tokens: int = opt(128, "parent answer length")
    batch_size: int = opt(8, "prompts per parent generate call")
    dtype: str = opt("float32", "model dtype")
    device: str = opt("auto", "cpu, cuda or auto")
    bootstrap_iters: int = opt(2000, "bootstrap draws over prompts for the intervals")
    seed: int = opt(0, "bootstrap seed")

    def __post_init__(self) -> None:
        if not self.children:
            raise ValueError("children: give at least one child model")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.bootstrap_iters < 0:
            raise ValueError("max_new_tokens and batch_size must be >= 1, bootstrap_iters >= 0")
        for s in self.sets:
            if not s.source or s.limit < 1:
                raise ValueError(f"drift set '{s.name}': give a source and a limit >= 1")


def _load(spec: Any, dtype: str, device: str | None = None) -> tuple[Any, Any]:
    if isinstance(spec, tuple):
        return spec
    from selfdistill.models import load_model

    return load_model(spec, dtype=dtype, device=device or "cpu")


def _prompt_text(item: Any, tok: Any) -> str:
    """A string is used as a user turn; an Example (data.py) brings its own prompt turns."""
    from selfdistill.data import prompt_text

    messages = getattr(item, "messages", None) or [{"role": "user", "content": str(item)}]
    return prompt_text(list(messages), tok)


@torch.no_grad()
def _greedy(model: Any, tok: Any, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    tok.padding_side = "left"  # batched generation needs the prompts flush right
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    stops = stop_token_ids(tok, model)
    answers = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)  # everything after a stop is padding
        answers.append(row if end is None else row[: end + 1])
    return answers


@torch.no_grad()
def _answer_logprobs(model: Any, ids: list[int], n_answer: int) -> torch.Tensor:
    logits = model(torch.tensor([ids], device=model.device)).logits[0, -n_answer - 1:-1].float()
    return F.log_softmax(logits, dim=-1)


def parent_answers(parent: Any, tok: Any, prompts: Sequence[Any], max_new_tokens: int,
                   batch_size: int) -> list[tuple[list[int], int]]:
    """(prompt + greedy answer token ids, answer length) per prompt."""
    texts = [_prompt_text(p, tok) for p in prompts]
    sequences = []
    for start in progress(range(0, len(texts), batch_size), desc="drift: parent answers", unit="batch"):
        batch = texts[start:start + batch_size]
        for text, answer in zip(batch, _greedy(parent, tok, batch, max_new_tokens), strict=True):
            sequences.append((tok(text, add_special_tokens=False)["input_ids"] + answer, len(answer)))
    return sequences


def parent_logprobs(parent: Any, sequences: list[tuple[list[int], int]]) -> list[torch.Tensor | None]:
    """The parent's log-probs over its own answer tokens, once per prompt (every child is compared to them).

    Kept on the model's device: prompts x answer tokens x vocabulary floats (50 x 128 x 49k = 1.3 GB for the
    built-in model), the price of not running the parent again for every child."""
    return [_answer_logprobs(parent, ids, n) if n else None for ids, n in sequences]


def per_prompt(reference: list[torch.Tensor | None], child: Any,
               sequences: list[tuple[list[int], int]]) -> dict[str, list[float]]:
    """Summed KL, agreeing positions and answer tokens per prompt (the bootstrap's units)."""
    kl, agree, tokens = [], [], []
    for lp, (ids, n) in zip(reference, sequences, strict=True):
        if lp is None:
            continue
        lq = _answer_logprobs(child, ids, n)
        kl.append(float((lp.exp() * (lp - lq)).sum()))
        agree.append(float((lp.argmax(-1) == lq.argmax(-1)).sum()))
        tokens.append(float(n))
    return {"kl": kl, "agree": agree, "tokens": tokens}


def _per_child(children: Mapping[str, Any], sets: list[tuple[list, list]], dtype: str,
               device: str) -> dict[str, list[dict[str, list[float]]]]:
    """Each child loaded once and scored on every set: {label: [per_prompt of set 0, set 1, ...]}."""
    stats = {}
    for label, spec in progress(children.items(), desc="drift: children", unit="model"):
        child = _load(spec, dtype, device)[0]
        stats[label] = [per_prompt(reference, child, sequences) for sequences, reference in sets]
        del child
        gc.collect()  # one child in memory at a time
    return stats


def _log_summary(summary: dict[str, Any]) -> None:
    for label, s in summary["children"].items():
        log.info("drift of %s over %d answer tokens: KL %.4f, agreement %.4f", label, s["tokens"], s["kl"],
                 s["agreement"])


def _draws(n: int, iters: int, seed: int) -> torch.Tensor:
    return torch.randint(0, n, (iters, n), generator=torch.Generator().manual_seed(seed))


def _ratio(values: torch.Tensor, tokens: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    return values[draws].sum(-1) / tokens[draws].sum(-1)


def summarize(stats: Mapping[str, dict[str, list[float]]], iters: int, seed: int) -> dict[str, Any]:
    """Token-weighted KL and agreement per child with 95 % intervals, and paired differences a − b."""
    first = next(iter(stats.values()))
    n = len(first["tokens"])
    tokens = torch.tensor(first["tokens"], dtype=torch.float64)
    draws = _draws(n, iters, seed) if iters and n else None
    vals = {label: {k: torch.tensor(s[k], dtype=torch.float64) for k in ("kl", "agree")} for label, s in stats.items()}

    def point_and_ci(series: torch.Tensor) -> tuple[float, list[float] | None]:
        point = float(series.sum() / tokens.sum()) if n else float("nan")
        if draws is None:
            return point, None
        boot = _ratio(series, tokens, draws)
        return point, [float(boot.quantile(0.025)), float(boot.quantile(0.975))]

    children = {}
    for label, v in vals.items():
        (kl, kl_ci), (agreement, agree_ci) = point_and_ci(v["kl"]), point_and_ci(v["agree"])
        children[label] = {"kl": kl, "kl_ci95": kl_ci, "agreement": agreement, "agreement_ci95": agree_ci,
                           "tokens": int(tokens.sum()), "prompts": n}
    paired = []
    for a, b in itertools.combinations(vals, 2):
        (kl, kl_ci), (agree, agree_ci) = (point_and_ci(vals[a][k] - vals[b][k]) for k in ("kl", "agree"))
        paired.append({"a": a, "b": b, "kl_diff": kl, "kl_diff_ci95": kl_ci, "agreement_diff": agree,
                       "agreement_diff_ci95": agree_ci})
    return {"children": children, "paired": paired}


def measure(parent: Any, children: Mapping[str, Any], prompts: Sequence[Any], *, max_new_tokens: int = 128,
            batch_size: int = 8, dtype: str = "float32", device: str | None = None, bootstrap_iters: int = 0,
            seed: int = 0) -> dict[str, Any]:
    """Drift of several children on one prompt set: {"children": per child, "paired": per pair}.

    The parent answers once and children load one at a time. `parent`/children: a model name or path
    (loaded with `load_model`) or a `(model, tokenizer)` pair; all must share a tokenizer. `prompts`:
    strings (user turns) or `data.Example`s."""
    pm, tok = _load(parent, dtype, device)
    sequences = parent_answers(pm, tok, prompts, max_new_tokens, batch_size)
    stats = _per_child(children, [(sequences, parent_logprobs(pm, sequences))], dtype, str(pm.device))
    summary = summarize({label: per_set[0] for label, per_set in stats.items()}, bootstrap_iters, seed)
    _log_summary(summary)
    return summary


def drift_many(parent: Any, children: Mapping[str, Any], prompts: Sequence[Any], *, max_new_tokens: int = 128,
               batch_size: int = 8, dtype: str = "float32") -> dict[str, dict[str, Any]]:
    """`measure`'s per-child figures, without intervals."""
    return measure(parent, children, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   dtype=dtype)["children"]


def drift(parent: Any, child: Any, prompts: Sequence[Any], *, max_new_tokens: int = 128, batch_size: int = 8,
          dtype: str = "float32") -> dict[str, Any]:
    """Mean per-token KL(parent || child) and top-1 agreement on the parent's greedy answers."""
    return drift_many(parent, {"child": child}, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      dtype=dtype)["child"]


def run_drift(cfg: DriftConfig) -> dict[str, Any]:
    """The drift stage: every prompt set, every child; records which file and rows each set used."""
    from selfdistill.data import load_examples
    from selfdistill.models import resolve_device

    device = resolve_device(cfg.device)
    pm, tok = _load(cfg.parent, cfg.dtype, device)
    loaded, sets = [], []
    for s in cfg.sets:  # the parent answers every set first, so each child then loads once for all of them
        examples = load_examples(s.source, s.recipe, offset=s.offset, limit=s.limit, split=s.split, subset=s.subset)
        sequences = parent_answers(pm, tok, examples, cfg.max_new_tokens, cfg.batch_size)
        loaded.append((s, examples))
        sets.append((sequences, parent_logprobs(pm, sequences)))
    stats = _per_child(cfg.children, sets, cfg.dtype, str(pm.device))
    result: dict[str, Any] = {"parent": cfg.parent, "dtype": cfg.dtype, "device": device, "sets": {}}
    for i, (s, examples) in enumerate(loaded):
        summary = summarize({label: per_set[i] for label, per_set in stats.items()}, cfg.bootstrap_iters, cfg.seed)
        _log_summary(summary)
        result["sets"][s.name] = {"source": s.source, "split": s.split, "offset": s.offset,
                                  "rows": [e.id for e in examples], **summary}
    return result
