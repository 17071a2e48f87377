"""Cached parent logits for KD: the parent runs once per distilled dataset, not once per arm and epoch.

For every answer position of every training row the cache keeps the parent's top-k log-probabilities
(at the KD temperature), their token ids and the log of the remaining mass, in safetensors shards beside
the data (`<data>.kd-<responses>-k<k>-t<T>/`, with `meta.json`). KD then compares the child with a
(k+1)-bucket distribution: the k tokens plus "everything else", whose child probability is the child's
mass outside those k. With k = vocabulary size this is exactly KD from the live parent; with k = 64 it
keeps what matters at a fraction of the memory (the ask in huggingface/trl issues 2255 and 3055).

A cache belongs to one parent and one tokenized dataset: `meta.json` records the parent's content hash
and a fingerprint of every row's token ids and answer mask, and a mismatch is a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from selfdistill.errors import UserError
from selfdistill.finetune.kd import DIVERGENCES
from selfdistill.finetune.logits import answer_logits

log = logging.getLogger(__name__)
SHARD_ROWS = 512
_FLOOR = -1e4  # log-prob standing in for log 0: exp() is exactly 0, and 0 * finite stays 0 in the KL


def row_key(input_ids: list[int]) -> str:
    return hashlib.sha1(torch.tensor(input_ids, dtype=torch.int64).numpy().tobytes()).hexdigest()


def fingerprint(rows: list[dict[str, list[int]]]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(row_key(row["input_ids"]).encode())
        h.update(bytes(row["completion_mask"]))
    return h.hexdigest()[:32]


def cache_dir(data: str, responses: str, top_k: int, temperature: float) -> Path:
    path = Path(data).expanduser()
    return path.with_name(f"{path.stem}.kd-{responses}-k{top_k}-t{temperature:g}")


def answer_positions(mask: list[int]) -> list[int]:
    """Positions t whose next token is an answer token: where the logits are compared."""
    return [t for t in range(len(mask) - 1) if mask[t + 1]]


def _rest(logp: Any, idx: Any) -> Any:
    """log of the probability mass outside `idx`, per row (the floor when none is left)."""
    outside = logp.scatter(-1, idx, float("-inf"))
    return torch.logsumexp(outside, -1).clamp(min=_FLOOR)


@torch.no_grad()
def build(teacher: Any, rows: list[dict[str, list[int]]], top_k: int, temperature: float, folder: Path,
          meta: dict[str, Any], batch_size: int = 8) -> None:
    """Run the parent over `rows` and write the shards and meta.json into `folder` (atomically)."""
    from safetensors.torch import save_file

    from selfdistill.rundir import atomic_dir

    device = next(teacher.parameters()).device
    with atomic_dir(folder) as tmp:
        shards = []
        for s, start in enumerate(range(0, len(rows), SHARD_ROWS)):
            part = rows[start:start + SHARD_ROWS]
            values, indices, rests, offsets = [], [], [], [0]
            for b in range(0, len(part), batch_size):
                v, i, r, n = _teacher_topk(teacher, part[b:b + batch_size], top_k, temperature, device)
                values.append(v), indices.append(i), rests.append(r)
                for count in n:
                    offsets.append(offsets[-1] + count)
            name = f"shard-{s:05d}.safetensors"
            save_file({"values": torch.cat(values), "indices": torch.cat(indices), "rest": torch.cat(rests),
                       "offsets": torch.tensor(offsets)}, str(tmp / name))
            shards.append({"file": name, "rows": len(part)})
        keys = [row_key(r["input_ids"]) for r in rows]
        (tmp / "meta.json").write_text(json.dumps({**meta, "shards": shards, "row_keys": keys}), encoding="utf-8")


def _teacher_topk(teacher: Any, batch: list[dict[str, list[int]]], top_k: int, temperature: float,
                  device: Any) -> tuple[Any, Any, Any, list[int]]:
    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    attn = torch.zeros(len(batch), width, dtype=torch.long)
    keep = torch.zeros(len(batch), width, dtype=torch.bool)
    for j, r in enumerate(batch):  # right-padded: a row's positions are those of the row alone
        ids[j, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        attn[j, :len(r["input_ids"])] = 1
        keep[j, answer_positions(r["completion_mask"])] = True
    logits = answer_logits(teacher, {"input_ids": ids.to(device), "attention_mask": attn.to(device)},
                           keep.to(device)).logits
    logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float() / temperature, -1)
    values, idx = logp.topk(min(top_k, logp.shape[-1]), -1)
    return values.cpu(), idx.to(torch.int32).cpu(), _rest(logp, idx).cpu(), [int(k.sum()) for k in keep]


class KDCache:
    """The cached parent distribution of every training row, looked up by the row's token ids."""

    def __init__(self, folder: Path) -> None:
        from safetensors.torch import load_file

        self.meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        self.rows: dict[str, tuple[Any, Any, Any]] = {}
        keys = iter(self.meta["row_keys"])
        for shard in self.meta["shards"]:
            t = load_file(str(folder / shard["file"]))
            off = t["offsets"].tolist()
            for r in range(shard["rows"]):
                sl = slice(off[r], off[r + 1])
                self.rows[next(keys)] = (t["values"][sl], t["indices"][sl].long(), t["rest"][sl])
        self.temperature = float(self.meta["temperature"])

    def lookup(self, inputs: dict[str, Any]) -> tuple[Any, Any, Any]:
        """(log-probs [n, k], ids [n, k], rest [n]) for the batch's answer positions, in logits order."""
        parts = [self.rows.get(row_key(seg)) for seg in _segments(inputs)]
        if any(p is None for p in parts):
            raise RuntimeError("a training row is not in the KD cache (the data changed after it was built)")
        device = inputs["input_ids"].device
        return tuple(torch.cat([p[j] for p in parts]).to(device) for j in range(3))  # type: ignore[return-value]


