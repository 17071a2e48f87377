"""Layer-redundancy scorers over calibration text (registry `SCORERS`).

- `angular` (Gromov et al., arXiv 2403.17887): d(l, n) = arccos(cos(x_T^(l), x_T^(l+n))) / pi, where
  x^(l) is the residual stream entering layer l, x^(L) the last layer's output *before* the final
  norm, and T the last token of the sample's content (`calibration.py`: not the chat template's closing
  tokens, which the early layers barely change); averaged over samples. One forward pass per batch gives
  the whole matrix for every block size n and start l (hooks record every layer's input).
- `block_influence` (ShortGPT, arXiv 2403.03853): BI_l = 1 - mean over tokens of cos(x^(l), x^(l+1)),
  per layer; the n least influential layers are removed (not necessarily contiguous).
- `loss` (Shortened LLaMA / SLEB): increase of next-token loss on the calibration text when block
  l..l+n-1 is skipped; one forward pass per candidate block.
Every scorer returns lower = more removable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from selfdistill.console import progress
from selfdistill.models import decoder_layers, final_norm

Batch = dict[str, torch.Tensor]


@dataclass
class LayerScores:
    scorer: str
    n: int
    block_sizes: list[int]  # the row labels of `matrix`
    matrix: list[list[float | None]]  # [block size][start layer]; None where the block runs past the end
    removed: list[int]  # the layers this scorer would remove for n
    per_layer: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def per_start(self) -> list[float | None]:
        return self.matrix[self.block_sizes.index(self.n)] if self.n in self.block_sizes else []


def _model_inputs(batch: Batch) -> Batch:
    """What the model's forward takes (the batch also carries the content positions)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _ResidualRecorder:
    """Hooks on every decoder layer's input and on the final norm's input (= pre-norm output of layer L).

    For each batch it keeps the last-token states (L+1, B, d) and accumulates ShortGPT's per-layer
    token-averaged cosine between consecutive states, without storing full sequences.
    """

    def __init__(self, model: Any):
        self.layers = decoder_layers(model)
        self.handles = [layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i, layer in enumerate(self.layers)]
        self.handles.append(final_norm(model).register_forward_pre_hook(self._hook(len(self.layers)),
                                                                        with_kwargs=True))
        self.mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.last: list[torch.Tensor] = []
        self.prev: torch.Tensor | None = None
        self.bi_sum = torch.zeros(len(self.layers), dtype=torch.float64)
        self.tokens = 0

    def _hook(self, index: int) -> Callable:
        def hook(module, args, kwargs):
            x = _hidden(args, kwargs).float()
            assert self.mask is not None and self.positions is not None
            rows = torch.arange(x.shape[0], device=x.device)
            self.last.append(x[rows, self.positions].cpu())
            if self.prev is not None:
                cos = F.cosine_similarity(self.prev, x, dim=-1)  # (B, T)
                self.bi_sum[index - 1] += (cos * self.mask).sum().double().cpu()
            self.prev = x
        return hook

    def start_batch(self, batch: Batch) -> None:
        mask = batch["attention_mask"]
        self.mask, self.positions, self.last, self.prev = mask.float(), batch["positions"], [], None
        self.tokens += int(mask.sum())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def angular_distance_matrix(states: torch.Tensor) -> torch.Tensor:
    """states (L+1, B, d) -> per-sample d(l, l+n) for all pairs as (L+1, L+1, B): arccos(cos)/pi."""
    unit = F.normalize(states.double(), dim=-1)
    cos = torch.einsum("ibd,jbd->ijb", unit, unit).clamp(-1.0, 1.0)
    return torch.arccos(cos) / math.pi


@torch.no_grad()
def _record(model: Any, batches: list[Batch]) -> tuple[torch.Tensor, int, torch.Tensor, int]:
    """Run the calibration batches once; return summed pairwise distances, sample count, BI sums, tokens."""
    recorder = _ResidualRecorder(model)
    L = len(recorder.layers)
    dist_sum = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    samples = 0
    try:
        for batch in progress(batches, desc="scoring layers", unit="batch"):
            recorder.start_batch(batch)
            model(**_model_inputs(batch), use_cache=False)
            states = torch.stack(recorder.last)  # (L+1, B, d)
            dist_sum += angular_distance_matrix(states).sum(dim=-1)
            samples += states.shape[1]
    finally:
        recorder.remove()
    return dist_sum, samples, recorder.bi_sum, recorder.tokens


def score_angular(model: Any, batches: list[Batch], n: int) -> LayerScores:
    dist_sum, samples, bi_sum, tokens = _record(model, batches)
    L = dist_sum.shape[0] - 1
    mean = dist_sum / samples
    matrix = [[float(mean[l, l + size]) if l + size <= L else None for l in range(L)] for size in range(1, L)]
    row = matrix[n - 1]
    ell_star = min((d, l) for l, d in enumerate(row) if d is not None)[1]
    return LayerScores("angular", n, list(range(1, L)), matrix, list(range(ell_star, ell_star + n)),
                       per_layer=(1.0 - bi_sum / tokens).tolist(), extra={"samples": samples})


def score_block_influence(model: Any, batches: list[Batch], n: int) -> LayerScores:
    _, samples, bi_sum, tokens = _record(model, batches)
    bi = (1.0 - bi_sum / tokens).tolist()
    removed = sorted(sorted(range(len(bi)), key=lambda i: bi[i])[:n])
    return LayerScores("block_influence", n, [1], [bi], removed, per_layer=bi,
                       extra={"samples": samples, "tokens": tokens})


class _Skip(torch.nn.Module):
    """Stands in for a decoder layer and passes the residual stream through unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@torch.no_grad()
def mean_loss(model: Any, batches: Iterable[Batch]) -> float:
    """Mean next-token loss over the batches' non-padding tokens."""
    total, count = 0.0, 0
    for batch in batches:
        logits = model(**_model_inputs(batch), use_cache=False).logits[:, :-1].float()
        labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((labels != -100).sum())
    return total / max(count, 1)


def loss_without_block(model: Any, batches: list[Batch], start: int, n: int) -> float:
    """Mean next-token loss with layers start..start+n-1 skipped (restored afterwards)."""
    layers = decoder_layers(model)
    saved = [layers[i] for i in range(start, start + n)]
    try:
        for i in range(start, start + n):
            layers[i] = _Skip()
        return mean_loss(model, batches)
    finally:
        for i, layer in zip(range(start, start + n), saved):
            layers[i] = layer


def score_loss(model: Any, batches: list[Batch], n: int) -> LayerScores:
    L = len(decoder_layers(model))
    base = mean_loss(model, batches)
    row: list[float | None] = [None] * L
    for l in progress(range(L - n + 1), desc="loss per skipped block", unit="block"):
        row[l] = loss_without_block(model, batches, l, n) - base
    ell_star = min((d, l) for l, d in enumerate(row) if d is not None)[1]
    return LayerScores("loss", n, [n], [row], list(range(ell_star, ell_star + n)), extra={"base_loss": base})


SCORERS: dict[str, Callable[[Any, list[Batch], int], LayerScores]] = {
    "angular": score_angular,
    "block_influence": score_block_influence,
    "loss": score_loss,
}
