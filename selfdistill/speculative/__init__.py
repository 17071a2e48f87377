"""`speculate` stage: pruned children as speculative drafts of their parent (greedy, lossless).

Paper: arXiv 2410.09982 §6 (and SD², arXiv 2504.08838, for mean accepted length). For each draft we run our
own draft-then-verify loop (exact vLLM-named statistics, output checked against the target's greedy output on
every prompt) and time the target alone, our loop and transformers' assisted generation on the same prompts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from selfdistill.config import opt
from selfdistill.console import progress
from selfdistill.errors import UserError
from selfdistill.guard import claim_output
from selfdistill.models import DEFAULT_MODEL, stop_token_ids
from selfdistill.rundir import atomic_write_json, atomic_write_text
from selfdistill.speculative.intervals import mal_interval, mal_ratio
from selfdistill.speculative.loop import ModelRunner, SpecStats, speculative_generate
from selfdistill.tables import fmt, markdown_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeculateConfig:
    target: str = opt(DEFAULT_MODEL, "the target (parent) model")
    draft: list[str] = opt([], "one or more draft (child) models; each must share the target's tokenizer")
    prompts: str = opt("", "data file (or hub dataset) whose prompts are decoded")
    recipe: str | None = opt(None, "dataset recipe (gsm8k, dolly, alpaca, ...); detected from the rows if unset")
    k: int = opt(4, "draft tokens proposed per verify step")
    limit: int = opt(32, "number of prompts")
    offset: int = opt(0, "skip this many prompts first")
    split: str = opt("train", "split, for hub datasets (measure on rows no child was trained on, e.g. test)")
    subset: str | None = opt(None, "hub dataset config")
    max_new_tokens: int = opt(128, "new tokens per prompt (generation also stops at EOS)")
    dtype: str = opt("float32", "model dtype: float32 (exact ties are rarer) or bfloat16")
    device: str = opt("cpu", "device: cpu, cuda or auto")
    hf_assisted: bool = opt(False, "also time transformers' assisted generation (assistant_model=): a slow fp32 anchor")
    out: str = opt("", "JSON file for the results (a Markdown table is written beside it); none: only returned")
    overwrite: bool = opt(False, "replace an existing --out that speculate did not write", keyed=False)

    def __post_init__(self) -> None:
        if not self.draft:
            raise ValueError("draft: give at least one draft model (--draft CHILD)")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.prompts:
            raise ValueError("prompts: give a data file with prompts (--prompts FILE)")


def load_prompts(cfg: SpeculateConfig, tok: Any) -> tuple[list[list[int]], list[str]]:
    """Prompt turns as the model sees them before answering (data.prompt_text), as token ids; and row ids."""
    from selfdistill.data import load_examples, prompt_text

    examples = load_examples(cfg.prompts, cfg.recipe, limit=cfg.limit, offset=cfg.offset, split=cfg.split,
                             subset=cfg.subset)
    prompts = []
    for ex in examples:
        if ex.kind == "text":  # plain text has no turns: the text itself is the prompt
            ids = tok(ex.reference, add_special_tokens=True)["input_ids"]
        else:  # the rendered prompt already holds the template's special tokens
            ids = tok(prompt_text(ex.messages, tok), add_special_tokens=False)["input_ids"]
        if len(ids) == 0:
            raise UserError(f"{ex.source}: the prompt renders to no tokens")
        prompts.append(list(ids))
    return prompts, [ex.id for ex in examples]


def _greedy_config(cfg: SpeculateConfig, eos: set[int], pad: int, **extra: Any) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False, eos_token_id=sorted(eos),
                            pad_token_id=pad, **extra)


def _hf_generate(model: Any, prompt: list[int], cfg: SpeculateConfig, eos: set[int], pad: int,
                 assistant: Any = None) -> list[int]:
    """transformers' greedy generate (plain or assisted); returns the new tokens."""
    ids = torch.tensor([prompt], device=model.device)
    # generate() fills unset options from the checkpoint's generation_config (sampling, repetition penalty), so
    # both models get a plain greedy config for the call; the assistant's also fixes k and turns off its
    # confidence early exit, so the comparison with our loop is like for like.
    configs = {model: _greedy_config(cfg, eos, pad)}
    if assistant is not None:
        configs[assistant] = _greedy_config(cfg, eos, pad, num_assistant_tokens=cfg.k,
                                            num_assistant_tokens_schedule="constant",
                                            assistant_confidence_threshold=0.0)
    saved = {m: m.generation_config for m in configs}
    try:
        for m, gen in configs.items():
            m.generation_config = gen
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=assistant)
    finally:
        for m, gen in saved.items():
            m.generation_config = gen
    return out[0, len(prompt):].tolist()


