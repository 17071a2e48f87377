"""Linear layers on weights reordered once for oneDNN, for the engine's bf16/fp16 CPU forwards.

`F.linear` on a 16-bit CPU tensor goes through oneDNN, which reorders the weight into its blocked (AMX /
VNNI) layout on every call. Reordering once per engine run, as inductor's freezing pass does for compiled
models, saves that work on every projection and the LM head (docs/distill.md). Outputs are bit-identical at
decode sizes; at prefill sizes oneDNN may block the sum differently, a 16-bit rounding difference like any
change of batch shape. The packed weights are one more copy of the linear weights while the engine runs;
they are dropped when it ends. The oneDNN ops themselves are private torch API, reached through compat.py.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from selfdistill.engine import compat

PACK_ROWS = 128  # oneDNN's layout hint: about the tokens per decode step; any row count works


def can_pack(model: Any) -> bool:
    """Whether `model` is a 16-bit CPU model whose linears oneDNN can run on packed weights."""
    return compat.onednn_can_pack(model)


@contextmanager
def packed_linears(model: Any, enabled: bool = True) -> Iterator[int]:
    """Within the block, every 16-bit `nn.Linear` of a CPU `model` runs on a packed copy of its weight.

    Yields how many layers were packed (0 when disabled or unsupported: then nothing changes). The modules'
    own weights stay as they are, so saving, training or reading the model elsewhere is unaffected.
    """
    import torch

    if not enabled or not can_pack(model):
        yield 0
        return
    patched = []
    try:
        with torch.no_grad():
            for module in model.modules():
                if type(module) is torch.nn.Linear and module.weight.dtype == model.dtype:
                    packed = compat.onednn_pack(module.weight.detach(), PACK_ROWS)
                    bias = None if module.bias is None else module.bias.detach()
                    compat.replace_forward(module, functools.partial(compat.onednn_linear, packed, bias))
                    patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            compat.restore_forward(module)
