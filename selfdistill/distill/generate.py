"""The refilling batched generation engine (continuous batching) on a transformers model.

The engine keeps `batch_size` slots busy: a finished row's slot is refilled with the next prompt instead
of idling until the longest row ends (continuous batching). Its KV cache is one preallocated
buffer per layer whose window slides right as tokens are added, so a decode step writes in place
instead of concatenating the whole cache. Greedy by default; results are yielded as rows finish.

Greedy decoding also drafts tokens by prompt lookup: a rewrite copies much of its prompt (the reference
answer, the question's numbers), so the tokens that followed the latest earlier occurrence of a row's last
n tokens are often what the model will say next. A decode step feeds them after the row's last token and
keeps the longest prefix the model's own argmax agrees with, so the output is the greedy output (up to
floating-point rounding between batch shapes), in fewer steps. On CPU a step's matmuls cost about the same
for 16 or 64 tokens and its attention reads each row's KV once however many queries it has, so drafts are
nearly free once the batch thins (docs/distill.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from selfdistill.distill.onednn import packed_linears
from selfdistill.models import cache_kwargs, stop_token_ids  # noqa: F401 - stop ids live with the loaders

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
    draft_tokens: int = 4  # most prompt-lookup draft tokens per row and step (greedy, ragged only); 0 = off
    draft_ngram: int = 3  # longest n-gram looked up for a draft (the longest match wins)
    draft_budget: int = 128  # tokens per decode step that drafts may fill: slots x (1 + drafts) <= this
    packed_linears: bool = True  # 16-bit CPU linears on weights reordered once for oneDNN (distill/onednn.py)


@dataclass(frozen=True)
class Result:
    index: int  # the caller's key for the prompt
    tokens: list[int]  # generated ids, without the stop token
    finish: str  # "stop" (end-of-turn) | "length" (max_new_tokens reached)


class SlotCache:
    """Per-layer KV buffers [slots, heads, capacity, dim]; the live window is columns [start, end).

    Row r's tokens are the columns marked in `mask[r]`, all before `ends[r]`, where its next token is
    written. A batch step advances every slot by one (ends == end); a packed step advances each live row
    by the tokens it kept and leaves free slots where they are, so rows end apart and `end` is the largest.
    """

    def __init__(self) -> None:
        self.k: list[Any] = []
        self.v: list[Any] = []
        self.mask: Any = None  # [slots, capacity] 1 where a column holds a real token of that row
        self.ends: Any = None  # [slots] column of each row's next token
        self.start = self.end = self.window_end = 0
        # A packed decode forward (one sequence of every live row's tokens) writes token j at row
        # `write_rows[j]`, column `write_cols[j]`; None = a batch forward writing column `end` of every row.
        self.write_rows: Any = None
        self.write_cols: Any = None

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
        ends = self.ends if rows is None else self.ends[rows]
        self.ends = torch.zeros(mask.shape[0], dtype=ends.dtype)
        self.ends[: ends.shape[0]] = ends + (left - self.start)
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
            k, v = c.k[self.idx], c.v[self.idx]
            if c.write_cols is None:
                k[:, :, c.end:c.end + q] = key_states
                v[:, :, c.end:c.end + q] = value_states
                return k[:, :, c.start:c.end + q], v[:, :, c.start:c.end + q]
            k[c.write_rows, :, c.write_cols] = key_states[0].transpose(0, 1)  # [tokens, heads, dim]
            v[c.write_rows, :, c.write_cols] = value_states[0].transpose(0, 1)
            return k[:, :, c.start:c.window_end], v[:, :, c.start:c.window_end]

        def get_seq_length(self) -> int:
            return cache.width

    return Cache(layers=[SlotLayer(i) for i in range(n_layers)])


SLOT_ATTENTION = "selfdistill_slots"  # sdpa, plus ragged decode over groups of slots


def _slot_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                    scaling: float | None = None, slot_groups: list[tuple[int, int, int, int, Any]] | None = None,
                    slot_queries: tuple[Any, Any] | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' sdpa, except for a packed decode step given `slot_groups` and `slot_queries`.

    A packed step is one sequence holding every live row's last token and drafts, so the matmuls see no
    padding; `key`/`value` are the whole slot buffers. `slot_queries` = (pad, unpad): `pad` [slots, q]
    picks each row's queries out of the sequence (index `tokens` = a zero query for padding), `unpad`
    puts the results back in sequence order. The shared KV window is as wide as the longest live row, so
    one sdpa call over all slots would read every row's padding too; decode is bound by reading that KV
    (docs/distill.md). Each group `(lo, hi, col, col_end, bias)` is a contiguous range of slots whose rows
    all lie within window columns `col:col_end`: it reads only those (views, no copy), with `bias` (or None)
    hiding each row's columns that are not its own and, for drafts, the ones after the query.
    """
    from torch.nn.functional import scaled_dot_product_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if slot_groups is None or slot_queries is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    import torch

    pad, unpad = slot_queries
    heads, dim = query.shape[1], query.shape[3]
    rows, q = pad.shape
    flat = torch.cat([query[0].transpose(0, 1), query.new_zeros(1, heads, dim)])  # [tokens + 1, heads, dim]
    # The heads that share a kv head become one query block of (group x q) rows: the KV is read once.
    grouped = flat[pad].permute(0, 2, 1, 3).reshape(rows, key.shape[1], heads // key.shape[1] * q, dim)
    out = torch.empty_like(grouped)
    for lo, hi, col, col_end, bias in slot_groups:
        out[lo:hi] = scaled_dot_product_attention(grouped[lo:hi], key[lo:hi, :, col:col_end],
                                                  value[lo:hi, :, col:col_end], attn_mask=bias, scale=scaling)
    out = out.reshape(rows, heads, q, dim).transpose(1, 2).reshape(rows * q, heads, dim)
    return out[unpad][None], None


def _register_slot_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if SLOT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(SLOT_ATTENTION, _slot_attention)
        AttentionMaskInterface.register(SLOT_ATTENTION, sdpa_mask)


def split_slots(first: list[int], end: int | list[int], group_cost: int,
                max_rows: int = 64) -> list[tuple[int, int, int]]:
    """Contiguous slot ranges `(lo, hi, col)` minimising the KV columns read, sum of rows x (last end - first
    col), plus `group_cost` per range (the fixed cost of one more attention call), by dynamic programming.
    `end` is the window end shared by all rows, or each row's own end."""
    n, inf = len(first), float("inf")
    ends = [end] * n if isinstance(end, int) else end
    best, cut = [0.0] + [inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        col, last = inf, 0
        for i in range(j - 1, max(-1, j - 1 - max_rows), -1):
            col, last = min(col, first[i]), max(last, ends[i])
            cost = best[i] + (j - i) * (last - col) + group_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append((cut[j], j, min(first[cut[j]:j])))
        j = cut[j]
    return groups[::-1]


def greedy_ids(logits: Any) -> Any:
    """argmax over the last dim, first index on ties, as `generate` computes it on the fp32 upcast.

    On CPU the upcast plus fp32 argmax of [rows x 49k] bf16 logits took several ms a step. A 16-bit float's
    bits order as int16 like the floats do among non-negative floats, which all sort above the negative ones;
    so a row whose largest value is non-negative has the same argmax over its raw bits (NaN aside; -0.0 sorts
    just below +0.0), about a third of the upcast's cost. Only a row whose maximum is negative needs the
    magnitude bits of its negatives flipped to order them (bench/decode_shapes.py).
    """
    import torch

    if logits.dtype not in (torch.bfloat16, torch.float16):
        return logits.float().argmax(-1)
    bits = logits.contiguous().view(torch.int16)
    ids = bits.argmax(-1)
    negative = bits.gather(-1, ids[..., None])[..., 0] < 0
    if negative.any():
        rows = bits[negative]
        ids[negative] = (rows ^ ((rows >> 15) & 0x7FFF)).argmax(-1)
    return ids


def _pick(logits: Any, params: GenParams, generator: Any) -> Any:
    import torch

    if params.temperature <= 0:
        return greedy_ids(logits)
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


class NgramDrafter:
    """Prompt lookup for one row: the tokens that followed the latest earlier occurrence of its last n tokens.

    `index[n]` maps every n-gram of the row's context to where its latest continuation starts, updated as
    tokens arrive, so a lookup is a dict hit instead of a scan of the prompt.
    """

    def __init__(self, tokens: list[int], max_n: int) -> None:
        self.ctx: list[int] = []
        self.index: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n + 1)]
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        ctx, old = self.ctx, len(self.ctx)
        ctx.extend(tokens)
        for t in range(max(1, old), len(ctx)):  # continuation ctx[t] follows the n tokens before it
            for n in range(1, min(t, len(self.index) - 1) + 1):
                self.index[n][tuple(ctx[t - n:t])] = t

    def draft(self, k: int) -> list[int]:
        ctx = self.ctx
        for n in range(min(len(self.index) - 1, len(ctx)), 0, -1):
            t = self.index[n].get(tuple(ctx[-n:]))
            if t is not None:
                return ctx[t:t + k]
        return []


