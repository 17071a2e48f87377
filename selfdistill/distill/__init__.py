"""Self-data distillation: the unpruned parent rewrites a dataset's answers; verified rewrites replace them.

Thangarasa et al., arXiv 2410.09982 §2, after SDFT (Yang et al., arXiv 2402.13669). `distill(cfg)`
writes `cfg.out` (JSONL, one row per input, in input order, appended as rows finish, resumable) and
`stats.json` beside it. Under `accelerate launch`/`torchrun` each process rewrites one contiguous
shard into `<out>.partR-of-N` and rank 0 appends the shards to `out` in input order. The output is claimed
first (guard.py: no foreign file replaced, one writer, recorded settings checked) and rows are generated in
fixed blocks (resume.py), so a resumed run writes what the uninterrupted run writes.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfdistill.config import opt, to_dict
from selfdistill.data import Example, load_examples
from selfdistill.distill import resume, sharding
from selfdistill.distill.attempts import Attempt, AttemptPlan, attempt_fields, attempt_stats, best_of_k, chosen
from selfdistill.distill.backends import BACKENDS, vllm_layout
from selfdistill.distill.prompts import MODES, RewritePrompt, check_template, render_prompt
from selfdistill.distill.records import check_prefix, make_row, open_for_append, read_complete, summarize, sync, write_row
from selfdistill.distill.verify import DEFAULT_VERIFIERS, VERIFIERS, VerifyOptions, end_at_final_answer, verify
from selfdistill.engine import GenParams, Result
from selfdistill.errors import UserError
from selfdistill.guard import claim_output
from selfdistill.models import DEFAULT_MODEL, check_safe_weights, resolve_device, resolve_dtype, resolve_model
from selfdistill.rundir import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["DistillConfig", "distill"]


@dataclass(frozen=True)
class DistillConfig:
    dataset: str = opt("", "data file (.jsonl/.json/.csv/.parquet) or hub dataset id")
    out: str = opt("distilled.jsonl", "output JSONL; stats.json is written beside it")
    teacher: str = opt(DEFAULT_MODEL, "the unpruned parent: built-in alias, HF folder, .gguf or hub id")
    recipe: str | None = opt(None, "gsm8k, dolly, alpaca, openmathinstruct, arc, generic (default: detect)")
    fields: list[str] = opt([], "field mapping for the generic recipe, e.g. prompt=q response=a")
    split: str = opt("train", "hub dataset split")
    subset: str | None = opt(None, "hub dataset configuration")
    limit: int | None = opt(None, "rows to rewrite (after offset)")
    offset: int = opt(0, "skip this many good rows first")
    on_bad_row: str = opt("fail", "fail or skip malformed rows")
    system_prompt: str | None = opt(None, "system turn added to the training prompt")
    backend: str = opt("hf", "generation backend: hf (refilling batched engine) or vllm")
    tensor_parallel_size: int = opt(1, "vllm: GPUs per engine (under a launcher: processes per engine)")
    batch_size: int = opt(32, "rows decoded at once (slots of the engine)")
    max_new_tokens: int = opt(512, "limit per rewrite")
    temperature: float = opt(0.0, "0 = greedy; SDFT sampled with 0.95")
    top_p: float = opt(1.0, "nucleus sampling mass (SDFT: 0.7)")
    mode: str = opt("rewrite", "rewrite (the parent sees question + reference) or answer (the question only)")
    samples: int = opt(1, "k: attempts per row; attempts 2..k are sampled only for rows still unverified")
    sample_temperature: float = opt(0.95, "temperature of attempts 2..k (SDFT's 0.95)")
    sample_top_p: float = opt(0.7, "nucleus mass of attempts 2..k (SDFT's 0.7)")
    sample_block: int = opt(256, "rows whose k attempts finish before the next rows start (samples > 1)")
    refill: int = opt(0, "hf: refill when this many slots are free (0 = batch_size/8)")
    draft_tokens: int = opt(GenParams.draft_tokens, "hf, greedy: prompt-lookup draft tokens per row and step, "
                            "kept only where the argmax agrees (0 = off)")
    verifiers: list[str] = opt([], "chain of blacklist, math, similarity, none (default: per recipe)")
    similarity_floor: float = opt(0.0, "ROUGE-L F1 floor for the similarity verifier")
    keep_truncated: bool = opt(False, "keep rewrites that hit max_new_tokens")
    rewrite_system: str | None = opt(None, "system prompt of the rewrite request (default: SDFT's)")
    rewrite_template: str | None = opt(None, "user turn with {instruction} and {reference} (default: SDFT's)")
    prefill: str | None = opt(None, "start of the parent's answer (default: math 'Great! Let's think step by step. ')")
    dtype: str = opt("auto", "auto (bf16 where native), float32, bfloat16, float16")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N")
    seed: int = opt(0, "sampling seed")
    overwrite: bool = opt(False, "replace an existing --out that distill did not write", keyed=False)
    restart: bool = opt(False, "when --out holds rows made with other settings, start over instead of refusing",
                        keyed=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be at least 1")
        if self.draft_tokens < 0:
            raise ValueError("draft_tokens must be >= 0 (0 = no drafts)")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if self.samples < 1 or self.sample_block < 1:
            raise ValueError(f"samples must be >= 1 (got {self.samples}) and sample_block >= 1")
        if self.sample_temperature <= 0 or not 0 < self.sample_top_p <= 1:
            raise ValueError("sample_temperature must be > 0 and sample_top_p in (0, 1]")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode '{self.mode}' (choose from {', '.join(MODES)})")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend '{self.backend}' (choose from {', '.join(BACKENDS)})")
        if self.tensor_parallel_size < 1 or (self.tensor_parallel_size > 1 and self.backend != "vllm"):
            raise ValueError("tensor_parallel_size must be >= 1, and above 1 only with backend vllm "
                             "(the hf engine runs one copy per process: accelerate launch)")
        if self.on_bad_row not in ("fail", "skip"):
            raise ValueError(f"on_bad_row must be fail or skip, not '{self.on_bad_row}'")
        for name in self.verifiers:
            if name not in VERIFIERS:
                raise ValueError(f"unknown verifier '{name}' (choose from {', '.join(VERIFIERS)})")
        if self.limit is not None and self.limit < 1 or self.offset < 0:
            raise ValueError("limit must be >= 1 and offset >= 0")


def _field_map(items: list[str]) -> dict[str, str] | None:
    if not items:
        return None
    bad = [i for i in items if "=" not in i]
    if bad:
        raise UserError(f"--fields '{bad[0]}' must look like role=column (e.g. prompt=question)")
    return dict(i.split("=", 1) for i in items)


def distill(cfg: DistillConfig) -> dict[str, Any]:
    """Rewrite `cfg.dataset` with the parent; returns the stats also written to stats.json."""
    started = time.time()
    if not cfg.dataset:
        raise UserError("no dataset given (--dataset PATH or hub id)")
    out = Path(cfg.out).expanduser()
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'distilled.jsonl'}")
    prompt = RewritePrompt(cfg.rewrite_system, cfg.rewrite_template, cfg.prefill)
    if cfg.rewrite_template is not None:
        check_template(cfg.rewrite_template)
    skipped: list[str] = []  # --on-bad-row skip: the rows passed over, counted in stats.json
    examples = load_examples(cfg.dataset, cfg.recipe, fields=_field_map(cfg.fields), limit=cfg.limit,
                             offset=cfg.offset, split=cfg.split, subset=cfg.subset, on_bad_row=cfg.on_bad_row,
                             system_prompt=cfg.system_prompt, skipped=skipped)
    # A missing or pickle-only teacher is named now, before the output is touched (vLLM loads it itself).
    check_safe_weights(resolve_model(cfg.teacher))
    dtype = resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    with claim_output(out, "distill", folder=False, settings=resume.settings(cfg, dtype), overwrite=cfg.overwrite,
                      restart=cfg.restart, recognize=resume.recognize_output,
                      companions=[(out.parent / "stats.json", resume.recognize_stats)]) as claim:
        return _distill(cfg, claim, examples, prompt, started, len(skipped))


def _distill(cfg: DistillConfig, claim: Any, examples: list[Example], prompt: RewritePrompt,
             started: float, bad_rows: int) -> dict[str, Any]:
    out = claim.path
    done_rows, keep_bytes = ([], 0) if claim.fresh else read_complete(out)
    check_prefix(out, done_rows, examples)
    state, rank, world = sharding.world(cfg.device, cfg.backend)
    if state is not None:
        state.wait_for_everyone()  # every rank has read the output before rank 0 discards or records it
    shard, shards, writer = (rank, world, True) if cfg.backend != "vllm" \
        else vllm_layout(rank, world, cfg.tensor_parallel_size)
    # One process: fixed blocks from row 0, so a resume writes what the uninterrupted run writes (resume.py).
    # With k attempts, rows finish sample_block at a time: that is then the block a resume restarts from.
    block = (resume.block_rows(cfg.batch_size) if cfg.samples == 1 else cfg.sample_block) \
        if world == 1 and cfg.backend == "hf" else None
    todo = list(range(resume.resume_start(len(done_rows), block) if block else len(done_rows), len(examples)))
    todo = todo[shard * len(todo) // shards:(shard + 1) * len(todo) // shards]
    if claim.fresh:  # --restart/--overwrite: the old rows go only now, once every input has been checked
        for path in ([out] if rank == 0 else []) + [sharding.part_path(out, shard, shards)]:
            path.unlink(missing_ok=True)
    claim.commit()
    gen_stats = dict(sharding.NO_GENERATION)
    if todo or (cfg.backend == "vllm" and world > 1):  # vLLM's ranks build their engines together
        device = resolve_device(cfg.device)
        if state is not None and device == "cuda":
            device = str(state.device)  # cuda:<local rank>
        dtype = resolve_dtype(cfg.dtype, device)
        tok, generate = BACKENDS[cfg.backend](cfg.teacher, dtype, device, cfg.tensor_parallel_size, cfg.seed)
        if block:
            generate = functools.partial(resume.in_blocks, generate, block=block)
        target = (out if shards == 1 else sharding.part_path(out, shard, shards)) if writer \
            else out.with_name(f"{out.name}.copy{rank}")
        gen_stats = _run(cfg, examples, todo, prompt, tok, generate, target,
                         keep_bytes if shards == 1 and writer else None, done_rows, block)
        if not writer:  # a copy of its replica's rows
            target.unlink(missing_ok=True)
            gen_stats = dict(sharding.NO_GENERATION)
    if world > 1:
        gen_stats = sharding.combined(sharding.gather(state, gen_stats))  # also the barrier: shard files complete
        if rank != 0:
            return {"rank": rank, "rows": len(todo), **gen_stats}
        if shards > 1:
            sharding.merge_parts(out, keep_bytes, shards)
    rows, _ = read_complete(out)
    stats = {**summarize(rows), "bad_rows_skipped": bad_rows, **attempt_stats(rows, cfg.samples), "mode": cfg.mode,
             "rows_this_run": len(rows) - len(done_rows), "resumed_after": len(done_rows),
             **gen_stats, "tokens_per_s": round(gen_stats["generated_tokens"] / gen_stats["generation_s"], 1)
             if gen_stats["generation_s"] else None, "processes": world,
             "wall_time_s": round(time.time() - started, 2), "config": to_dict(cfg)}
    atomic_write_json(out.parent / "stats.json", stats)
    return {k: v for k, v in stats.items() if k != "config"}


def _plan(cfg: DistillConfig, block: int | None) -> AttemptPlan:
    first = GenParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                      seed=cfg.seed, batch_size=cfg.batch_size, refill=cfg.refill, draft_tokens=cfg.draft_tokens)
    sampled = GenParams(**{**first.__dict__, "temperature": cfg.sample_temperature, "top_p": cfg.sample_top_p})
    # In one process the attempts follow resume's fixed blocks (so a resume regenerates a whole block);
    # else one attempt per row streams the whole input, and k attempts finish sample_block rows at a time.
    size = block or (cfg.sample_block if cfg.samples > 1 else 1 << 62)
    return AttemptPlan(cfg.samples, size, first, sampled, cfg.seed)


def _judge(cfg: DistillConfig, examples: list[Example], prefills: dict[int, str], tok: Any) -> Any:
    """(row, attempt number, engine result) -> the attempt with its verdicts and rejection reason."""
    options = VerifyOptions(similarity_floor=cfg.similarity_floor)

    def judge(i: int, number: int, res: Result) -> Attempt:
        ex = examples[i]
        text = (prefills[i] + tok.decode(res.tokens, skip_special_tokens=True)).strip()
        # a math answer ends at its '#### n' line: what follows is neither verified nor trained on
        text, cut = end_at_final_answer(text) if ex.kind == "math" else (text, False)
        names = cfg.verifiers or DEFAULT_VERIFIERS.get(ex.kind, ["blacklist"])
        verdicts, reason = verify(text, ex, names, options)
        if res.finish == "length" and not cfg.keep_truncated:
            verdicts["complete"] = False
            reason = f"truncated: stopped at max_new_tokens={cfg.max_new_tokens}"
        return Attempt(number, text, len(res.tokens), res.finish, verdicts, reason, cut)

    return judge


def _run(cfg: DistillConfig, examples: list[Example], todo: list[int], prompt: RewritePrompt, tok: Any,
         generate: Any, target: Path, keep_bytes: int | None, written: list[dict[str, Any]],
         block: int | None) -> dict[str, Any]:
    """Generate up to k attempts per row of `todo`, verify them, append rows to `target` in input order.

    Rows of `todo` already in `written` (a resumed block's finished rows) are checked, not appended again."""
    from tqdm.auto import tqdm

    if keep_bytes is None:  # this rank's shard file: resume it if it holds our rows
        prior, keep_bytes = read_complete(target)
        if [str(r["id"]) for r in prior] != [examples[i].id for i in todo[:len(prior)]]:
            log.warning("%s holds rows of another sharding; starting the shard over", target)
            target.unlink(missing_ok=True)
            prior, keep_bytes = [], 0
        todo = todo[len(prior):]
    rendered = {i: render_prompt(examples[i], tok, prompt, cfg.mode) for i in todo}
    ids = {i: tok(text, add_special_tokens=False)["input_ids"] for i, (text, _) in rendered.items()}
    judge = _judge(cfg, examples, {i: prefill for i, (_, prefill) in rendered.items()}, tok)
    counters: dict[str, int] = {"generated_tokens": 0, "prefilled_tokens": 0}
    t0 = time.time()
    with open_for_append(target, keep_bytes) as f, \
            tqdm(total=len(todo), desc="distill", unit="row", disable=not todo) as bar:
        for i, attempts in best_of_k(todo, ids, {i: examples[i].id for i in todo}, judge, generate,
                                     _plan(cfg, block), counters):
            kept = chosen(attempts)
            row = {**make_row(examples[i], kept.text, kept.verdicts, kept.reason, kept.finish, len(ids[i]),
                              sum(a.tokens for a in attempts)), **attempt_fields(attempts)}
            if i < len(written):
                resume.same_row(written[i], row, i + 1, target)
            else:
                write_row(f, row)
            bar.update(1)
            bar.set_postfix(tok_s=f"{counters['generated_tokens'] / max(time.time() - t0, 1e-9):.0f}")
        sync(f)
    return {**counters, "generation_s": round(time.time() - t0, 2)}
