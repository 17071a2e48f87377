"""Run lm-evaluation-harness on one model: HFLM around an already-loaded model, tasks from a preset.

Tasks are loaded once per call, shots are set per task (the leaderboard mixes 0/5/10/25), subsets are
passed to lm-eval as explicit document indices, and the full lm-eval output (samples included) is
returned so scores can be re-derived and paired-bootstrapped later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from selfdistill.errors import UserError
from selfdistill.evaluate.presets import TASKS_DIR, TaskSpec, subset

log = logging.getLogger(__name__)


def task_manager(specs: dict[str, TaskSpec], data_dir: Path | None) -> Any:
    from lm_eval.tasks import TaskManager

    local = all(s.local for s in specs.values())
    # Indexing lm-eval's ~10k built-in YAMLs costs seconds; the local presets need only ours.
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=not local,
                       metadata={"data_dir": str(data_dir) if data_dir else ""})


BACKENDS = ("auto", "hf", "shared", "vllm")
# `auto` picks `shared` for the presets that run on our local task files (measured to give HFLM's scores,
# docs/evaluate.md); the hub suite keeps plain HFLM, the leaderboard's own scorer.
SHARED_BY_DEFAULT = ("cpu", "openllm-v1-local")


def resolve_backend(backend: str, preset: str, paths: dict[str, str]) -> str:
    """The backend every model of this run uses; `shared` is checked against each model's config, unloaded."""
    if backend not in BACKENDS:
        raise UserError(f"--backend: unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if backend == "auto" and preset not in SHARED_BY_DEFAULT:
        return "hf"
    if backend not in ("auto", "shared"):
        return backend
    from transformers import AutoConfig

    from selfdistill.evaluate.shared import unservable_reason

    for name, path in paths.items():
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception:  # noqa: BLE001 - a broken model fails when it loads, in its turn, naming itself
            continue
        if (reason := unservable_reason(config)) is not None:
            if backend == "auto":  # one backend for the whole run, so every model is scored alike
                log.info("backend auto: hf, because %s: %s", name, reason)
                return "hf"
            raise UserError(f"--backend shared cannot serve --model {name}: {reason} (use --backend hf)")
    return "shared"


def make_lm(name: str, path: str, *, backend: str, dtype: str, device: str, batch_size: int,
            max_length: int | None) -> Any:
    """An lm-eval LM: HFLM (or our shared-context subclass) wrapping our loaded model, or lm-eval's vLLM."""
    if backend == "vllm":
        try:
            from lm_eval.models.vllm_causallms import VLLM
        except ImportError as e:
            raise UserError(f"--backend vllm: vLLM is not installed ({e}); pip install 'selfdistill[vllm]'") from e
        return VLLM(pretrained=path, dtype=dtype, batch_size=batch_size, max_length=max_length)
    from lm_eval.models.huggingface import HFLM

    from selfdistill.evaluate.shared import SharedContextLM

    lm_class = SharedContextLM if backend == "shared" else HFLM
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Data parallel under `accelerate launch`/torchrun: HFLM must load the model itself to shard the requests.
        import torch

        if not torch.cuda.is_available():
            # Without this, accelerate on CPU sees one process per rank (each rank would evaluate everything)
            # and transformers' loader then probes CUDA and crashes; with it, ranks shard over gloo.
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")
        return lm_class(pretrained=path, dtype=dtype, batch_size=batch_size, max_length=max_length)
    from selfdistill.models import load_model

    try:
        model, tok = load_model(name, dtype=dtype, device=device)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad --model for the user
        raise UserError(f"--model {name}: cannot be loaded ({type(e).__name__}: {e})") from e
    return lm_class(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_length, device=device)


def load_tasks(specs: dict[str, TaskSpec], tm: Any, *, limit: int | None,
               seed: int) -> tuple[list[Any], dict[str, list[int]] | None]:
    """lm-eval Task/Group objects with their own shots, and the fixed document subsets (local presets).

    Loaded once per call and reused for every model (building MMLU/HellaSwag takes seconds)."""
    objs: list[Any] = []
    samples: dict[str, list[int]] = {}
    local = all(s.local for s in specs.values())
    for spec in specs.values():
        loaded = tm.load([spec.task])
        for name, task in loaded["tasks"].items():  # a group (hub mmlu) sets the shots of all its leaves
            task.set_config(key="num_fewshot", value=spec.shots)
            if local and (idx := subset(len(task.eval_docs), limit if limit is not None else spec.size, seed)):
                samples[name] = idx
        objs.append(loaded["groups"].get(spec.task) or loaded["tasks"][spec.task])
    return objs, samples or None


def run_tasks(lm: Any, objs: list[Any], samples: dict[str, list[int]] | None, tm: Any, *, limit: int | None,
              seed: int, apply_chat_template: bool, max_gen_toks: int | None) -> dict[str, Any] | None:
    """simple_evaluate over prepared tasks; None on non-zero ranks of a data-parallel run."""
    import lm_eval

    gen_kwargs = {"max_gen_toks": max_gen_toks} if max_gen_toks else None
    # Task objects keep their shots: simple_evaluate overrides them only when num_fewshot is given.
    return lm_eval.simple_evaluate(
        model=lm, tasks=objs, task_manager=tm, samples=samples, limit=None if samples else limit,
        log_samples=True, bootstrap_iters=0, apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=apply_chat_template, gen_kwargs=gen_kwargs, random_seed=seed,
        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)


def cache_key(model_hash: str, settings: dict[str, Any]) -> str:
    blob = json.dumps({"model": model_hash, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