def _timed(fn: Any, items: list[Any], desc: str) -> tuple[list[Any], float]:
    results, start = [], time.perf_counter()
    for item in progress(items, desc=desc):
        results.append(fn(item))
    return results, time.perf_counter() - start


def _check_tokenizer(name: str, tok: Any, target_tok: Any, target: str) -> None:
    if tok.get_vocab() != target_tok.get_vocab():
        raise UserError(f"draft '{name}' has a different tokenizer than target '{target}' "
                        "(speculative decoding needs the same vocabulary)")


def _run_draft(name: str, target: Any, prompts: list[list[int]], reference: list[list[int]], t_alone: float,
               cfg: SpeculateConfig, eos: set[int], pad: int, target_tok: Any) -> dict[str, Any]:
    from selfdistill.models import load_model

    draft, tok = load_model(name, dtype=cfg.dtype, device=target.device.type)
    _check_tokenizer(name, tok, target_tok, cfg.target)
    prompt_stats: list[SpecStats] = []  # one per prompt: the totals add them up, the intervals resample them

    def ours(prompt: list[int]) -> list[int]:
        tokens, stats = speculative_generate(ModelRunner(target), ModelRunner(draft), prompt, cfg.k,
                                             cfg.max_new_tokens, eos)
        prompt_stats.append(stats)
        return tokens

    speculative_generate(ModelRunner(target), ModelRunner(draft), prompts[0][:8], cfg.k, 2, eos)  # warm-up
    outputs, t_loop = _timed(ours, prompts, f"speculate {Path(name).name}")
    mismatches = [i for i, (a, b) in enumerate(zip(outputs, reference)) if a != b]
    total = SpecStats(k=cfg.k)
    for stats in prompt_stats:
        total.add(stats)
    per_prompt = {"drafts": [s.drafts for s in prompt_stats], "accepted": [s.accepted for s in prompt_stats]}
    row: dict[str, Any] = {"draft": name, "layers": draft.config.num_hidden_layers, **total.summary(),
                           "mean_acceptance_length_ci95": mal_interval(per_prompt), "per_prompt": per_prompt,
                           "lossless": not mismatches, "mismatched_prompts": mismatches,
                           "mismatch_count": len(mismatches),
                           "time_target_alone_s": t_alone, "time_ours_s": t_loop, "speedup_ours": t_alone / t_loop}
    if cfg.hf_assisted:
        hf_out, t_hf = _timed(lambda p: _hf_generate(target, p, cfg, eos, pad, assistant=draft), prompts,
                              f"assisted {Path(name).name}")
        row.update(time_hf_assisted_s=t_hf, speedup_hf_assisted=t_alone / t_hf,
                   hf_assisted_matches_target=sum(a == b for a, b in zip(hf_out, reference)))
    if mismatches:
        # In 16-bit a verify pass over k+1 tokens can round a near-tie differently from one-token decoding, so
        # there it is a statistic (counted in the output); in fp32 speculate() treats it as the bug it is.
        log.warning("draft %s: output differs from the target's greedy output on prompts %s (%s)", name,
                    mismatches, cfg.dtype)
    return row


def speculate(cfg: SpeculateConfig) -> dict[str, Any]:
    """Compare each draft against the target on the same prompts; write `cfg.out` (JSON) and a table."""
    from selfdistill.models import load_tokenizer

    target_tok = load_tokenizer(cfg.target)
    prompts, rows = load_prompts(cfg, target_tok)
    for name in cfg.draft:  # a draft with another vocabulary is refused before the target's timed run
        _check_tokenizer(name, load_tokenizer(name), target_tok, cfg.target)
    if not cfg.out:
        return _speculate(cfg, prompts, rows)
    out = Path(cfg.out)
    with claim_output(out, "speculate", folder=False, overwrite=cfg.overwrite,
                      companions=[(out.with_suffix(".md"), None)]) as claim:
        claim.commit()
        return _speculate(cfg, prompts, rows)