class RefillEngine:
    """Greedy/sampled decoding over `batch_size` slots; a finished slot takes the next prompt."""

    GROW = 256  # spare cache columns added at a time
    # One more attention call per layer costs about as much as reading this many (row, column) KV pairs
    # (measured on CPU: ~30 us per sdpa call vs ~80 ns per row-column at 3 kv heads x 64 dims).
    GROUP_COST = 512

    def __init__(self, model: Any, params: GenParams, pad_id: int) -> None:

        self.model, self.params, self.pad_id = model, params, pad_id
        self.stop = set(params.stop_ids)
        self.generator: Any = None  # made on the logits' device at the first sampled step (_generator_on)
        self.cache = SlotCache()
        self.owner: list[int | None] = []  # prompt index per slot; None = free
        self.out: list[list[int]] = []
        self.pos = self.last = None  # [slots] next position id / next input token
        self.n_layers = model.config.get_text_config().num_hidden_layers
        self.text_config = model.config.get_text_config()
        self.ragged = params.ragged and self.text_config._attn_implementation == "sdpa"
        if self.ragged:
            _register_slot_attention()
        # Drafted tokens are verified against the argmax, so only greedy decoding drafts.
        self.drafting = self.ragged and params.temperature <= 0 and params.draft_tokens > 0
        self.drafters: list[NgramDrafter | None] = []
        self.kv_group = self.text_config.num_attention_heads // (self.text_config.num_key_value_heads
                                                                 or self.text_config.num_attention_heads)
        self.plan: list[tuple[int, int, int, bool]] | None = None  # (lo, hi, first col, ragged starts); None = redo

    def run(self, prompts: Iterable[tuple[int, list[int]]]) -> Iterator[Result]:
        import torch

        queue, exhausted = iter(prompts), False
        refill_at = self.params.refill or max(1, self.params.batch_size // 8)
        with torch.inference_mode(), packed_linears(self.model, self.params.packed_linears):
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

    def _forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, cache: Any, keep: int = 1,
                 **extra: Any) -> Any:
        """The next token after each row's last position ([rows]) or, with keep=0, after every position of
        a one-row (packed) input ([tokens])."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=keep, **cache_kwargs(self.model, cache), **extra)
        logits = out.logits[:, -1] if keep == 1 else out.logits[0]
        return _pick(logits, self.params, self._generator_on(logits.device))

    def _generator_on(self, device: Any) -> Any:
        """The seeded generator, on `device`: torch.multinomial needs one on its input's device, so a CPU
        generator crashes sampling on CUDA (a sharded model's logits sit on its last GPU)."""
        import torch

        if self.params.temperature > 0 and (self.generator is None or self.generator.device != device):
            self.generator = torch.Generator(device=device).manual_seed(self.params.seed)
        return self.generator

    def _fill(self, batch: list[tuple[int, list[int]]], free: list[int]) -> Iterator[Result]:
        """Prefill new prompts and move their KV into free slots.

        Prompts are prefilled in left-padded chunks of about `prefill_tokens` tokens, not all at once:
        on CPU the activations of a ~1k-token chunk stay in cache, and the memory-bound elementwise ops
        (norms, rotary, SiLU) ran ~2x faster per token than in one 8k-16k-token forward (docs/distill.md).
        """
        import torch

        width = max(len(ids) for _, ids in batch)
        picked: list[tuple[int, int]] = []
        for chunk, slots in self._chunks(batch, free):
            pc, first, attn = self._prefill(chunk)
            self._make_room(pc, width)
            c, w, rows = self.cache, attn.shape[1], torch.tensor(slots)
            for i in range(self.n_layers):
                c.k[i][rows, :, c.end - w:c.end] = pc.layers[i].keys
                c.v[i][rows, :, c.end - w:c.end] = pc.layers[i].values
            c.mask[rows, c.start:c.end] = 0
            c.mask[rows, c.end - w:c.end] = attn
            c.ends[rows] = c.end
            self.pos[rows] = attn.sum(-1).to(self.pos.device)
            self.last[rows] = first
            for s, (index, prompt) in zip(slots, chunk):
                self.owner[s], self.out[s] = index, []
                if self.drafting:
                    self.drafters[s] = NgramDrafter(prompt, self.params.draft_ngram)
            picked += [(s, [t]) for s, t in zip(slots, first.tolist())]
        self.plan = None
        yield from self._collect(picked)

    def _chunks(self, batch: list[tuple[int, list[int]]],
                free: list[int]) -> Iterator[tuple[list[tuple[int, list[int]]], list[int]]]:
        """(prompts, their slots) per prefill forward: longest first, each chunk as many prompts as fit in
        `prefill_tokens` once padded to its own longest (at least one). Sizing every chunk by the fill's
        longest prompt instead gave 2 prompts (~500 tokens) per forward on GSM8K, 32 forwards where 19 now do;
        packed projections cost 14.8 us per token at 256 tokens and 12.7 at 1,024 (bench/decode_shapes.py)."""
        order = sorted(range(len(batch)), key=lambda i: -len(batch[i][1]))
        at = 0
        while at < len(order):
            width, n = len(batch[order[at]][1]), 1
            while at + n < len(order) and (n + 1) * width <= self.params.prefill_tokens:
                n += 1
            take = order[at:at + n]
            yield [batch[i] for i in take], [free[i] for i in take]
            at += n

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
            c.ends = torch.full((slots,), width, dtype=torch.long)
            c.start, c.end = 0, width
            self.owner, self.out, self.drafters = [None] * slots, [[] for _ in range(slots)], [None] * slots
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
        if c.end + 1 + self.params.draft_tokens > c.capacity:  # grow by half: drafts move the end fast
            c.resize(None, left=0, right=max(self.GROW, c.width // 2, 1 + self.params.draft_tokens))
            self.plan = None
        if not self.ragged:
            yield from self._batch_step()
            return
        yield from self._packed_step()

    def _batch_step(self) -> Iterator[Result]:
        """One token for every slot, as a [slots, 1] batch (models without the slot attention)."""
        c = self.cache
        c.mask[:, c.end] = 1
        # The mask stays on the CPU for the slot bookkeeping; the model needs it on its own device.
        picked = self._forward(self.last[:, None], c.mask[:, c.start:c.end + 1].to(self.model.device),
                               self.pos[:, None], _model_cache(c, self.n_layers))
        c.end += 1
        c.ends += 1
        self.pos += 1
        self.last = picked
        tokens = picked.tolist()
        yield from self._collect([(s, [tokens[s]]) for s, o in enumerate(self.owner) if o is not None])

    def _packed_step(self) -> Iterator[Result]:
        """Every live row's last token and drafts as one sequence; keep the drafts the argmax agrees with."""
        import torch

        c = self.cache
        live = [s for s, o in enumerate(self.owner) if o is not None]
        drafts = self._drafts(live)
        last = self.last.tolist()
        ids = [t for s, d in zip(live, drafts) for t in [last[s], *d]]
        lens = [1 + len(d) for d in drafts]
        q = max(lens)
        rows = torch.tensor([s for s, n in zip(live, lens) for _ in range(n)])
        steps = torch.tensor([i for n in lens for i in range(n)])
        cols, device = c.ends[rows] + steps, self.model.device
        c.write_rows, c.write_cols, c.window_end = rows.to(device), cols.to(device), c.end + q
        c.mask[rows, cols] = 1  # the new columns are the rows' own (rejected drafts are unmarked below)
        # Where each row's queries sit in the sequence (padding -> the extra zero query), and back.
        pad = torch.full((len(self.owner), q), len(ids), dtype=torch.long)
        pad[rows, steps] = torch.arange(len(ids))
        slot_queries = (pad.to(device), (rows * q + steps).to(device))
        impl, self.text_config._attn_implementation = self.text_config._attn_implementation, SLOT_ATTENTION
        try:
            # The groups' biases say which columns each query sees; transformers' own mask is not used.
            picked = self._forward(torch.tensor([ids], device=device), None,
                                   (self.pos[rows.to(device)] + steps.to(device))[None],
                                   _model_cache(c, self.n_layers), keep=0,
                                   slot_groups=self._slot_groups(q), slot_queries=slot_queries)
        finally:
            self.text_config._attn_implementation = impl
            c.write_rows = c.write_cols = None
        picked = picked.tolist()
        emitted, at, advance = [], 0, torch.zeros(len(self.owner), dtype=torch.long)
        for s, d in zip(live, drafts):
            agree = 0  # the row keeps its drafts up to the first one its own argmax disagrees with
            while agree < len(d) and picked[at + agree] == d[agree]:
                agree += 1
            emitted.append((s, picked[at:at + agree + 1]))
            advance[s] = agree + 1
            at += 1 + len(d)
        rejected = steps >= advance[rows]
        c.mask[rows[rejected], cols[rejected]] = 0
        c.ends += advance
        c.end = int(c.ends.max())
        self.pos += advance.to(device)
        self.last[torch.tensor(live, device=device)] = torch.tensor([t[-1] for _, t in emitted], device=device)
        yield from self._collect(emitted)

    def _drafts(self, live: list[int]) -> list[list[int]]:
        """Draft tokens for each live slot this step (empty when drafting is off).

        Drafts fill at most `draft_budget` tokens per step across the live rows: at full batch the matmuls
        are compute-bound and every drafted token costs what a row does, while a thinned batch gets them
        nearly free (docs/distill.md).
        """
        k = min(self.params.draft_tokens, self.params.draft_budget // max(1, len(live)) - 1) if self.drafting else 0
        if k <= 0:
            return [[] for _ in live]
        room = self.params.max_new_tokens - 1  # drafts past the token limit would be thrown away
        return [self.drafters[s].draft(min(k, room - len(self.out[s]))) for s in live]

    def _slot_groups(self, q: int) -> list[tuple[int, int, int, int, Any]]:
        """This step's `(lo, hi, first col, end col, bias or None)` per group of slots (see _slot_attention).

        A row is described by its first window column and its end; the grouping is planned with the ends of
        the step that plans it and only changes when rows are filled or freed or the buffer moves. A group
        needs no bias when its rows start at the group's first column and end together, one query each.
        """
        import torch

        c = self.cache
        ends = (c.ends - c.start + q).tolist()  # window-relative, past this step's columns
        live = c.mask[:, c.start:c.end + q]
        if self.plan is None:  # first columns stay fixed until the plan is invalidated
            first = live.argmax(1).tolist()  # first 1 per row (each row's run is contiguous)
            self.plan = [(lo, hi, col, any(f > col for f in first[lo:hi]))
                         for lo, hi, col in split_slots(first, ends, self.GROUP_COST)]
        groups = []
        for lo, hi, col, ragged_rows in self.plan:
            col_end = max(ends[lo:hi])
            if q == 1 and not ragged_rows and min(ends[lo:hi]) == col_end:
                groups.append((lo, hi, col, col_end, None))
                continue
            mask = live[lo:hi, None, col:col_end].bool()  # [rows, 1, cols]
            if q > 1:  # query i of a row sees its columns up to its own i-th new one
                upto = c.ends[lo:hi, None] - c.start + torch.arange(q)  # [rows, q]
                mask = mask & (torch.arange(col, col_end)[None, None, :] <= upto[:, :, None])
                mask = mask[:, None].expand(-1, self.kv_group, -1, -1).reshape(hi - lo, 1, self.kv_group * q, -1)
            else:
                mask = mask[:, None]
            # Additive, in the model's dtype: sdpa would convert a bool mask again in each of the layers.
            bias = torch.zeros(mask.shape, dtype=self.model.dtype).masked_fill_(~mask, float("-inf"))
            groups.append((lo, hi, col, col_end, bias.to(self.model.device)))
        return groups

    def _collect(self, slot_tokens: list[tuple[int, list[int]]]) -> Iterator[Result]:
        """Append each slot's new tokens; emit and free the slots that stopped or hit the limit."""
        done = []
        for s, tokens in slot_tokens:
            finish, kept = None, 0
            for t in tokens:
                if t in self.stop:
                    finish = "stop"
                    break
                self.out[s].append(t)
                kept += 1
                if len(self.out[s]) >= self.params.max_new_tokens:
                    finish = "length"
                    break
            if finish:
                done.append(s)
                yield Result(self.owner[s], self.out[s], finish)
            elif self.drafters and self.drafters[s] is not None:
                self.drafters[s].extend(tokens[:kept])
        if done:
            self._free(done)

    def _free(self, done: list[int]) -> None:
        c, self.plan = self.cache, None
        for s in done:
            self.owner[s], self.out[s] = None, []
            if self.drafters:
                self.drafters[s] = None
            c.mask[s, c.start:] = 0
            c.mask[s, c.end - 1] = 1
            c.ends[s] = c.end
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
        self.drafters = [self.drafters[s] for s in live]
        self.pos, self.last = self.pos[rows], self.last[rows]


def generate_hf(model: Any, tokenizer: Any, prompts: Iterable[tuple[int, list[int]]],
                params: GenParams) -> Iterator[Result]:
    """The default backend: the refilling engine on an already-loaded transformers model."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else params.stop_ids[0]
    return RefillEngine(model, params, pad).run(prompts)

