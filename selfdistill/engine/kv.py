"""The sliding KV window: one preallocated buffer per layer for every slot, written in place.

The live window is columns [start, end) of every slot's buffer. It grows right as tokens are added, so a
decode step writes its new column instead of concatenating the whole cache, and it is trimmed on the left
when no live row needs those columns any more. The model sees the buffers through a transformers `Cache`
whose layers write into them and return views (`slot_model_cache`; compat.py builds it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from selfdistill.engine import compat


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

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

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

    def allocate(self, kv: list[tuple[Any, Any]], slots: int, width: int, spare: int) -> None:
        """Empty buffers for `slots` rows shaped like the prefill's `kv`, with a window `width` wide."""
        import torch

        for keys, _ in kv:
            _, heads, _, dim = keys.shape
            self.k.append(torch.zeros(slots, heads, width + spare, dim, dtype=keys.dtype, device=keys.device))
            self.v.append(torch.zeros_like(self.k[-1]))
        self.mask = torch.zeros(slots, width + spare, dtype=torch.long)
        self.ends = torch.full((slots,), width, dtype=torch.long)
        self.start, self.end = 0, width
        self.mask[:, width - 1] = 1  # never-used slots attend to one column, so no row is all-masked

    def write_prefill(self, kv: list[tuple[Any, Any]], slots: list[int], attn: Any) -> None:
        """Put a prefill's left-padded `kv` (and its mask `attn`) at the right of the window in `slots`."""
        import torch

        w, rows = attn.shape[1], torch.tensor(slots)
        for i, (keys, values) in enumerate(kv):
            self.k[i][rows, :, self.end - w:self.end] = keys
            self.v[i][rows, :, self.end - w:self.end] = values
        self.mask[rows, self.start:self.end] = 0
        self.mask[rows, self.end - w:self.end] = attn
        self.ends[rows] = self.end


def slot_model_cache(cache: SlotCache, n_layers: int) -> Any:
    """A transformers `Cache` whose layers write into, and read views of, `cache`'s buffers."""

    def update(idx: int, key_states: Any, value_states: Any) -> tuple[Any, Any]:
        c, q = cache, key_states.shape[-2]
        k, v = c.k[idx], c.v[idx]
        if c.write_cols is None:
            k[:, :, c.end:c.end + q] = key_states
            v[:, :, c.end:c.end + q] = value_states
            return k[:, :, c.start:c.end + q], v[:, :, c.start:c.end + q]
        k[c.write_rows, :, c.write_cols] = key_states[0].transpose(0, 1)  # [tokens, heads, dim]
        v[c.write_rows, :, c.write_cols] = value_states[0].transpose(0, 1)
        return k[:, :, c.start:c.window_end], v[:, :, c.start:c.window_end]

    return compat.slot_layer_cache(update, lambda: cache.width, n_layers)


@contextmanager
def batch_step_cache(cache: SlotCache, n_layers: int) -> Iterator[Any]:
    """The model's cache for a batch step, which writes column `end` of every slot.

    Where transformers' cache layers cannot carry the slot buffers (compat.py), a standard `DynamicCache`
    gets a copy of the window and the step's new column is copied back: the same values, more copying.
    """
    if compat.usable("slot_cache"):
        yield slot_model_cache(cache, n_layers)
        return
    c = cache
    plain = compat.plain_cache([(k[:, :, c.start:c.end], v[:, :, c.start:c.end]) for k, v in zip(c.k, c.v)])
    yield plain
    for i, (k, v) in enumerate(compat.cache_kv(plain)):
        q = k.shape[2] - c.width  # the columns this step added
        c.k[i][:, :, c.end:c.end + q] = k[:, :, c.width:]
        c.v[i][:, :, c.end:c.end + q] = v[:, :, c.width:]
