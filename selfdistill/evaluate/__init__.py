"""Stage `evaluate`: lm-evaluation-harness scores for parent and children, retention, drift.

Every model runs under identical, recorded settings (preset tasks, shots, seeded subsets, batch
size, dtype, chat template); the parent's scores are cached by model hash + settings. Retention
follows PAPER.md §4 (arXiv 2410.09982); see docs/evaluate.md for presets and the scores.json schema.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Literal

from selfdistill.config import opt, to_dict
from selfdistill.errors import UserError
from selfdistill.evaluate.drift import drift, drift_many
from selfdistill.evaluate.presets import PRESETS, TASKS_DIR, TaskSpec, check_data_dir, select_tasks
from selfdistill.evaluate.scores import score_models
from selfdistill.paths import default_data_dir

__all__ = ["EvalConfig", "evaluate", "drift", "drift_many", "score_models", "PRESETS"]
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    model: list[str] = opt([], "models to evaluate: alias, local HF folder, .gguf or hub id")
    baseline: str = opt("", "the parent: evaluated too (cached) and the denominator of retention")
    preset: Literal["openllm-v1", "openllm-v1-local", "cpu"] = opt("cpu", "task suite (docs/evaluate.md)")
    tasks: list[str] = opt([], "only these tasks of the preset (short names, e.g. arc_easy gsm8k)")
    limit: int | None = opt(None, "items per task (seeded subset for local presets; first N for openllm-v1)")
    selection: int | None = opt(None, "score N items per task drawn from OUTSIDE the reported subset that limit / "
                                      "the preset picks: for choosing settings (merge t) off the reported items")
    data_dir: str = opt("", "offline data (default: $SELFDISTILL_DATA_DIR, else ../shared/data)")
    batch_size: int = opt(16, "lm-eval batch size")
    dtype: str = opt("auto", "float32 | bfloat16 | float16 | auto (bf16 on CPUs with avx512_bf16)")
    device: str = opt("auto", "cpu | cuda | auto")
    seed: int = opt(1234, "subset, few-shot and harness seed")
    apply_chat_template: bool = opt(False, "wrap prompts in the model's chat template (docs/evaluate.md)")
    max_gen_toks: int = opt(0, "generation cap for GSM8K (0: lm-eval's default 256)")
    backend: Literal["auto", "hf", "shared", "vllm"] = opt(
        "auto", "shared: each context run once for all its choices; hf: plain HFLM (the reference); vllm: "
        "lm-eval's vLLM; auto: shared for the cpu and local presets, else hf (docs/evaluate.md)")
    softmax_dtype: Literal["float32", "model"] = opt(
        "float32", "dtype of the log-softmax over the vocabulary: float32, or model (the model's dtype, lm-eval's "
        "default). A 16-bit log-softmax rounds a long answer's summed log-likelihood to steps of 0.25-1.0, "
        "enough to swap two choices; the hf and shared backends honour it alike")
    tensor_parallel_size: int = opt(1, "vllm: GPUs per replica (replicas = launched processes / this)")
    bootstrap_iters: int = opt(2000, "paired bootstrap draws for retention differences")
    cache: bool = opt(True, "reuse cached scores of a model with the same hash and settings")
    allow_pickle: bool = opt(False, "allow models whose weights are pickle (.bin) files: their tensors load with "
                                    "torch's weights_only=True", keyed=False)
    out: str = opt("runs/evaluate", "output folder")
    overwrite: bool = opt(False, "write into an existing --out that evaluate did not write", keyed=False)

    def __post_init__(self) -> None:
        if not self.model and not self.baseline:
            raise ValueError("give at least one --model (and usually --baseline)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.selection is not None and self.selection < 1:
            raise ValueError(f"--selection must be >= 1, got {self.selection}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.tensor_parallel_size < 1 or (self.tensor_parallel_size > 1 and self.backend != "vllm"):
            raise ValueError("--tensor-parallel-size must be >= 1, and above 1 only with --backend vllm")
        if self.backend not in ("auto", "hf", "shared", "vllm"):  # the CLI checks the Literal; Python callers too
            raise UserError(f"--backend: unknown backend '{self.backend}' (choose from auto, hf, shared, vllm)")


def model_label(name: str, taken: set[str]) -> str:
    """A file-safe, unique label for results/<label>.json."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name.rstrip("/")).name or name) or "model"
    label, k = base, 2
    while label in taken:
        label, k = f"{base}-{k}", k + 1
    taken.add(label)
    return label


