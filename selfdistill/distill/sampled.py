"""Seeded sampling per (row, attempt) on the refilling engine, with one prefill per distinct prompt.

Best-of-k distillation (distill/attempts.py) samples several attempts of the same rewrite prompt. Two
things the plain engine does not give it:

- Reproducibility per attempt. The plain engine draws every row's token from one generator, so a row's
  sample depends on which rows share its batch, and a resumed run would sample other attempts. Here each
  prompt carries its own key (derived from seed, row id and attempt); its t-th token is drawn by inverse
  CDF over the top-p nucleus with the uniform `token_uniform(key, t)`, independent of the batch.
- One prefill per prompt. Copies of one prompt that land in the same prefill chunk run through the model
  once; their KV (and last-position logits) are copied to every copy's slot. Copies then decode apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

from selfdistill.engine import GenParams, RefillEngine, Result
from selfdistill.models import cache_kwargs

_MASK = (1 << 64) - 1


def attempt_key(seed: int, row_id: str, attempt: int) -> int:
    """A 63-bit key for one (seed, row, attempt): the same on every run, machine and batch."""
    digest = hashlib.blake2b(f"{seed}\x00{row_id}\x00{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def token_uniform(key: int, t: int) -> float:
    """Uniform in [0, 1) for token t of the prompt keyed `key` (splitmix64 of key and t)."""
    z = (key + (t + 1) * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


def sample_rows(logits: Any, params: GenParams, uniforms: list[float]) -> Any:
    """One token per row of `logits` [rows, vocab], by inverse CDF over the top-p nucleus at `uniforms`."""
    import torch

    probs = torch.softmax(logits.float() / params.temperature, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    cum = sorted_p.cumsum(-1)
    # The nucleus is the smallest prefix reaching top_p (the same set the engine's choose_tokens keeps).
    size = ((cum - sorted_p) <= params.top_p).sum(-1).clamp(min=1)
    mass = cum.gather(-1, (size - 1)[:, None])[:, 0]
    u = torch.tensor(uniforms, dtype=cum.dtype, device=cum.device)
    pick = torch.searchsorted(cum, (u * mass)[:, None], right=True)[:, 0]
    pick = torch.minimum(pick, size - 1)
    return order.gather(-1, pick[:, None])[:, 0]


class SeededEngine(RefillEngine):
    """The refilling engine, sampling each prompt's tokens from its own key; identical prompts prefill once."""

    def __init__(self, model: Any, params: GenParams, pad_id: int, keys: dict[int, int]) -> None:
        if params.temperature <= 0:
            raise ValueError("SeededEngine samples; use RefillEngine for greedy decoding")
        super().__init__(model, params, pad_id)
        self.keys = keys
        self.prefilled_tokens = 0  # prompt tokens that ran through the model (shared copies count once)
        self._rows: list[tuple[int | None, int]] = []  # (prompt index, token number) per logits row
        self._expand: Any = None  # prefill: logits row of each copy

    def _forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, cache: Any, keep: int = 1,
                 **extra: Any) -> Any:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=keep, **cache_kwargs(self.model, cache), **extra)
        logits = out.logits[:, -1] if keep == 1 else out.logits[0]
        if self._expand is not None:
            logits = logits[self._expand.to(logits.device)]
        uniforms = [token_uniform(self.keys.get(index, 0) if index is not None else 0, t) for index, t in self._rows]
        return sample_rows(logits, self.params, uniforms)

    def _prefill(self, chunk: list[tuple[int, list[int]]]) -> tuple[Any, Any, Any]:
        import torch

        where: dict[tuple[int, ...], int] = {}
        unique, expand = [], []
        for index, prompt in chunk:
            if tuple(prompt) not in where:
                where[tuple(prompt)] = len(unique)
                unique.append((index, prompt))
            expand.append(where[tuple(prompt)])
        self._expand, self._rows = torch.tensor(expand), [(index, 0) for index, _ in chunk]
        try:
            kv, first, attn = super()._prefill(unique)
        finally:
            self._expand = None
        self.prefilled_tokens += sum(len(p) for _, p in unique)
        rows = torch.tensor(expand)
        # every copy gets the one prefill's KV in its own slot
        kv = [(k[rows.to(k.device)], v[rows.to(k.device)]) for k, v in kv]
        return kv, first, attn[rows]

    def _step(self) -> Iterator[Result]:
        # Sampling never drafts, so a packed step has one logits row per live slot, in slot order; a batch
        # step (models without the slot attention) has one per slot, free or not.
        slots = range(len(self.owner)) if not self.ragged else [s for s, o in enumerate(self.owner) if o is not None]
        self._rows = [(self.owner[s], len(self.out[s])) for s in slots]
        yield from super()._step()


def generate_seeded(model: Any, tokenizer: Any, prompts: Iterable[tuple[int, list[int]]], params: GenParams,
                    keys: dict[int, int], counters: dict[str, int] | None = None) -> Iterator[Result]:
    """Sampled generation where prompt `index` draws its tokens from `keys[index]`; adds
    `prefilled_tokens` to `counters` when done."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else params.stop_ids[0]
    engine = SeededEngine(model, params, pad, keys)
    yield from engine.run(prompts)
    if counters is not None:
        counters["prefilled_tokens"] = counters.get("prefilled_tokens", 0) + engine.prefilled_tokens
