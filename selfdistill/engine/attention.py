"""Ragged grouped decode attention: each group of slots reads only its own KV columns.

The shared KV window is as wide as the longest live row, and decode is bound by reading the KV, so one sdpa
call over all slots would read every shorter row's padding too. The slots are cut into contiguous groups
(`split_slots`) and a registered transformers attention function (`SLOT_ATTENTION`) runs one sdpa call per
group over that group's columns only (views, no copies). The heads that share a kv head form one query
block, so the KV is read once per group.
"""

from __future__ import annotations

from typing import Any

from selfdistill.engine import compat

SLOT_ATTENTION = "selfdistill_slots"  # sdpa, plus ragged decode over groups of slots
packed_calls = 0  # packed decode calls so far: a step checks that the model really used this attention

Group = tuple[int, int, int, int, Any]  # (lo, hi, first col, end col, bias or None)
Plan = list[tuple[int, int, int, bool]]  # (lo, hi, first col, whether some row starts after it)


def slot_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                   scaling: float | None = None, slot_groups: list[Group] | None = None,
                   slot_queries: tuple[Any, Any] | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' sdpa, except for a packed decode step given `slot_groups` and `slot_queries`.

    A packed step is one sequence holding every live row's last token and drafts, so the matmuls see no
    padding; `key`/`value` are the whole slot buffers. `slot_queries` = (pad, unpad): `pad` [slots, q]
    picks each row's queries out of the sequence (index `tokens` = a zero query for padding), `unpad`
    puts the results back in sequence order. Each group `(lo, hi, col, col_end, bias)` is a contiguous range
    of slots whose rows all lie within window columns `col:col_end`: it reads only those, with `bias` (or
    None) hiding each row's columns that are not its own and, for drafts, the ones after the query.
    """
    if slot_groups is None or slot_queries is None:
        return compat.sdpa_attention()(module, query, key, value, attention_mask, dropout=dropout,
                                       scaling=scaling, **kwargs)
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    global packed_calls
    packed_calls += 1
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


def slot_attention_available() -> bool:
    """Register `SLOT_ATTENTION` with transformers; False (with a warning) where that is not possible."""
    if not all([compat.usable("attention_registry"), compat.usable("attention_switch")]):  # each warns
        return False
    compat.register_attention(SLOT_ATTENTION, slot_attention)
    return True


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


def plan_groups(cache: Any, q: int, group_cost: int) -> Plan:
    """The grouping of the slots for steps of `q` queries per row, from each row's first window column.

    A row's live columns are one contiguous run ending at its newest column, so its first column and its end
    describe it. The plan only needs redoing when rows are filled or freed or the buffer moves.
    """
    ends = (cache.ends - cache.start + q).tolist()  # window-relative, past this step's columns
    first = cache.mask[:, cache.start:cache.end + q].argmax(1).tolist()  # first 1 per row
    return [(lo, hi, col, any(f > col for f in first[lo:hi])) for lo, hi, col in split_slots(first, ends, group_cost)]


def slot_groups(cache: Any, plan: Plan, q: int, kv_group: int, dtype: Any, device: Any) -> list[Group]:
    """This step's `(lo, hi, first col, end col, bias or None)` per planned group of slots (see slot_attention).

    A group needs no bias when its rows start at the group's first column and end together, one query each.
    """
    import torch

    c = cache
    ends = (c.ends - c.start + q).tolist()
    live = c.mask[:, c.start:c.end + q]
    groups = []
    for lo, hi, col, ragged_rows in plan:
        col_end = max(ends[lo:hi])
        if q == 1 and not ragged_rows and min(ends[lo:hi]) == col_end:
            groups.append((lo, hi, col, col_end, None))
            continue
        mask = live[lo:hi, None, col:col_end].bool()  # [rows, 1, cols]
        if q > 1:  # query i of a row sees its columns up to its own i-th new one
            upto = c.ends[lo:hi, None] - c.start + torch.arange(q)  # [rows, q]
            mask = mask & (torch.arange(col, col_end)[None, None, :] <= upto[:, :, None])
            mask = mask[:, None].expand(-1, kv_group, -1, -1).reshape(hi - lo, 1, kv_group * q, -1)
        else:
            mask = mask[:, None]
        # Additive, in the model's dtype: sdpa would convert a bool mask again in each of the layers.
        bias = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
        groups.append((lo, hi, col, col_end, bias.to(device)))
    return groups
