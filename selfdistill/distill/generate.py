"""The refilling batched generation engine (continuous batching) on a transformers model.

The engine keeps `batch_size` slots busy: a finished row's slot is refilled with the next prompt instead
of idling until the longest row ends (continuous batching). Its KV cache is one preallocated
buffer per layer whose window slides right as tokens are added, so a decode step writes in place
instead of concatenating the whole cache. Greedy by default; results are yielded as rows finish.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32
    stop_ids: tuple[int, ...] = ()
    refill: int = 0  # refill when this many slots are free; 0 = batch_size // 8 (at least 1)
    prefill_tokens: int = 1024  # padded prompt tokens per prefill forward (see _fill)
    ragged: bool = True  # decode attention per group of slots over their own columns (sdpa models only)


@dataclass(frozen=True)
class Result:
    index: int  # the caller's key for the prompt
    tokens: list[int]  # generated ids, without the stop token
    finish: str  # "stop" (end-of-turn) | "length" (max_new_tokens reached)


def stop_token_ids(tokenizer: Any, model: Any | None = None) -> tuple[int, ...]:
    """End-of-turn ids: the tokenizer's eos, the generation config's eos, and ChatML's <|im_end|>."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
    for text in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(text)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return tuple(sorted(ids))


class SlotCache:
    """Per-layer KV buffers [slots, heads, capacity, dim]; the live window is columns [start, end)."""

    def __init__(self) -> None:
        self.k: list[Any] = []
        self.v: list[Any] = []
        self.mask: Any = None  # [slots, capacity] 1 where a column holds a real token of that row
        self.start = self.end = 0

    @property
    def width(self) -> int:
        return self.end - self.start

    def resize(self, slots: int | None, left: int, right: int, rows: Any | None = None) -> None:
        """Copy the window into fresh buffers with `left`/`right` spare columns (and only `rows`)."""
        import torch

        for buffers in (self.k, self.v):
            for i, buf in enumerate(buffers):
                win = buf[:, :, self.start:self.end]
                if rows is not None:
                    win = win[rows]
                new = torch.zeros(win.shape[0] if slots is None else slots, win.shape[1],
                                  left + self.width + right, win.shape[3], dtype=buf.dtype, device=buf.device)
                new[: win.shape[0], :, left:left + self.width] = win
                buffers[i] = new
        win = self.mask[:, self.start:self.end]
        if rows is not None:
            win = win[rows]
        mask = torch.zeros(win.shape[0] if slots is None else slots, left + self.width + right, dtype=win.dtype)
        mask[: win.shape[0], left:left + self.width] = win
        self.mask = mask
        self.start, self.end = left, left + self.width

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]


def _model_cache(cache: SlotCache, n_layers: int) -> Any:
    """A transformers `Cache` whose layers write into, and read views of, `cache`'s buffers."""
    from transformers.cache_utils import Cache, DynamicLayer

    class SlotLayer(DynamicLayer):
        def __init__(self, idx: int) -> None:
            super().__init__()
            self.idx, self.is_initialized = idx, True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            c, q = cache, key_states.shape[-2]
            c.k[self.idx][:, :, c.end:c.end + q] = key_states
            c.v[self.idx][:, :, c.end:c.end + q] = value_states
            return c.k[self.idx][:, :, c.start:c.end + q], c.v[self.idx][:, :, c.start:c.end + q]

        def get_seq_length(self) -> int:
            return cache.width

    return Cache(layers=[SlotLayer(i) for i in range(n_layers)])


SLOT_ATTENTION = "selfdistill_slots"  # sdpa, plus ragged 1-token decode over groups of slots