def _settings(cfg: EvalConfig, specs: dict[str, TaskSpec], dtype: str, backend: str) -> dict[str, Any]:
    from importlib.metadata import version

    from selfdistill.rundir import hash_path

    return {"harness": f"lm_eval {version('lm_eval')}", "preset": cfg.preset, "limit": cfg.limit,
            "selection": cfg.selection,
            "seed": cfg.seed, "batch_size": cfg.batch_size, "dtype": dtype,
            "apply_chat_template": cfg.apply_chat_template, "max_gen_toks": cfg.max_gen_toks or 256,
            "backend": backend, "softmax_dtype": cfg.softmax_dtype, "task_files_sha256": hash_path(TASKS_DIR),
            "tasks": {k: dataclasses.asdict(s) | {"files": list(s.files)} for k, s in specs.items()}}


def _evaluate_one(name: str, path: str, cfg: EvalConfig, settings: dict[str, Any], tasks: Any,
                  device: str) -> tuple[dict[str, Any] | None, bool]:
    """lm-eval's output for one model, task by task from the cache when the model hash + settings match.

    Each task is cached on its own, so adding a task to a finished evaluation scores only the new task,
    and an evaluation cut off between tasks keeps the tasks it finished."""
    import json

    from selfdistill.evaluate.runner import cache_key
    from selfdistill.models import cache_dir
    from selfdistill.rundir import atomic_write_json, hash_path

    model_hash = hash_path(path) or path
    parts: list[dict[str, Any]] = []
    lm: list[Any] = []  # built on the first task that is not cached
    for task, spec in tasks["specs"].items():
        one = {**settings, "tasks": {task: settings["tasks"][task]}}
        cached = cache_dir() / "eval" / f"{cache_key(model_hash, one)}.json"
        if cfg.cache and cached.is_file():
            log.info("%s: cached %s scores %s", name, task, cached)
            parts.append(json.loads(cached.read_text(encoding="utf-8")))
            continue
        t0 = time.time()
        res = _run_task(name, path, cfg, settings, tasks, task, spec, device, lm)
        if res is None:  # a non-zero rank under accelerate launch
            return None, False
        res["selfdistill"] = {"task": task, "wall_time_s": time.time() - t0}
        if cfg.cache:
            atomic_write_json(cached, res)
        parts.append(res)
    merged = _merge_results(parts)
    merged["selfdistill"] = {"model": name, "path": path, "model_sha256": model_hash,
                             "wall_time_s": sum(p["selfdistill"]["wall_time_s"] for p in parts), "settings": settings}
    return merged, not lm


def _run_task(name: str, path: str, cfg: EvalConfig, settings: dict[str, Any], tasks: Any, task: str,
              spec: TaskSpec, device: str, lm: list[Any]) -> dict[str, Any] | None:
    from selfdistill.evaluate.runner import load_tasks, make_lm, run_tasks

    if not lm:
        lm.append(make_lm(name, path, backend=settings["backend"], dtype=settings["dtype"], device=device,
                          batch_size=cfg.batch_size, max_length=None, tensor_parallel_size=cfg.tensor_parallel_size,
                          softmax_dtype=cfg.softmax_dtype, allow_pickle=cfg.allow_pickle))
    if task not in tasks["loaded"]:  # built on first use and kept for the next model (building takes seconds)
        tasks["loaded"][task] = load_tasks({task: spec}, tasks["tm"], limit=cfg.limit, seed=cfg.seed,
                                           selection=cfg.selection)
    objs, samples = tasks["loaded"][task]
    return run_tasks(lm[0], objs, samples, tasks["tm"], limit=cfg.limit, seed=cfg.seed,
                     apply_chat_template=cfg.apply_chat_template, max_gen_toks=cfg.max_gen_toks or None)


