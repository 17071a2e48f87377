"""`merge` stage: SLERP or linear merge of two same-shape children, optionally picking t on a grid.

Paper: arXiv 2410.09982 §5 merges children distilled on different data with SLERP. Beyond the paper,
`t_grid` merges at several t, scores each with the evaluate stage and keeps the best. The t grid is
scored on selection items drawn from outside the subset the evaluation reports (same preset, tasks, limit
and seed), so t is never chosen on the items it is then reported on.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfdistill.config import opt, to_dict
from selfdistill.console import progress
from selfdistill.errors import UserError
from selfdistill.guard import claim_output
from selfdistill.merge.linear import lerp
from selfdistill.merge.slerp import slerp
from selfdistill.rundir import atomic_dir, atomic_write_json, write_manifest

log = logging.getLogger(__name__)

METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {"slerp": slerp, "linear": lerp}

# Config entries that may differ between two mergeable children (bookkeeping, not shape). `auto_map` names
# custom code that was not run: both children were loaded as the built-in architecture.
_IGNORED_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "pruned", "removed",
                        "selfdistill", "auto_map")
# Compared first, so a mismatch is named by the shape that differs (28 vs 26 layers), not by a key that
# follows from it (layer_types) or one that sorts before it.
_SHAPE_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size")

Scorer = Callable[[Path], float]


@dataclass(frozen=True)
class MergeConfig:
    models: list[str] = opt([], "the two models to merge: A (t = 0) and B (t = 1)")
    method: str = opt("slerp", "merge method: slerp or linear")
    t: float = opt(0.5, "interpolation factor in [0, 1]: 0 gives A, 1 gives B")
    t_groups: list[str] = opt([], "per-tensor-group t as NAME_SUBSTRING=T, first match wins (e.g. self_attn=0.3 mlp=0.7)")
    t_grid: list[float] = opt([], "merge at each t, evaluate, keep the best (e.g. 0.25,0.5,0.75); overrides t")
    eval_preset: str = opt("cpu", "evaluate preset used to score the t grid (its mean score is maximised)")
    eval_tasks: list[str] = opt([], "tasks of the preset scoring the t grid (default: all)")
    eval_limit: int | None = opt(None, "the reported evaluation's --limit: its items are kept out of the t choice")
    eval_seed: int = opt(1234, "the reported evaluation's seed")
    eval_selection: int = opt(100, "items per task, outside the reported ones, that score each t")
    eval_data_dir: str = opt("", "offline data for the t-grid evaluation (evaluate's --data-dir)")
    dtype: str = opt("float32", "dtype to load, merge and save in: float32 or bfloat16")
    allow_pickle: bool = opt(False, "allow models whose weights are pickle (.bin) files: their tensors load with "
                                    "torch's weights_only=True", keyed=False)
    out: str = opt("merged", "output model folder")
    overwrite: bool = opt(False, "replace an existing --out that merge did not write", keyed=False)

    def __post_init__(self) -> None:
        if len(self.models) != 2:
            raise ValueError(f"models: give exactly two models to merge, got {len(self.models)}")
        if self.method not in METHODS:
            raise ValueError(f"method: unknown '{self.method}' (choose from {', '.join(METHODS)})")
        for name, value in [("t", self.t), *[(f"t_grid[{i}]", v) for i, v in enumerate(self.t_grid)]]:
            _check_t(name, value)
        parse_t_groups(self.t_groups)


def _check_t(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} = {value} is outside [0, 1]")


def parse_t_groups(items: list[str]) -> list[tuple[str, float]]:
    """['self_attn=0.3', 'mlp=0.7'] -> [('self_attn', 0.3), ('mlp', 0.7)]."""
    groups = []
    for item in items:
        pattern, sep, raw = item.partition("=")
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not sep or not pattern or math.isnan(value):
            raise ValueError(f"t_groups: '{item}' must look like NAME_SUBSTRING=T (e.g. mlp=0.7)")
        _check_t(f"t_groups '{pattern}'", value)
        groups.append((pattern, value))
    return groups


def t_for(name: str, t: float, groups: list[tuple[str, float]]) -> float:
    """The t of the first group whose substring occurs in the tensor name, else the default t."""
    return next((value for pattern, value in groups if pattern in name), t)


def check_compatible(a: Any, b: Any, names: tuple[str, str]) -> None:
    """Refuse to merge models of different architecture, shape or vocabulary (one-line error)."""
    if type(a) is not type(b):
        raise UserError(f"cannot merge {names[0]} ({type(a).__name__}) with {names[1]} ({type(b).__name__}): "
                        "different architectures")
    ca, cb = a.config.to_dict(), b.config.to_dict()
    rest = sorted(k for k in set(ca) | set(cb) if not k.startswith(_IGNORED_CONFIG_KEYS) and k not in _SHAPE_KEYS)
    for key in (*_SHAPE_KEYS, *rest):
        if ca.get(key) != cb.get(key):
            raise UserError(f"cannot merge {names[0]} with {names[1]}: config '{key}' differs "
                            f"({ca.get(key)!r} vs {cb.get(key)!r})")
    sa, sb = a.state_dict(), b.state_dict()
    for key in sorted(set(sa) ^ set(sb)):
        raise UserError(f"cannot merge {names[0]} with {names[1]}: tensor '{key}' exists in only one of them")
    for key, tensor in sa.items():
        if tensor.shape != sb[key].shape:
            raise UserError(f"cannot merge {names[0]} with {names[1]}: tensor '{key}' has shape "
                            f"{tuple(tensor.shape)} vs {tuple(sb[key].shape)}")


def merge_state(a: Any, b: Any, method: str, t: float, groups: list[tuple[str, float]] = ()) -> dict[str, torch.Tensor]:
    """Merged state dict of two compatible models; tied tensors stay tied because they merge identically."""
    fn = METHODS[method]
    sa, sb = a.state_dict(), b.state_dict()
    merged = {}
    for key in progress(sa, desc=f"{method} t={t}", disable=len(sa) < 50):
        pa, pb = sa[key], sb[key]
        if not torch.is_floating_point(pa):  # integer buffers cannot be interpolated; they must agree
            if not torch.equal(pa, pb):
                raise UserError(f"cannot merge: integer tensor '{key}' differs between the two models")
            merged[key] = pa.clone()
        else:
            merged[key] = fn(pa, pb, t_for(key, t, list(groups)))
    return merged


def _load_pair(cfg: MergeConfig) -> tuple[Any, Any, Any]:
    from selfdistill.models import load_model

    a, tok_a = load_model(cfg.models[0], dtype=cfg.dtype, allow_pickle=cfg.allow_pickle)
    b, tok_b = load_model(cfg.models[1], dtype=cfg.dtype, allow_pickle=cfg.allow_pickle)
    check_compatible(a, b, (cfg.models[0], cfg.models[1]))
    if tok_a is not None and tok_b is not None and tok_a.get_vocab() != tok_b.get_vocab():
        raise UserError(f"cannot merge {cfg.models[0]} with {cfg.models[1]}: their tokenizers differ")
    return a, b, tok_a


def _write_merged(a: Any, b: Any, tok: Any, cfg: MergeConfig, t: float, folder: Path) -> None:
    """Merge into a copy of A's module (same config, same tying) and save it as a plain HF folder."""
    import copy

    from selfdistill.models import write_model

    groups = parse_t_groups(cfg.t_groups)
    child = copy.deepcopy(a)
    child.load_state_dict(merge_state(a, b, cfg.method, t, groups))
    card = {"title": f"{cfg.method} merge (t = {t})", "merge_method": cfg.method, "parents": list(cfg.models),
            "t": t, "t_groups": dict(groups), "merged_by": "selfdistill merge"}
    child.config.selfdistill = {"merged_from": list(cfg.models), "merge_method": cfg.method, "t": t,
                                "t_groups": dict(groups)}
    write_model(child, tok, folder, card)


