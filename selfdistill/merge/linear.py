"""Linear interpolation of two weight tensors: (1 − t)·p + t·q (model soup / weight averaging)."""

from __future__ import annotations

import torch


def lerp(p: torch.Tensor, q: torch.Tensor, t: float) -> torch.Tensor:
    """(1 − t)·p + t·q, computed in float64 and returned in `p`'s dtype; exact at t = 0 and t = 1."""
    a, b = p.detach().double(), q.detach().double()
    return ((1.0 - t) * a + t * b).to(p.dtype)
