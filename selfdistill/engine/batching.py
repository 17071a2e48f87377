"""Continuous batching with refill: `batch_size` slots kept busy, a finished row's slot takes the next prompt.

Rows do not idle until the longest one ends: when `refill` slots are free, the next prompts are prefilled
(prefill.py) and their KV moves into the free slots of the sliding window (kv.py). A decode step is either
one packed sequence of every live row's last token and drafts, read by the ragged slot attention
(packed.py, drafts.py, attention.py), or, for models without it, one [slots, 1] batch. Greedy by default;
results are yielded as rows finish.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from selfdistill.engine import attention, compat
from selfdistill.engine.attention import SLOT_ATTENTION, plan_groups, slot_attention_available, slot_groups
from selfdistill.engine.drafts import NgramDrafter, drafts_per_row
from selfdistill.engine.kv import SlotCache, batch_step_cache, slot_model_cache
from selfdistill.engine.next_token import choose_tokens
from selfdistill.engine.packed import accept_drafts, packed_layout
from selfdistill.engine.packed_linears import packed_linears
from selfdistill.engine.params import GenParams, Result
from selfdistill.engine.prefill import Prompt, left_padded, prefill_chunks
from selfdistill.models import cache_kwargs


class RefillEngine:
    """Greedy/sampled decoding over `batch_size` slots; a finished slot takes the next prompt."""

    GROW = 256  # spare cache columns added at a time

    def __init__(self, model: Any, params: GenParams, pad_id: int) -> None:
        self.model, self.params, self.pad_id = model, params, pad_id
        self.stop = set(params.stop_ids)
        self.generator: Any = None  # made on the logits' device at the first sampled step (_generator_on)
        self.cache = SlotCache()
        self.owner: list[int | None] = []  # prompt index per slot; None = free
        self.out: list[list[int]] = []
        self.pos = self.last = None  # [slots] next position id / next input token
        self.text_config = model.config.get_text_config()
        self.n_layers = self.text_config.num_hidden_layers
        self.ragged = (params.ragged and compat.attention_implementation(self.text_config) == "sdpa"
                       and slot_attention_available() and compat.usable("slot_cache"))
        # Drafted tokens are verified against the argmax, so only greedy decoding drafts.
        self.drafting = self.ragged and params.temperature <= 0 and params.draft_tokens > 0
        self.drafters: list[NgramDrafter | None] = []
        self.kv_group = self.text_config.num_attention_heads // (self.text_config.num_key_value_heads
                                                                 or self.text_config.num_attention_heads)
        self.plan: attention.Plan | None = None  # the slot grouping; None = plan again (attention.py)

    def run(self, prompts: Iterable[Prompt]) -> Iterator[Result]:
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
        return choose_tokens(logits, self.params, self._generator_on(logits.device))

    def _generator_on(self, device: Any) -> Any:
        """The seeded generator, on `device`: torch.multinomial needs one on its input's device, so a CPU
        generator crashes sampling on CUDA (a sharded model's logits sit on its last GPU)."""
        import torch

        if self.params.temperature > 0 and (self.generator is None or self.generator.device != device):
            self.generator = torch.Generator(device=device).manual_seed(self.params.seed)
        return self.generator

    def _fill(self, batch: list[Prompt], free: list[int]) -> Iterator[Result]:
        """Prefill new prompts, chunk by chunk (prefill.py), and move their KV into free slots."""
        import torch

        width = max(len(ids) for _, ids in batch)
        picked: list[tuple[int, list[int]]] = []
        for chunk, slots in prefill_chunks(batch, free, self.params.prefill_tokens):
            kv, first, attn = self._prefill(chunk)
            self._make_room(kv, width)
            self.cache.write_prefill(kv, slots, attn)
            rows = torch.tensor(slots)
            self.pos[rows] = attn.sum(-1).to(self.pos.device)
            self.last[rows] = first
            for s, (index, prompt) in zip(slots, chunk):
                self.owner[s], self.out[s] = index, []
                if self.drafting:
                    self.drafters[s] = NgramDrafter(prompt, self.params.draft_ngram)
            picked += [(s, [t]) for s, t in zip(slots, first.tolist())]
        self.plan = None
        yield from self._collect(picked)

    def _prefill(self, chunk: list[Prompt]) -> tuple[list[tuple[Any, Any]], Any, Any]:
        """One left-padded forward over `chunk`: (each layer's (keys, values), first new tokens, attention mask)."""
        from transformers.cache_utils import DynamicCache

        ids, attn = left_padded(chunk, self.pad_id)
        pc, device = DynamicCache(), self.model.device
        first = self._forward(ids.to(device), attn.to(device), (attn.cumsum(-1) - 1).clamp(min=0).to(device), pc)
        return compat.cache_kv(pc), first, attn

    def _make_room(self, kv: list[tuple[Any, Any]], width: int) -> None:
        """Allocate the slot buffers on first use, or widen the window on the left for a longer prompt."""
        import torch

        c, slots = self.cache, self.params.batch_size
        if not c.k:
            c.allocate(kv, slots, width, self.GROW)
            self.owner, self.out, self.drafters = [None] * slots, [[] for _ in range(slots)], [None] * slots
            self.pos = torch.zeros(slots, dtype=torch.long, device=self.model.device)
            self.last = torch.full((slots,), self.pad_id, dtype=torch.long, device=self.model.device)
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
        with batch_step_cache(c, self.n_layers) as model_cache:
            picked = self._forward(self.last[:, None], c.mask[:, c.start:c.end + 1].to(self.model.device),
                                   self.pos[:, None], model_cache)
        c.end += 1
        c.ends += 1
        self.pos += 1
        self.last = picked
        tokens = picked.tolist()
        yield from self._collect([(s, [tokens[s]]) for s, o in enumerate(self.owner) if o is not None])

    def _packed_step(self) -> Iterator[Result]:
        """Every live row's last token and drafts as one sequence; keep the drafts the argmax agrees with."""
        import torch

        c, device = self.cache, self.model.device
        live = [s for s, o in enumerate(self.owner) if o is not None]
        drafts = self._drafts(live)
        lay = packed_layout(live, drafts, self.last.tolist(), c.ends, len(self.owner))
        c.write_rows, c.write_cols, c.window_end = lay.rows.to(device), lay.cols.to(device), c.end + lay.q
        c.mask[lay.rows, lay.cols] = 1  # the new columns are the rows' own (rejected drafts are unmarked below)
        calls = attention.packed_calls
        try:
            # The groups' biases say which columns each query sees; transformers' own mask is not used.
            with compat.switched_attention(self.text_config, SLOT_ATTENTION):
                picked = self._forward(torch.tensor([lay.ids], device=device), None,
                                       (self.pos[lay.rows.to(device)] + lay.steps.to(device))[None],
                                       slot_model_cache(c, self.n_layers), keep=0, slot_groups=self._slot_groups(lay.q),
                                       slot_queries=(lay.pad.to(device), lay.unpad.to(device)))
        finally:
            c.write_rows = c.write_cols = None
        if attention.packed_calls == calls:
            raise RuntimeError("the model did not call the engine's slot attention (transformers changed how it "
                               "picks attention functions); set GenParams(ragged=False)")
        emitted, advance = accept_drafts(live, drafts, picked.tolist(), len(self.owner))
        rejected = lay.steps >= advance[lay.rows]
        c.mask[lay.rows[rejected], lay.cols[rejected]] = 0
        c.ends += advance
        c.end = int(c.ends.max())
        self.pos += advance.to(device)
        self.last[torch.tensor(live, device=device)] = torch.tensor([t[-1] for _, t in emitted], device=device)
        yield from self._collect(emitted)

    def _drafts(self, live: list[int]) -> list[list[int]]:
        """Draft tokens for each live slot this step (empty when drafting is off; budget: drafts.py)."""
        k = drafts_per_row(self.params.draft_tokens, self.params.draft_budget, len(live)) if self.drafting else 0
        if k <= 0:
            return [[] for _ in live]
        room = self.params.max_new_tokens - 1  # drafts past the token limit would be thrown away
        return [self.drafters[s].draft(min(k, room - len(self.out[s]))) for s in live]

    def _slot_groups(self, q: int) -> list[attention.Group]:
        """This step's groups of slots for the slot attention, planned again after a fill, free or move."""
        if self.plan is None:
            self.plan = plan_groups(self.cache, q, self.params.group_cost)
        return slot_groups(self.cache, self.plan, q, self.kv_group, self.model.dtype, self.model.device)

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