def default_scorer(cfg: MergeConfig) -> Scorer:
    """Score a model folder with the evaluate stage on selection items (outside the reported subset)."""
    from selfdistill.evaluate import EvalConfig, evaluate  # lazily: plain merges need no lm-eval

    def score(model_dir: Path) -> float:
        with tempfile.TemporaryDirectory(prefix="merge-eval-") as tmp:
            result = evaluate(EvalConfig(model=[str(model_dir)], preset=cfg.eval_preset, tasks=list(cfg.eval_tasks),
                                         limit=cfg.eval_limit, seed=cfg.eval_seed, selection=cfg.eval_selection,
                                         data_dir=cfg.eval_data_dir,
                                         out=tmp, bootstrap_iters=0, cache=False))
        return _mean_score(result, str(model_dir))

    return score


def _mean_score(result: dict[str, Any], name: str) -> float:
    """The model's mean score in evaluate's result: {"average": {model: mean}} (or a plain number)."""
    average = result.get("average")
    if isinstance(average, (int, float)):
        return float(average)
    if isinstance(average, dict) and average:
        value = average.get(name, next(iter(average.values())) if len(average) == 1 else None)
        if isinstance(value, (int, float)):
            return float(value)
    raise UserError(f"merge --t-grid: cannot find a mean score in evaluate's result (keys: {sorted(result)})")


