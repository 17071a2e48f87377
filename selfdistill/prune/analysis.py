"""The block analysis (every block's score and the held-out check) cached by everything it depends on.

`block_analysis` scores every block and checks the candidates on held-out rows. Prune variants of one parent
on one calibration set (another repair, another `select_by`) need the same scores; a study cutting eight
children would otherwise score the same 256 rows eight times. The key holds the model's and the calibration
file's contents, every setting that shapes the analysis and the analysis code; a model or data source that is
not a local path (a hub id) is not cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from selfdistill.models import cache_dir, resolve_model
from selfdistill.prune.candidates import check_candidates
from selfdistill.prune.scoring import SCORERS, LayerScores
from selfdistill.rundir import atomic_write_json, hash_path

log = logging.getLogger(__name__)
SHAPING = ("recipe", "split", "calibration_samples", "heldout_samples", "max_length", "chat_template", "shuffle",
           "seed", "batch_size", "scorer", "dtype", "on_bad_row")


def analysis_key(cfg: Any, n: int, every: bool, device: str) -> str | None:
    model, data = hash_path(resolve_model(cfg.model)), hash_path(cfg.calibration) if cfg.calibration else ""
    if not model or not data:
        return None
    blob = {k: getattr(cfg, k) for k in SHAPING} | {"model": model, "data": data, "n": n, "device": device,
                                                    "candidates": "all" if every else cfg.candidates,
                                                    "code": _code_hash()}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _code_hash() -> str:
    """The analysis code itself: a changed scorer never serves an old result."""
    from selfdistill.prune import calibration, candidates, scoring

    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (calibration, candidates, scoring))).hexdigest()


def _path(key: str) -> Path:
    return cache_dir() / "prune" / f"{key}.json"


def load_analysis(key: str | None) -> tuple[LayerScores, dict[str, Any] | None] | None:
    if key is None or not _path(key).is_file():
        return None
    data = json.loads(_path(key).read_text(encoding="utf-8"))
    log.info("block scores and held-out check from the cache: %s", _path(key))
    return LayerScores(**data["scores"]), data["check"]


def store_analysis(key: str | None, scores: LayerScores, check: dict[str, Any] | None) -> None:
    if key is not None:
        atomic_write_json(_path(key), {"scores": dataclasses.asdict(scores), "check": check})


def block_analysis(cfg: Any, model: Any, data: Any, n: int, explicit: list[int] | None,
                   every: bool, device: str) -> tuple[LayerScores | None, dict[str, Any] | None]:
    """Every block's score and the held-out check of the candidates (cached: variants share them)."""
    if data is None:
        return None, None
    key = analysis_key(cfg, n, every, device) if explicit is None else None
    hit = load_analysis(key)
    if hit is not None:
        return hit
    scores = SCORERS[cfg.scorer](model, data.batches, n)
    removed = explicit if explicit is not None else scores.removed
    check = check_candidates(model, scores, removed, data.heldout, None if every else cfg.candidates)
    store_analysis(key, scores, check)
    return scores, check
