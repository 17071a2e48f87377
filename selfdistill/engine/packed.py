"""The packed decode step's layout: every live row's last token and drafts as one sequence.

A packed step has no padded rows in its matmuls (free slots cost nothing). Token j of the sequence belongs
to slot `rows[j]` and is that row's `steps[j]`-th new token, written at KV column `cols[j]`. The attention
pads each row's queries only inside the slot attention (`pad`, `unpad`: attention.py). A row keeps its
drafts up to the first one its own argmax disagrees with, plus that argmax (`accept_drafts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class PackedLayout:
    ids: list[int]  # the sequence: per live row, its last token then its drafts
    rows: Any  # [tokens] slot of each token
    steps: Any  # [tokens] its place among its row's new tokens (0 = the row's last token)
    cols: Any  # [tokens] KV column it is written to
    pad: Any  # [slots, q] index of each row's i-th query in the sequence; len(ids) = a zero query
    unpad: Any  # [tokens] where each token's output sits in the padded [slots x q] block
    q: int  # most queries of any row


def packed_layout(live: list[int], drafts: list[list[int]], last: list[int], ends: Any, slots: int) -> PackedLayout:
    """The sequence and indices for `live` slots with these `drafts`, last tokens and KV `ends`."""
    import torch

    ids = [t for s, d in zip(live, drafts) for t in [last[s], *d]]
    lens = [1 + len(d) for d in drafts]
    q = max(lens)
    rows = torch.tensor([s for s, n in zip(live, lens) for _ in range(n)])
    steps = torch.tensor([i for n in lens for i in range(n)])
    pad = torch.full((slots, q), len(ids), dtype=torch.long)
    pad[rows, steps] = torch.arange(len(ids))
    return PackedLayout(ids, rows, steps, ends[rows] + steps, pad, rows * q + steps, q)


def accept_drafts(live: list[int], drafts: list[list[int]], picked: list[int],
                  slots: int) -> tuple[list[tuple[int, list[int]]], Any]:
    """(slot, tokens it emits) per live row, and how far each slot advances ([slots]).

    `picked` is the argmax after every token of the sequence. A row emits the argmax after its last token,
    and after each draft as long as the draft before it was what the model picked.
    """
    import torch

    emitted, at, advance = [], 0, torch.zeros(slots, dtype=torch.long)
    for s, d in zip(live, drafts):
        agree = 0  # the row keeps its drafts up to the first one its own argmax disagrees with
        while agree < len(d) and picked[at + agree] == d[agree]:
            agree += 1
        emitted.append((s, picked[at:at + agree + 1]))
        advance[s] = agree + 1
        at += 1 + len(d)
    return emitted, advance
