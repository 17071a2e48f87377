"""Perplexities of the language-modelling tasks, and their own retention (parent ppl / child ppl x 100).

lm-eval logs, per document, the summed log-likelihood of the scored text (LAMBADA: of the target word;
WikiText: of the whole article) and, for the weighted metrics, its size in words or bytes. A perplexity is
exp(-sum(ll) / sum(size)) over the documents (size 1 for LAMBADA, which makes it lm-eval's
exp(-mean(ll))); bits per byte is -sum(ll) / sum(bytes) / ln 2, exactly lm-eval's aggregations.
Perplexity is not an accuracy: a lower value is better and ratios of it are not on the accuracy scale, so
its retention is kept apart and never averaged into the accuracy retention.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# lm-eval metric name -> how it aggregates ("ppl": exp(-sum ll / sum size); "bpb": bits per byte)
METRICS = {"perplexity": "ppl", "word_perplexity": "ppl", "byte_perplexity": "ppl", "bits_per_byte": "bpb"}


def per_doc_ll(samples: list[dict[str, Any]], metric_key: str) -> dict[Any, tuple[float, float]]:
    """doc_id -> (log-likelihood, size) for one perplexity `metric,filter` key from lm-eval's samples."""
    metric, _, filt = metric_key.partition(",")
    out = {}
    for s in samples:
        if s.get("filter", "none") != filt or metric not in s:
            continue
        v = s[metric]
        out[s["doc_id"]] = (float(v[0]), float(v[1])) if isinstance(v, list | tuple) else (float(v), 1.0)
    return out


def aggregate(pairs: np.ndarray, how: str) -> float:
    """lm-eval's aggregation of (ll, size) rows: a perplexity or bits per byte."""
    if not len(pairs) or pairs[:, 1].sum() <= 0:
        return float("nan")
    mean = pairs[:, 0].sum() / pairs[:, 1].sum()
    return -mean / math.log(2) if how == "bpb" else math.exp(-mean)


def perplexity_score(samples: list[dict[str, Any]], metric_key: str) -> dict[str, Any]:
    """The headline perplexity of a task, and every other perplexity-type metric its samples carry."""
    pairs = np.array(list(per_doc_ll(samples, metric_key).values())).reshape(-1, 2)
    out: dict[str, Any] = {"metric": metric_key, "value": aggregate(pairs, "ppl"), "n": len(pairs)}
    filt = metric_key.partition(",")[2]
    for name, how in METRICS.items():
        key = f"{name},{filt}"
        if key != metric_key and any(name in s for s in samples):
            out[name] = aggregate(np.array(list(per_doc_ll(samples, key).values())).reshape(-1, 2), how)
    return out


def perplexity_retention(child: dict[Any, tuple[float, float]], parent: dict[Any, tuple[float, float]], *,
                         iters: int = 2000, seed: int = 0) -> dict[str, Any]:
    """parent ppl / child ppl x 100 over the documents both scored (100: the parent's; below: worse), and its
    95 % interval from a paired bootstrap over documents (the same draw for both models)."""
    ids = sorted(set(child) & set(parent), key=str)
    if not ids:
        return {"retention": float("nan"), "ci95": [float("nan")] * 2, "n": 0}
    p = np.array([parent[i] for i in ids])
    c = np.array([child[i] for i in ids])
    full = aggregate(p, "ppl") / aggregate(c, "ppl") * 100
    idx = np.random.default_rng(seed).integers(0, len(ids), size=(iters, len(ids)))
    # ppl_p / ppl_c = exp(mean_ll_c - mean_ll_p), mean_ll = sum(ll) / sum(size) over the draw
    mean_p = p[idx, 0].sum(axis=1) / p[idx, 1].sum(axis=1)
    mean_c = c[idx, 0].sum(axis=1) / c[idx, 1].sum(axis=1)
    ratio = np.exp(mean_c - mean_p) * 100
    return {"retention": float(full), "ci95": [float(np.percentile(ratio, 2.5)), float(np.percentile(ratio, 97.5))],
            "n": len(ids)}