def _merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One simple_evaluate-shaped result from per-task results: their per-task tables side by side."""
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key == "selfdistill":
                continue
            if isinstance(value, dict) and isinstance(merged.get(key, {}), dict):
                merged[key] = {**merged.get(key, {}), **value}
            else:
                merged.setdefault(key, value)
    return merged


def _finite(x: Any) -> Any:
    """NaN/inf -> None, so scores.json is strict JSON (e.g. a ratio over a parent scoring 0)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate `cfg.baseline` and every `cfg.model`; write results/, scores.json/.md/.png, manifest.json."""
    from selfdistill.evaluate.runner import resolve_backend, vllm_steps_aside
    from selfdistill.guard import claim_output
    from selfdistill.models import check_safe_weights, resolve_model

    started = time.time()
    if cfg.backend == "vllm" and vllm_steps_aside():
        log.info("rank %s: the vLLM backend evaluates in rank 0, on every GPU of the launch", os.environ["RANK"])
        return {"rank": int(os.environ["RANK"])}
    specs = select_tasks(cfg.preset, cfg.tasks)
    # The models first: a missing or unsafe model is the user's own error, named before the data folder is.
    names = list(dict.fromkeys(([cfg.baseline] if cfg.baseline else []) + list(cfg.model)))
    paths = {n: resolve_model(n) for n in names}
    for path in paths.values():
        check_safe_weights(path, cfg.allow_pickle)  # lm-eval's own loaders (data parallel, vLLM) skip load_model's
    data_dir = default_data_dir(cfg.data_dir)
    check_data_dir(data_dir, specs)  # only the files the chosen tasks read: hub tasks run without a data folder
    if all(s.local for s in specs.values()):  # local tasks never need the hub; fail fast instead of hanging
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    backend = resolve_backend(cfg.backend, cfg.preset, paths)  # before any model loads
    with claim_output(cfg.out, "evaluate", folder=True, overwrite=cfg.overwrite) as claim:
        claim.commit()  # results/ fills model by model: the record says whose folder it is meanwhile
        return _evaluate_all(cfg, specs, data_dir, names, paths, backend, started)


def _evaluate_all(cfg: EvalConfig, specs: dict[str, TaskSpec], data_dir: Path | None, names: list[str],
                  paths: dict[str, str], backend: str, started: float) -> dict[str, Any]:
    from selfdistill.evaluate.outputs import bar_chart, write_markdown
    from selfdistill.evaluate.runner import task_manager
    from selfdistill.models import resolve_device, resolve_dtype
    from selfdistill.rundir import atomic_write_json, write_manifest

    device = resolve_device(cfg.device)
    settings = _settings(cfg, specs, resolve_dtype(cfg.dtype, device), backend)
    tasks = {"specs": specs, "tm": task_manager(specs, data_dir), "loaded": {}}
    out = Path(cfg.out)
    labels: set[str] = set()
    raw: dict[str, dict[str, Any]] = {}
    for name in names:
        res, cached = _evaluate_one(name, paths[name], cfg, settings, tasks, device)
        if res is None:
            continue
        atomic_write_json(out / "results" / f"{model_label(name, labels)}.json", res)
        raw[name] = res
        log.info("%s: done (%s)", name, "cached" if cached else f"{res['selfdistill']['wall_time_s']:.0f} s")
    if not raw:  # non-zero ranks under accelerate launch write nothing
        return {"rank": int(os.environ.get("RANK", "0"))}
    scores = score_models(raw, specs, cfg.baseline or None, cfg.bootstrap_iters, cfg.seed)
    first = next(iter(raw.values()))
    scores["settings"] = settings | {
        "task_versions": first.get("versions", {}), "n_shot": first.get("n-shot", {}),
        "subset": (f"{cfg.selection} selection items per task outside the reported subset (seed {cfg.seed})"
                   if cfg.selection else f"seeded subsets (seed {cfg.seed})" if cfg.limit or cfg.preset == "cpu"
                   else "full splits"),
        "data_dir": str(data_dir) if data_dir else None,
        "wall_time_s": {n: r["selfdistill"]["wall_time_s"] for n, r in raw.items()}}
    atomic_write_json(out / "scores.json", _finite(scores))
    write_markdown(scores, out / "scores.md")
    bar_chart(scores, out / "scores.png")
    write_manifest(out, config=to_dict(cfg), inputs={n: p for n, p in paths.items() if Path(p).exists()},
                   seed=cfg.seed, started=started, writer="evaluate")
    return _finite(_summary(out, scores))


def _summary(out: Path, scores: dict[str, Any]) -> dict[str, Any]:
    """What the command prints: each model's accuracy retention and perplexity retention, where it has them."""
    models = scores["models"]
    summary: dict[str, Any] = {"out": str(out)}
    if scores["tasks"]:
        summary |= {"average": {n: m["average"] for n, m in models.items()},
                    "retention": {n: m.get("retention") for n, m in models.items()},
                    "chance_tasks": scores.get("chance_tasks", [])}
    if scores.get("perplexity_tasks"):
        summary["perplexity_retention"] = {n: {t: r["retention"] for t, r in m["perplexity_retention"].items()}
                                           for n, m in models.items() if m.get("perplexity_retention")}
    return summary
