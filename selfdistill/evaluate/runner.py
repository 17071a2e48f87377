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
import random
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


def vllm_parallel(tensor_parallel_size: int) -> dict[str, int]:
    """lm-eval vLLM sizes for this launch: one process drives every GPU of the launch (WORLD_SIZE of them),
    as WORLD_SIZE / tp replicas through lm-eval's own (Ray) data parallelism; see `vllm_steps_aside`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tensor_parallel_size < 1 or world % tensor_parallel_size:
        raise UserError(f"--tensor-parallel-size {tensor_parallel_size} must divide the process count {world}")
    return {"tensor_parallel_size": tensor_parallel_size, "data_parallel_size": world // tensor_parallel_size}


def vllm_steps_aside() -> bool:
    """True on the ranks other than 0 of a launch: lm-eval's vLLM backend does not shard by rank (each rank
    would evaluate everything), so rank 0 evaluates on all the launch's GPUs and the others wait."""
    return int(os.environ.get("RANK", "0")) != 0


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


# A rolling (perplexity) window is max_length tokens, each of which goes through the LM head: HFLM scores
# --batch-size windows per forward, whose logits (SmolLM2: 16 x 8192 x 49,152 in fp32) need 26 GB. At most this
# many window tokens per forward (one window at least) bounds that to about 3 GB for SmolLM2, whatever the
# batch size of the other tasks; the windows and their log-likelihoods are HFLM's own.
ROLLING_TOKENS = 8192


def bound_rolling_batches(lm: Any) -> Any:
    """Make `lm` (HFLM or a subclass) score at most ROLLING_TOKENS tokens of rolling windows per forward."""
    rolling = lm.loglikelihood_rolling

    def bounded(requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        saved = lm.batch_size_per_gpu
        if isinstance(saved, int):  # "auto" lets HFLM probe its own largest batch
            lm.batch_size_per_gpu = max(1, min(saved, ROLLING_TOKENS // lm.max_length))
        try:
            return rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            lm.batch_size_per_gpu = saved

    lm.loglikelihood_rolling = bounded
    return lm


def make_lm(name: str, path: str, *, backend: str, dtype: str, device: str, batch_size: int,
            max_length: int | None, tensor_parallel_size: int = 1, softmax_dtype: str = "float32",
            allow_pickle: bool = False) -> Any:
    """An lm-eval LM: HFLM (or our shared-context subclass) wrapping our loaded model, or lm-eval's vLLM.

    `softmax_dtype` "model" leaves HFLM's default (the logits' dtype); vLLM computes its own log-probs."""
    from selfdistill.models import check_safe_weights

    check_safe_weights(path, allow_pickle)  # lm-eval loads `path` itself below (vLLM, data parallel): same refusal
    if backend == "vllm":
        try:
            from lm_eval.models.vllm_causallms import VLLM
        except ImportError as e:
            raise UserError(f"--backend vllm: vLLM is not installed ({e}); pip install 'selfdistill[vllm]'") from e
        return VLLM(pretrained=path, dtype=dtype, batch_size=batch_size, max_length=max_length,
                    **vllm_parallel(tensor_parallel_size))
    from lm_eval.models.huggingface import HFLM

    from selfdistill.evaluate.shared import SharedContextLM

    lm_class = SharedContextLM if backend == "shared" else HFLM
    softmax = {"softmax_dtype": softmax_dtype} if softmax_dtype != "model" else {}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Data parallel under `accelerate launch`/torchrun: HFLM must load the model itself to shard the requests.
        import torch

        if not torch.cuda.is_available():
            # Without this, accelerate on CPU sees one process per rank (each rank would evaluate everything)
            # and transformers' loader then probes CUDA and crashes; with it, ranks shard over gloo.
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")
        return bound_rolling_batches(lm_class(pretrained=path, dtype=dtype, batch_size=batch_size,
                                              max_length=max_length, **softmax))
    from selfdistill.models import load_model

    try:
        model, tok = load_model(name, dtype=dtype, device=device, allow_pickle=allow_pickle)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad --model for the user
        raise UserError(f"--model {name}: cannot be loaded ({type(e).__name__}: {e})") from e
    return bound_rolling_batches(lm_class(pretrained=model, tokenizer=tok, batch_size=batch_size,
                                          max_length=max_length, device=device, **softmax))


def load_tasks(specs: dict[str, TaskSpec], tm: Any, *, limit: int | None, seed: int,
               selection: int | None = None) -> tuple[list[Any], dict[str, list[int]] | None]:
    """lm-eval Task/Group objects with their own shots, and the fixed document subsets (local presets).

    With `selection`, the documents are instead drawn from outside the subset that would be reported, so a
    setting chosen on them is not chosen on the items it is then reported on.
    Loaded once per call and reused for every model (building MMLU/HellaSwag takes seconds)."""
    objs: list[Any] = []
    samples: dict[str, list[int]] = {}
    local = all(s.local for s in specs.values())
    for spec in specs.values():
        loaded = tm.load([spec.task])
        for task in loaded["tasks"].values():  # a group (mmlu) sets the shots of all its leaves
            task.set_config(key="num_fewshot", value=spec.shots)
        group = loaded["groups"].get(spec.task)
        if local or selection:
            size = limit if limit is not None else spec.size
            drawn = _group_subset(loaded["tasks"], size, seed, selection, pooled=local)
            samples.update(drawn)
            if group is not None and drawn:
                _drop_undrawn(group, set(drawn))
        objs.append(group or loaded["tasks"][spec.task])
    return objs, samples or None


def _group_subset(leaves: dict[str, Any], size: int | None, seed: int, selection: int | None = None,
                  pooled: bool = True) -> dict[str, list[int]]:
    """A seeded subset of `size` documents drawn over all leaves of a task or group, as indices per leaf.

    A group's documents are pooled so `size` counts the group's items, like a single task's, and each
    subject is represented in proportion to its size, as in the size-weighted group score. Leaves are pooled in
    name order, which for MMLU is the order of the subject files: the same seed draws the same items as the
    single all-subjects task did before (and a single task's pool index is its document index).
    With `selection`, `selection` documents are drawn (seed + 1) from outside that subset instead; for hub
    tasks (`pooled=False`) the reported subset is lm-eval's first `size` documents of each leaf."""
    pool = [(name, i) for name, task in sorted(leaves.items()) for i in range(len(task.eval_docs))]
    if pooled:
        picked = subset(len(pool), size, seed)
        reported = set(range(len(pool)) if picked is None else picked)
    else:
        reported = {k for k, (_, i) in enumerate(pool) if size is None or i < size}
    if selection:
        rest = [k for k in range(len(pool)) if k not in reported]
        if not rest:
            raise UserError(f"--selection: {', '.join(sorted(leaves))} report all their {len(pool)} items; "
                            "lower --limit to leave some")
        picked = sorted(random.Random(seed + 1).sample(rest, min(selection, len(rest))))
    elif not pooled or len(reported) == len(pool):
        return {}
    else:
        picked = sorted(reported)
    out: dict[str, list[int]] = {}
    for k in picked:
        name, i = pool[k]
        out.setdefault(name, []).append(i)
    return out


def _drop_undrawn(group: Any, keep: set[str]) -> bool:
    """Remove the leaves without drawn documents (lm-eval would run all of a leaf given none) and the
    sub-groups left empty; True when `group` itself is left empty."""
    from lm_eval.api.group import Group

    for child in list(group):
        name = child.name if isinstance(child, Group) else child.task_name
        if (_drop_undrawn(child, keep) if isinstance(child, Group) else name not in keep):
            group.pop(name)
    return len(group) == 0


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
