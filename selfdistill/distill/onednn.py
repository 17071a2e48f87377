"""Linear layers with weights reordered once for oneDNN, for the distill engine's bf16/fp16 CPU forwards.

`F.linear` on a 16-bit CPU tensor goes through oneDNN, which reorders the weight into its blocked (AMX / VNNI)
layout on every call. Doing that once per engine run, as inductor's freezing pass does for compiled models,
cut the 7 projections of a SmolLM2 layer to ~0.7-0.8x their time at 16-256 tokens, and its 49k-row LM head
to ~0.6-0.8x (bench/decode_shapes.py); a whole decode step took 0.90x (64 rows) and 0.91x (16 rows)
(bench/distill_engine_split.py --packed-ab 64,16).
Outputs are bit-identical at decode sizes; at prefill sizes (500+ rows) oneDNN may block the sum differently,
a bf16 rounding difference like any change of batch shape. The packed weights are one more copy of the linear
weights while the engine runs (+270 MB for SmolLM2-135M, +15 GB for an 8B model); they are dropped when it ends.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PACK_ROWS = 128  # oneDNN's layout hint: about the tokens per decode step; any row count works


def can_pack(model: Any) -> bool:
    import torch

    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (model.device.type == "cpu" and model.dtype in (torch.bfloat16, torch.float16)
            and torch.backends.mkldnn.is_available() and mkldnn is not None
            and hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise")
            and (model.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def _packed_forward(weight: Any, bias: Any, x: Any) -> Any:
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


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
                    packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), PACK_ROWS)
                    bias = None if module.bias is None else module.bias.detach()
                    module.forward = functools.partial(_packed_forward, packed, bias)
                    patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward  # the instance attribute goes; the class's forward is back