def _segments(inputs: dict[str, Any]) -> list[list[int]]:
    """Each training row of the batch: split at position 0 when padding-free, else by the attention mask."""
    ids, segments = inputs["input_ids"], []
    for b in range(ids.shape[0]):
        if "position_ids" in inputs and inputs["position_ids"] is not None:
            starts = (inputs["position_ids"][b] == 0).nonzero()[:, 0].tolist() + [ids.shape[1]]
            segments += [ids[b, s:e].tolist() for s, e in zip(starts, starts[1:]) if e > s]
        else:
            n = int(inputs["attention_mask"][b].sum()) if "attention_mask" in inputs else ids.shape[1]
            segments.append(ids[b, :n].tolist())
    return segments


def cached_divergence(student_logits: Any, cached: tuple[Any, Any, Any], loss: str, temperature: float) -> Any:
    """Per-token divergence between the child and the cached (k+1)-bucket parent distribution."""
    values, idx, rest = cached
    log_q = torch.log_softmax(student_logits.float() / temperature, -1)
    student = torch.cat([log_q.gather(-1, idx), _rest(log_q, idx)[:, None]], -1)
    teacher = torch.cat([values, rest[:, None]], -1)
    return DIVERGENCES[loss](student, teacher, 1.0) * temperature**2


def open_cache(cfg: Any, rows: list[dict[str, list[int]]], load_teacher: Any) -> KDCache:
    """The cache for `cfg`'s data and parent: reused when it matches, built (with the parent) when absent."""
    from selfdistill.models import resolve_model
    from selfdistill.rundir import hash_path

    folder = Path(cfg.kd_cache_dir).expanduser() if cfg.kd_cache_dir else \
        cache_dir(cfg.data, cfg.responses, cfg.kd_top_k, cfg.kd_temperature)
    meta = {"teacher": str(cfg.teacher), "teacher_hash": hash_path(resolve_model(cfg.teacher)),
            "data": fingerprint(rows), "responses": cfg.responses, "top_k": cfg.kd_top_k,
            "temperature": cfg.kd_temperature}
    if (folder / "meta.json").is_file():
        old = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if old.get("teacher_hash") != meta["teacher_hash"]:
            raise UserError(f"KD cache {folder} was made with another parent ({old.get('teacher')}); "
                            "remove it or set kd_cache_dir")
        if old.get("data") != meta["data"]:
            raise UserError(f"KD cache {folder} was made from other data (rows, answers, tokenizer or max_length "
                            "differ); remove it or set kd_cache_dir")
        if (old.get("top_k"), old.get("temperature")) != (meta["top_k"], meta["temperature"]):
            raise UserError(f"KD cache {folder} holds top-{old.get('top_k')} at T={old.get('temperature')}, "
                            f"not top-{meta['top_k']} at T={meta['temperature']}; set kd_cache_dir")
        log.info("KD: reusing the parent's cached logits in %s", folder)
        return KDCache(folder)
    log.info("KD: caching the parent's top-%d logits of %d rows in %s", cfg.kd_top_k, len(rows), folder)
    teacher = load_teacher()
    teacher.eval()
    build(teacher, rows, cfg.kd_top_k, cfg.kd_temperature, folder, meta)
    del teacher
    return KDCache(folder)
