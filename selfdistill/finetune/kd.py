"""Token-level divergences between the child (student) and the parent (teacher).

Logit distillation is how Minitron recovers pruned models (Muralidharan et al., arXiv 2407.14679);
TRL's GKD (Agarwal et al., arXiv 2306.13649) uses the generalized JSD. Both take logits at the same
answer positions, shape (n_tokens, vocab), and return per-token values (summed by the caller).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per token, scaled by T^2 so gradients keep their size across temperatures."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1) * temperature**2


def jsd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence per token (GKD's beta=0.5 is the symmetric JSD)."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    # log of the mixture (1-beta)*p_s + beta*p_t, computed in log space for stability
    log_m = torch.logsumexp(torch.stack([log_s + math.log(1 - beta), log_t + math.log(beta)]), dim=0)
    kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
    kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
    return (beta * kl_t + (1 - beta) * kl_s) * temperature**2


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {"kl": forward_kl, "jsd": jsd}