def merge(cfg: MergeConfig, scorer: Scorer | None = None) -> dict[str, Any]:
    """Merge `cfg.models` into `cfg.out` (HF folder + card + manifest.json last); grid-search t if asked."""
    with claim_output(cfg.out, "merge", folder=True, overwrite=cfg.overwrite):
        return _merge(cfg, scorer, time.time())


def _merge(cfg: MergeConfig, scorer: Scorer | None, started: float) -> dict[str, Any]:
    a, b, tok = _load_pair(cfg)
    inputs = {f"model_{i}": m for i, m in enumerate(cfg.models) if Path(m).exists()}
    with atomic_dir(cfg.out) as tmp:
        if cfg.t_grid:
            best_t, scores = _grid(a, b, tok, cfg, tmp, scorer or default_scorer(cfg))
            atomic_write_json(tmp / "grid.json", {
                "scores": scores, "best_t": best_t, "preset": cfg.eval_preset, "tasks": list(cfg.eval_tasks),
                "items": f"{cfg.eval_selection} per task drawn (seed {cfg.eval_seed} + 1) from outside the reported "
                         f"subset (limit {cfg.eval_limit}, seed {cfg.eval_seed})"})
        else:
            best_t, scores = cfg.t, {}
            _write_merged(a, b, tok, cfg, cfg.t, tmp)
        write_manifest(tmp, config=to_dict(cfg), inputs=inputs, started=started,
                       extra={"t": best_t, "grid_scores": scores}, writer="merge")
    log.info("merged %s + %s (%s, t = %s) into %s", *cfg.models, cfg.method, best_t, cfg.out)
    return {"out": str(cfg.out), "method": cfg.method, "t": best_t, "t_groups": list(cfg.t_groups),
            "grid_scores": scores}


def _grid(a: Any, b: Any, tok: Any, cfg: MergeConfig, final: Path, scorer: Scorer) -> tuple[float, dict[str, float]]:
    """Merge at each t into a scratch folder, score it, and move the best one's files into `final`."""
    scores: dict[str, float] = {}
    best: tuple[float, float] | None = None
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".merge-grid-") as scratch:
        for t in cfg.t_grid:
            folder = Path(scratch) / f"t{t}"
            folder.mkdir()
            _write_merged(a, b, tok, cfg, t, folder)
            score = float(scorer(folder))
            scores[str(t)] = score
            log.info("t = %s: score %.4f", t, score)
            if best is None or score > best[1]:
                best = (t, score)
        assert best is not None
        for f in (Path(scratch) / f"t{best[0]}").iterdir():
            shutil.move(str(f), final / f.name)
    return best[0], scores
