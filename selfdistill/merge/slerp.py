"""Spherical linear interpolation (SLERP) of two weight tensors, per tensor.

As in PAPER.md §5 (and mergekit's `slerp`): cos Ω = p·q / (‖p‖‖q‖), then
SLERP(p, q; t) = sin((1−t)Ω)/sin Ω · p + sin(tΩ)/sin Ω · q, with a linear fallback when the two tensors are
nearly parallel (|cos Ω| > 1 − eps), where sin Ω → 0 makes the weights numerically useless.
"""

from __future__ import annotations

import math

import torch

from selfdistill.merge.linear import lerp

# mergekit's DOT_THRESHOLD: above this |cos Ω| the tensors count as parallel and we interpolate linearly.
PARALLEL_DOT = 0.9995


def slerp(p: torch.Tensor, q: torch.Tensor, t: float, parallel_dot: float = PARALLEL_DOT) -> torch.Tensor:
    """SLERP between same-shape tensors `p` (t = 0) and `q` (t = 1), returned in `p`'s dtype."""
    # The angle is computed in float64 so bf16 weights don't turn a tiny angle into a spurious one.
    a, b = p.detach().double().flatten(), q.detach().double().flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:  # a zero tensor has no direction; linear is the only sensible answer
        return lerp(p, q, t)
    dot = float(torch.dot(a / na, b / nb).clamp(-1.0, 1.0))
    if abs(dot) > parallel_dot:
        return lerp(p, q, t)
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    wa, wb = math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega
    return (wa * a + wb * b).view(p.shape).to(p.dtype)