def _slot_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                    scaling: float | None = None, slot_groups: list[tuple[int, int, int, Any]] | None = None,
                    **kwargs: Any) -> tuple[Any, None]:
    """transformers' sdpa, except that a decode step given `slot_groups` attends group by group.

    The shared KV window is as wide as the longest live row, so one sdpa call over all slots reads every
    row's padding too; decode is bound by reading that KV (docs/distill.md). Each group `(lo, hi, col,
    mask)` is a contiguous range of slots whose rows all start at or after window column `col`: it reads
    only columns `col:` (views, no copy), with `mask` (or None) hiding the columns before a row's start.
    """
    from torch.nn.functional import scaled_dot_product_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if slot_groups is None or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    import torch

    rows, heads, _, dim = query.shape
    q = query.reshape(rows, key.shape[1], heads // key.shape[1], dim)  # grouped heads share their kv head
    out = torch.empty_like(q)
    for lo, hi, col, mask in slot_groups:
        out[lo:hi] = scaled_dot_product_attention(q[lo:hi], key[lo:hi, :, col:], value[lo:hi, :, col:],
                                                  attn_mask=mask, scale=scaling)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2), None


def _register_slot_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if SLOT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(SLOT_ATTENTION, _slot_attention)
        AttentionMaskInterface.register(SLOT_ATTENTION, sdpa_mask)


