"""Cost profile: parameters, FLOPs per token (as the paper counts and as executed), latency.

Paper: arXiv 2410.09982 reports the FLOPs saved by pruning as removed parameters / all parameters (2 FLOPs per
parameter per token). We add the FLOPs torch really executes at a given length (attention included) and
measured prefill / decode throughput, parent and children in one process so the numbers compare.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfdistill.config import opt
from selfdistill.console import progress
from selfdistill.engine.compat import attention_implementation
from selfdistill.errors import UserError
from selfdistill.models import DEFAULT_MODEL, cache_kwargs, count_parameters, paper_flops_per_token
from selfdistill.rundir import atomic_write_json, atomic_write_text
from selfdistill.tables import fmt, markdown_table

log = logging.getLogger(__name__)


# --- the `profile` stage -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileConfig:
    model: list[str] = opt([DEFAULT_MODEL], "models to profile (parent first: reductions are relative to it)")
    seq_len: int = opt(512, "sequence length of the FLOP count and of the prefill timing")
    decode_tokens: int = opt(32, "tokens generated per batch-1 decode timing run")
    runs: int = opt(3, "timing runs; the median is reported")
    dtype: str = opt("auto", "dtype for the timings: auto (bf16 on a CPU that has it), float32, bfloat16")
    device: str = opt("cpu", "device: cpu, cuda or auto")
    executed_flops: bool = opt(True, "count executed FLOPs with torch's FlopCounterMode (eager attention)")
    latency: bool = opt(True, "measure prefill and decode tokens/s")
    out: str = opt("", "JSON file for the results (a Markdown table is written beside it); none: only returned")
    overwrite: bool = opt(False, "replace an existing --out that profile did not write", keyed=False)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: give at least one model (--model A [--model B])")
        for name in ("seq_len", "decode_tokens", "runs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def executed_flops(model: Any, seq_len: int) -> dict[str, int]:
    """FLOPs of one forward over `seq_len` tokens, counted by torch (mm/bmm/...); attention must be eager.

    FlopCounterMode has no formula for the CPU SDPA kernel, so the model is switched to eager attention for
    the count and back afterwards.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    previous = attention_implementation(model.config)
    model.set_attn_implementation("eager")
    try:
        ids = _random_ids(model, seq_len)
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            model(input_ids=ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    by_op = {str(op).split(".")[-1] if "." in str(op) else str(op): int(n)
             for op, n in counter.get_flop_counts().get("Global", {}).items()}
    total = int(counter.get_total_flops())
    return {"total": total, "per_token": total // seq_len, "seq_len": seq_len, "by_op": by_op}


def _random_ids(model: Any, seq_len: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.randint(3, vocab, (1, seq_len), generator=g).to(model.device)


def _synchronize(device: Any) -> None:
    """Wait for the device's queued kernels: CUDA calls return once launched, so a timer read without this
    measures kernel launches, not kernels."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(model: Any, ids: Any, decode_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one run: a forward over `ids`, then batch-1 greedy steps."""
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        _synchronize(ids.device)
        start = time.perf_counter()
        logits = model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache)).logits
        token = logits[:, -1:].argmax(-1)
        _synchronize(ids.device)
        prefill = ids.shape[1] / (time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(decode_tokens):  # a fixed count: EOS must not shorten the timed run
            token = model(input_ids=token, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        _synchronize(ids.device)
        return prefill, decode_tokens / (time.perf_counter() - start)


def measure_latency(models: list[Any], seq_len: int, decode_tokens: int, runs: int) -> list[dict[str, Any]]:
    """Prefill and decode tokens/s per model, medians of `runs`; the runs interleave the models, so load from
    other processes on a shared machine hits parent and child alike."""
    import torch

    samples: list[list[tuple[float, float]]] = [[] for _ in models]
    for model in models:
        with torch.inference_mode():
            model(input_ids=_random_ids(model, 8))  # warm-up: first-call allocations are not latency
    for _ in progress(range(runs), desc="latency"):
        for i, model in enumerate(models):
            samples[i].append(_time_once(model, _random_ids(model, seq_len), decode_tokens))
    return [{"prefill_tokens_per_s": statistics.median(p for p, _ in runs_),
             "decode_tokens_per_s": statistics.median(d for _, d in runs_),
             "prefill_runs": [p for p, _ in runs_], "decode_runs": [d for _, d in runs_]} for runs_ in samples]


def static_profile(name: str, model: Any, cfg: ProfileConfig) -> dict[str, Any]:
    """Parameters and FLOPs per token (paper and, if asked, executed) of one loaded model."""
    params = count_parameters(model)
    row: dict[str, Any] = {"model": name, "layers": len(params["per_layer"]), "parameters": params,
                           "flops_per_token_paper": paper_flops_per_token(params["total"])}
    if cfg.executed_flops:
        row["flops_executed"] = executed_flops(model, cfg.seq_len)
        row["flops_per_token_executed"] = row["flops_executed"]["per_token"]
    return row


def _relative(rows: list[dict[str, Any]]) -> None:
    """Reductions of every model against the first one (the parent), in percent."""
    base = rows[0]
    for row in rows:
        row["param_reduction_pct"] = 100 * (1 - row["parameters"]["total"] / base["parameters"]["total"])
        if "flops_per_token_executed" in row:
            row["executed_flops_reduction_pct"] = 100 * (1 - row["flops_per_token_executed"]
                                                         / base["flops_per_token_executed"])
        if "decode_tokens_per_s" in row:
            row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            row["prefill_speedup"] = row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]


def check_fits(cfg: ProfileConfig, sources: list[str]) -> None:
    """Refuse a --seq-len the models cannot take (past max_position_embeddings) or the device cannot hold,
    before anything loads: otherwise the answer is an allocation traceback from deep inside a forward."""
    from selfdistill.models import resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    width = 4 if resolve_dtype(cfg.dtype, device) == "float32" else 2
    positions = cfg.seq_len + (cfg.decode_tokens if cfg.latency else 0)  # decode steps extend the prefill
    weights = peak = 0
    for name, source in zip(cfg.model, sources):
        config = _text_config(source)
        limit = getattr(config, "max_position_embeddings", None)
        if limit and positions > limit:
            asked = f"--seq-len {cfg.seq_len}" + (f" + --decode-tokens {cfg.decode_tokens}" if cfg.latency else "")
            raise UserError(f"{asked} = {positions} positions, more than {name} takes "
                            f"(max_position_embeddings {limit})")
        weights += _weight_bytes(source)  # every model stays loaded, so their weights add up
        peak = max(peak, _forward_bytes(config, cfg, positions, width))  # the forwards run one at a time
    free = _available_bytes(device)
    if free is not None and weights + peak > free:
        raise UserError(f"--seq-len {cfg.seq_len} needs about {(weights + peak) / 2**30:.1f} GiB on {device} "
                        f"(weights, attention scores, KV cache, logits) but {free / 2**30:.1f} GiB are available; "
                        "use a shorter --seq-len")


def _text_config(source: str) -> Any:
    """The model's (text) config, or None where it cannot be read here (the load then reports why)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError):
        return None
    return getattr(config, "text_config", None) or config


def _weight_bytes(source: str) -> int:
    return sum(p.stat().st_size for p in Path(source).glob("*.safetensors")) if Path(source).is_dir() else 0


def _forward_bytes(config: Any, cfg: ProfileConfig, positions: int, width: int) -> int:
    """About the largest memory one profiling forward holds at once, beyond the weights."""
    if config is None:
        return 0
    seq, heads, hidden = cfg.seq_len, config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    widest = max(config.vocab_size, getattr(config, "intermediate_size", None) or 4 * hidden)
    per_position = seq * (widest + 4 * hidden) * width  # logits or the MLP's middle, plus the residual stream
    flops = per_position + 2 * heads * seq * seq * width if cfg.executed_flops else 0  # eager: scores + softmax
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim * positions * width
    latency = per_position + kv if cfg.latency else 0
    return max(flops, latency)


def _available_bytes(device: str) -> int | None:
    """Memory free for the profile on `device`; None where it cannot be told."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def profile(cfg: ProfileConfig) -> dict[str, Any]:
    """Parameters, FLOPs per token (paper and executed) and latency of each model, all in one process."""
    from selfdistill.guard import claim_output
    from selfdistill.models import resolve_model

    sources = [resolve_model(name) for name in cfg.model]  # a missing model is named before the others load
    check_fits(cfg, sources)
    if not cfg.out:
        return _profile(cfg)
    out = Path(cfg.out)
    with claim_output(out, "profile", folder=False, overwrite=cfg.overwrite,
                      companions=[(out.with_suffix(".md"), None)]) as claim:
        claim.commit()
        return _profile(cfg)


def _profile(cfg: ProfileConfig) -> dict[str, Any]:
    from selfdistill.models import load_model, resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    models = [load_model(name, dtype=dtype, device=device, with_tokenizer=False)[0] for name in cfg.model]
    rows = [static_profile(name, model, cfg) for name, model in zip(cfg.model, progress(models, desc="FLOPs"))]
    if cfg.latency:
        for row, timing in zip(rows, measure_latency(models, cfg.seq_len, cfg.decode_tokens, cfg.runs)):
            row.update(timing)
    _relative(rows)
    result = {"seq_len": cfg.seq_len, "decode_tokens": cfg.decode_tokens, "runs": cfg.runs, "dtype": dtype,
              "device": device, "threads": _threads(), "models": rows}
    if cfg.out:
        atomic_write_json(cfg.out, result)
        atomic_write_text(Path(cfg.out).with_suffix(".md"), table(result))
    return result


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def table(result: dict[str, Any]) -> str:
    """One Markdown row per model."""
    headers = ["model", "layers", "params", "param reduction", "FLOPs/token (2N)", "FLOPs/token executed",
               "executed reduction", "prefill tok/s", "decode tok/s"]
    rows = [[r["model"], r["layers"], fmt(r["parameters"]["total"], 1, 1e-6, " M"), fmt(r["param_reduction_pct"], 2, unit=" %"),
             fmt(r["flops_per_token_paper"], 1, 1e-6, " M"), fmt(r.get("flops_per_token_executed"), 1, 1e-6, " M"),
             fmt(r.get("executed_flops_reduction_pct"), 2, unit=" %"), fmt(r.get("prefill_tokens_per_s")),
             fmt(r.get("decode_tokens_per_s"))] for r in result["models"]]
    head = (f"seq_len {result['seq_len']}, {result['dtype']} on {result['device']} ({result['threads']} threads), "
            f"median of {result['runs']} runs.")
    return "\n".join([head, "", *markdown_table(headers, rows)]) + "\n"