def _speculate(cfg: SpeculateConfig, prompts: list[list[int]], rows: list[str]) -> dict[str, Any]:
    from selfdistill.models import load_model, resolve_device

    cfg_device = resolve_device(cfg.device)
    target, tok = load_model(cfg.target, dtype=cfg.dtype, device=cfg_device)
    eos, pad = set(stop_token_ids(tok, target)), tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    _hf_generate(target, prompts[0][:8], replace(cfg, max_new_tokens=2), eos, pad)  # warm-up, not timed
    reference, t_alone = _timed(lambda p: _hf_generate(target, p, cfg, eos, pad), prompts, "target alone")
    drafts = [_run_draft(name, target, prompts, reference, t_alone, cfg, eos, pad, tok) for name in cfg.draft]
    result = {"target": cfg.target, "k": cfg.k, "prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens,
              "prompts_source": cfg.prompts, "split": cfg.split, "offset": cfg.offset, "rows": rows,
              "dtype": cfg.dtype, "device": cfg_device, "target_tokens": sum(map(len, reference)),
              "time_target_alone_s": t_alone, "drafts": drafts, "comparisons": _comparisons(drafts)}
    if cfg.out:
        atomic_write_json(cfg.out, result)
        atomic_write_text(Path(cfg.out).with_suffix(".md"), table(result))
    bad = [r["draft"] for r in result["drafts"] if not r["lossless"]]
    if bad and cfg.dtype == "float32":  # exact arithmetic: a differing output is a bug in the loop
        raise UserError(f"speculative output differs from the target's greedy output for draft(s) {', '.join(bad)}"
                        + (f" (details in {cfg.out})" if cfg.out else ""))
    return result


def _comparisons(drafts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each later draft's MAL over the first's, paired over the prompts both decoded."""
    first = drafts[0]
    return [{"draft": d["draft"], "against": first["draft"], **mal_ratio(d["per_prompt"], first["per_prompt"])}
            for d in drafts[1:]]


def mal_text(row: dict[str, Any]) -> str:
    """MAL with its interval over prompts, e.g. '3.17 (2.95–3.40)' (older results have no interval)."""
    ci = row.get("mean_acceptance_length_ci95")
    return fmt(row["mean_acceptance_length"], 2) + (f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else "")


def comparison_lines(result: dict[str, Any], label: Any = str) -> list[str]:
    """One sentence per paired MAL comparison."""
    return [f"MAL of {label(c['draft'])} / {label(c['against'])}: {c['mal_ratio']:.3f} "
            f"(95 % interval over prompts {c['ci95'][0]:.3f}–{c['ci95'][1]:.3f})"
            for c in result.get("comparisons", [])]


def table(result: dict[str, Any]) -> str:
    """One Markdown row per draft."""
    headers = ["draft", "layers", "acceptance rate", "MAL", "per position", "target passes", "ours (s)", "speed-up",
               "HF assisted (s)", "speed-up", "lossless"]
    rows = [[r["draft"], r["layers"], fmt(r["draft_acceptance_rate"], 3), mal_text(r),
             " ".join(f"{a:.2f}" for a in r["acceptance_per_position"]), r["target_forward_passes"],
             fmt(r["time_ours_s"]), fmt(r["speedup_ours"], 2, unit="×"), fmt(r.get("time_hf_assisted_s")),
             fmt(r.get("speedup_hf_assisted"), 2, unit="×"), "yes" if r["lossless"] else "NO"]
            for r in result["drafts"]]
    head = (f"Target `{result['target']}`, k = {result['k']}, {result['prompts']} prompts, "
            f"{result['target_tokens']} target tokens, target alone {result['time_target_alone_s']:.1f} s.")
    tail = comparison_lines(result)
    return "\n".join([head, "", *markdown_table(headers, rows), *([""] + tail if tail else [])]) + "\n"