def split_slots(first: list[int], end: int, group_cost: int, max_rows: int = 64) -> list[tuple[int, int, int]]:
    """Contiguous slot ranges `(lo, hi, col)` minimising the KV columns read, sum of rows x (end - col), plus
    `group_cost` per range (the fixed cost of one more attention call), by dynamic programming."""
    n, inf = len(first), float("inf")
    best, cut = [0.0] + [inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        col = end
        for i in range(j - 1, max(-1, j - 1 - max_rows), -1):
            col = min(col, first[i])
            cost = best[i] + (j - i) * (end - col) + group_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append((cut[j], j, min(first[cut[j]:j])))
        j = cut[j]
    return groups[::-1]


def _pick(logits: Any, params: GenParams, generator: Any) -> Any:
    import torch

    if params.temperature <= 0:
        return logits.float().argmax(-1)  # same ids (exact upcast); torch's fp32 argmax is ~2x its bf16 one on CPU
    probs = torch.softmax(logits.float() / params.temperature, -1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > params.top_p  # keep the smallest set reaching top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def length_sorted(items: Iterable[tuple[int, list[int]]], window: int) -> Iterator[tuple[int, list[int]]]:
    """Longest prompt first within each window of `window` items: a refill then always fits the cache."""
    chunk: list[tuple[int, list[int]]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= window:
            yield from sorted(chunk, key=lambda x: -len(x[1]))
            chunk = []
    yield from sorted(chunk, key=lambda x: -len(x[1]))


class RefillEngine:
    """Greedy/sampled decoding over `batch_size` slots; a finished slot takes the next prompt."""

    GROW = 256  # spare cache columns added at a time
    # One more attention call per layer costs about as much as reading this many (row, column) KV pairs
    # (measured on CPU: ~30 us per sdpa call vs ~80 ns per row-column at 3 kv heads x 64 dims).
    GROUP_COST = 512

    def __init__(self, model: Any, params: GenParams, pad_id: int) -> None:
        import torch

        self.model, self.params, self.pad_id = model, params, pad_id
        self.stop = set(params.stop_ids)
        self.generator = torch.Generator().manual_seed(params.seed)
        self.cache = SlotCache()
        self.owner: list[int | None] = []  # prompt index per slot; None = free
        self.out: list[list[int]] = []
        self.pos = self.last = None  # [slots] next position id / next input token
        self.n_layers = model.config.get_text_config().num_hidden_layers
        self.text_config = model.config.get_text_config()
        self.ragged = params.ragged and self.text_config._attn_implementation == "sdpa"
        if self.ragged:
            _register_slot_attention()
        self.plan: list[tuple[int, int, int, bool]] | None = None  # (lo, hi, col, needs a mask); None = recompute

    def run(self, prompts: Iterable[tuple[int, list[int]]]) -> Iterator[Result]:
        import torch

        queue, exhausted = iter(prompts), False
        refill_at = self.params.refill or max(1, self.params.batch_size // 8)
        with torch.inference_mode():
            while True:
                free = [s for s, o in enumerate(self.owner) if o is None] if self.owner \
                    else list(range(self.params.batch_size))
                active = len(self.owner) - len(free) if self.owner else 0
                if not exhausted and (len(free) >= refill_at or active == 0) and free:
                    batch = [x for _, x in zip(free, queue)]
                    exhausted = len(batch) < len(free)
                    if batch:
                        yield from self._fill(batch, free)
                        continue
                if active == 0:
                    if exhausted:
                        return
                    continue
                if exhausted:
                    self._shrink()
                yield from self._step()

    def _forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, cache: Any, **extra: Any) -> Any:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True, logits_to_keep=1, **extra)
        return _pick(out.logits[:, -1], self.params, self.generator)

    def _fill(self, batch: list[tuple[int, list[int]]], free: list[int]) -> Iterator[Result]:
        """Prefill new prompts and move their KV into free slots.

        Prompts are prefilled in left-padded chunks of about `prefill_tokens` tokens, not all at once:
        on CPU the activations of a ~1k-token chunk stay in cache, and the memory-bound elementwise ops
        (norms, rotary, SiLU) ran ~2x faster per token than in one 8k-16k-token forward (docs/distill.md).
        """
        import torch

        width = max(len(ids) for _, ids in batch)
        per_chunk = max(1, self.params.prefill_tokens // width)
        picked: list[tuple[int, int]] = []
        for at in range(0, len(batch), per_chunk):
            chunk = batch[at:at + per_chunk]
            slots = free[at:at + len(chunk)]
            pc, first, attn = self._prefill(chunk)
            self._make_room(pc, width)
            c, w, rows = self.cache, attn.shape[1], torch.tensor(slots)
            for i in range(self.n_layers):
                c.k[i][rows, :, c.end - w:c.end] = pc.layers[i].keys
                c.v[i][rows, :, c.end - w:c.end] = pc.layers[i].values
            c.mask[rows, c.start:c.end] = 0
            c.mask[rows, c.end - w:c.end] = attn
            self.pos[rows] = attn.sum(-1).to(self.pos.device)
            self.last[rows] = first
            for s, (index, _) in zip(slots, chunk):
                self.owner[s], self.out[s] = index, []
            picked += zip(slots, first.tolist())
        self.plan = None
        yield from self._collect(picked)

    def _prefill(self, chunk: list[tuple[int, list[int]]]) -> tuple[Any, Any, Any]:
        """One left-padded forward over `chunk`: (its DynamicCache, first new tokens, attention mask)."""
        import torch
        from transformers.cache_utils import DynamicCache

        width = max(len(ids) for _, ids in chunk)
        ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (_, prompt) in enumerate(chunk):
            ids[j, width - len(prompt):] = torch.tensor(prompt)
            attn[j, width - len(prompt):] = 1
        pc = DynamicCache()
        first = self._forward(ids.to(self.model.device), attn.to(self.model.device),
                              (attn.cumsum(-1) - 1).clamp(min=0).to(self.model.device), pc)
        return pc, first, attn

    def _make_room(self, pc: Any, width: int) -> None:
        """Allocate the slot buffers on first use, or widen the window on the left for a longer prompt."""
        import torch

        c, slots = self.cache, self.params.batch_size
        if not c.k:
            for layer in pc.layers:
                _, heads, _, dim = layer.keys.shape
                c.k.append(torch.zeros(slots, heads, width + self.GROW, dim, dtype=layer.keys.dtype,
                                       device=layer.keys.device))
                c.v.append(torch.zeros_like(c.k[-1]))
            c.mask = torch.zeros(slots, width + self.GROW, dtype=torch.long)
            c.start, c.end = 0, width
            self.owner, self.out = [None] * slots, [[] for _ in range(slots)]
            self.pos = torch.zeros(slots, dtype=torch.long, device=self.model.device)
            self.last = torch.full((slots,), self.pad_id, dtype=torch.long, device=self.model.device)
            c.mask[:, width - 1] = 1  # never-used slots attend to one column, so no row is all-masked
            return
        if width > c.width:
            need = width - c.width
            if c.start < need:
                c.resize(None, left=need, right=self.GROW)
            c.start -= need
            c.mask[:, c.start:c.start + need] = 0

    def _step(self) -> Iterator[Result]:
        c = self.cache
        if c.end + 1 > c.capacity:
            c.resize(None, left=0, right=self.GROW)
            self.plan = None
        c.mask[:, c.end] = 1
        attn = c.mask[:, c.start:c.end + 1].to(self.model.device)
        args = (self.last[:, None], attn, self.pos[:, None], _model_cache(c, self.n_layers))
        if not self.ragged:
            tokens = self._forward(*args)
        else:
            impl, self.text_config._attn_implementation = self.text_config._attn_implementation, SLOT_ATTENTION
            try:
                tokens = self._forward(*args, slot_groups=self._slot_groups())
            finally:
                self.text_config._attn_implementation = impl
        c.end += 1
        self.pos += 1
        self.last = tokens
        yield from self._collect([(s, t) for s, t in enumerate(tokens.tolist()) if self.owner[s] is not None])

    def _slot_groups(self) -> list[tuple[int, int, int, Any]]:
        """This step's `(lo, hi, first window column, mask or None)` per group of slots (see _slot_attention).

        Every row's live columns are one contiguous run ending at the newest column, so a row is described by
        its first column; the grouping only changes when rows are filled, freed or the buffer moves.
        """
        c = self.cache
        live = c.mask[:, c.start:c.end + 1]
        if self.plan is None:  # window-relative first columns stay fixed until the plan is invalidated
            first = live.argmax(1).tolist()  # first 1 per row (each row's run is contiguous)
            self.plan = [(lo, hi, col, any(f > col for f in first[lo:hi]))
                         for lo, hi, col in split_slots(first, c.width + 1, self.GROUP_COST)]
        return [(lo, hi, col, live[lo:hi, None, None, col:].bool().to(self.model.device) if ragged_rows else None)
                for lo, hi, col, ragged_rows in self.plan]

    def _collect(self, slot_tokens: list[tuple[int, int]]) -> Iterator[Result]:
        """Append each slot's new token; emit and free the slots that stopped or hit the limit."""
        done = []
        for s, t in slot_tokens:
            finish = "stop" if t in self.stop else None
            if finish is None:
                self.out[s].append(t)
                if len(self.out[s]) >= self.params.max_new_tokens:
                    finish = "length"
            if finish:
                done.append(s)
                yield Result(self.owner[s], self.out[s], finish)
        if done:
            self._free(done)

    def _free(self, done: list[int]) -> None:
        c, self.plan = self.cache, None
        for s in done:
            self.owner[s], self.out[s] = None, []
            c.mask[s, c.start:c.end] = 0
            c.mask[s, c.end - 1] = 1
        used = c.mask[:, c.start:c.end].any(0).nonzero()
        c.start += int(used[0]) if len(used) else 0  # drop columns no row attends to any more

    def _shrink(self) -> None:
        """Once no prompts are left, halve the slot count when most slots idle (less wasted compute)."""
        import torch

        live = [s for s, o in enumerate(self.owner) if o is not None]
        if len(live) > len(self.owner) // 2 or len(self.owner) < 4:
            return
        rows, self.plan = torch.tensor(live), None
        self.cache.resize(len(live), left=0, right=self.GROW, rows=rows)
        self.owner = [self.owner[s] for s in live]
        self.out = [self.out[s] for s in live]
        self.pos, self.last = self.pos[rows], self.last[rows]


def generate_hf(model: Any, tokenizer: Any, prompts: Iterable[tuple[int, list[int]]],
                params: GenParams) -> Iterator[Result]:
    """The default backend: the refilling engine on an already-loaded transformers model."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else params.stop_ids[0]
    return RefillEngine(model, params, pad).run(prompts)

