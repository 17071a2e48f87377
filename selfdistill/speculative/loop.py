"""Greedy draft-then-verify speculative decoding with KV caches, and its exact statistics.

Leviathan et al. (arXiv 2211.17192) with greedy acceptance: the draft proposes k tokens, the target scores
them in one forward pass, the longest agreeing prefix is kept plus one token from the target. Statistics use
vLLM's names: draft acceptance rate = accepted / proposed, mean acceptance length (MAL) = 1 + accepted / drafts
(tokens per verify pass), and per-position acceptance = accepted at position i / drafts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from selfdistill.models import cache_kwargs


class Runner(Protocol):
    """A model with a KV cache: `feed` appends tokens and returns the greedy next token after each of them."""

    def __len__(self) -> int: ...

    def feed(self, tokens: list[int]) -> list[int]: ...

    def crop(self, length: int) -> None: ...


class ModelRunner:
    """An HF causal LM plus a DynamicCache, batch 1; `crop` rolls the cache back after a rejection."""

    def __init__(self, model: Any) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.device = next(model.parameters()).device

    def __len__(self) -> int:
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def feed(self, tokens: list[int]) -> list[int]:
        ids = torch.tensor([tokens], device=self.device)
        logits = self.model(input_ids=ids, use_cache=True, **cache_kwargs(self.model, self.cache)).logits[0]
        return logits.argmax(-1).tolist()

    def crop(self, length: int) -> None:
        extra = len(self) - length
        if extra > 0:
            self.cache.crop(-extra)  # transformers 5: a negative count removes that many tokens


@dataclass
class SpecStats:
    """Counts over one or many prompts; the rates are derived, so stats from several prompts just add up."""

    k: int
    drafts: int = 0  # verify passes that checked proposals (one per draft round)
    proposed: int = 0
    accepted: int = 0
    target_passes: int = 0  # prefill + verify passes
    emitted: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.accepted_per_pos = self.accepted_per_pos or [0] * self.k

    def add(self, other: SpecStats) -> None:
        for name in ("drafts", "proposed", "accepted", "target_passes", "emitted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.accepted_per_pos = [a + b for a, b in zip(self.accepted_per_pos, other.accepted_per_pos)]

    def summary(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "draft_acceptance_rate": self.accepted / self.proposed if self.proposed else 0.0,
            "mean_acceptance_length": 1 + self.accepted / self.drafts if self.drafts else 0.0,
            "acceptance_per_position": [a / self.drafts if self.drafts else 0.0 for a in self.accepted_per_pos],
            "tokens_per_target_pass": self.emitted / self.target_passes if self.target_passes else 0.0,
            "num_drafts": self.drafts, "num_draft_tokens": self.proposed, "num_accepted_tokens": self.accepted,
            "target_forward_passes": self.target_passes, "emitted_tokens": self.emitted,
        }


def speculative_generate(target: Runner, draft: Runner, prompt: list[int], k: int, max_new_tokens: int,
                         eos: set[int]) -> tuple[list[int], SpecStats]:
    """Greedy speculative decoding of `prompt`; returns the new tokens (== the target's greedy output) and counts."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    stats = SpecStats(k=k)
    out = [target.feed(prompt)[-1]]  # prefill: the first token is the target's
    stats.target_passes = 1
    draft.feed(prompt)
    while len(out) < max_new_tokens and not eos.intersection(out):
        seq_len = len(prompt) + len(out)
        proposals = _propose(draft, prompt + out, k)
        # The target has seen prompt + out[:-1]; it scores out[-1] and every proposal in one pass.
        verdict = target.feed([out[-1], *proposals])
        stats.target_passes += 1
        stats.drafts += 1
        stats.proposed += k
        n = 0
        while n < k and proposals[n] == verdict[n]:
            stats.accepted_per_pos[n] += 1
            n += 1
        stats.accepted += n
        out.extend(proposals[:n] + [verdict[n]])
        # Keep only the accepted prefix in both caches (the bonus token is not in either cache yet).
        target.crop(seq_len + n)
        draft.crop(min(len(draft), seq_len + n))
    out = _truncate(out, max_new_tokens, eos)
    stats.emitted = len(out)
    return out, stats


def _propose(draft: Runner, seq: list[int], k: int) -> list[int]:
    """k greedy draft tokens; the draft first catches up on the tokens of `seq` it has not seen."""
    pending = seq[len(draft):]
    proposals: list[int] = []
    for _ in range(k):
        proposals.append(draft.feed(pending)[-1])
        pending = [proposals[-1]]
    return proposals


def _truncate(tokens: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    tokens = tokens[:max_new_tokens]
    for i, tok in enumerate(tokens):
        if tok in eos:
            return tokens[: i + 1]
    return tokens


def greedy_generate(target: Runner, prompt: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """The target alone, one token per forward pass, through the same cache path (the reference output)."""
    out = [target.feed(prompt)[-1]]
    while len(out) < max_new_tokens and out[-1] not in eos:
        out.append(target.feed([out[-1]])[-1])
    return out
