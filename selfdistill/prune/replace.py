"""Repair the cut: stand-ins for the removed block, fitted on the parent's own hidden states.

- `linear` (ReplaceMe, arXiv 2505.02819): one d x d map T, fitted by least squares so that the last kept
  layer's MLP output X times T, plus that layer's residual R, matches the hidden state Y that left the
  removed block: min ||X T - (Y - R)||^2 + lambda ||T||^2. X^T X and X^T (Y - R) are sums over tokens,
  accumulated in float64 (and summed over ranks under torch.distributed), so memory is 2 d^2 doubles
  whatever the calibration size. T folds into that layer's `down_proj` (W <- T^T W), so the child keeps
  the plain architecture and parameter count.
- `cosine` (ReplaceMe's cosine objective): min mean(1 - cos(X T + R, Y)), solved with Adam from the
  linear solution on cached activations.
- `ffn` (LLM-Streamline, arXiv 2403.19135): `replace_ffn.py`.

Which tokens enter the fit: padding never does, and neither do the first `exclude_first` positions of
every row. The first position is the attention sink: its hidden state has a norm tens of times larger than
the others' and changes almost wholly across a block, so in an unweighted least-squares fit those few rows
dominate X^T X and the map that fits them wrecks every other position (docs/pruning.md has the measurement).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from selfdistill.console import progress
from selfdistill.errors import UserError
from selfdistill.models import decoder_layers, final_norm
from selfdistill.prune.scoring import Batch, _hidden, _model_inputs

log = logging.getLogger(__name__)

METHODS = ("none", "linear", "cosine", "ffn")
WEIGHTINGS = ("inverse_norm", "none")
# cosine starts at the least-squares optimum and only refines it; ffn trains an MLP from the block's first layer
DEFAULT_LR = {"cosine": 1e-4, "ffn": 1e-3}


def learning_rate(s: RepairSettings) -> float:
    return s.lr if s.lr is not None else DEFAULT_LR.get(s.method, 1e-4)


@dataclass(frozen=True)
class RepairSettings:
    method: str = "linear"
    ridge: float = 1e-4  # lambda = ridge x mean diagonal of X^T X (scale-free)
    exclude_first: int = 0  # leading positions of each row left out of the fit
    weighting: str = "inverse_norm"  # each token's residual scaled by 1 / ||Y|| (a relative-error fit), or "none"
    steps: int = 300  # Adam steps for `cosine`
    epochs: int = 8  # passes over the cached hidden states for `ffn`
    lr: float | None = None  # Adam learning rate; None: DEFAULT_LR of the method
    max_tokens: int = 262_144  # tokens cached for `cosine` / `ffn` (the linear sums use every token)
    seed: int = 0


class _Stop(Exception):
    """Raised by the hook at the block's end: the layers after it are not needed for the fit."""


def check_block(model: Any, start: int, n: int, method: str) -> None:
    """Refuse blocks and architectures a method cannot repair, in one line, before any work."""
    layers = decoder_layers(model)
    if method in ("linear", "cosine"):
        if start == 0:
            raise UserError(f"replace {method} folds its map into the layer before the block, and block "
                            f"{start}:{start + n} starts at layer 0 (choose another block or replace: ffn)")
        prev = layers[start - 1]
        if not hasattr(getattr(prev, "mlp", None), "down_proj") or hasattr(prev, "post_feedforward_layernorm"):
            raise UserError(f"replace {method} needs an MLP whose down_proj output is added to the residual "
                            f"directly; {type(prev).__name__} has none (use replace: ffn or none)")
    if method == "ffn":
        layer = layers[start]
        if not all(hasattr(layer, a) for a in ("mlp", "post_attention_layernorm", "self_attn")) or \
                hasattr(layer, "post_feedforward_layernorm") or not hasattr(layer.self_attn, "o_proj"):
            raise UserError(f"replace ffn needs a pre-norm layer (self_attn.o_proj, post_attention_layernorm, "
                            f"mlp); {type(layer).__name__} does not have that shape")


def fit_mask(batch: Batch, exclude_first: int) -> torch.Tensor:
    """The (B, T) tokens that enter a fit: real tokens past the first `exclude_first` positions."""
    keep = batch["attention_mask"].bool().clone()
    keep[:, :exclude_first] = False
    return keep


@torch.no_grad()
def block_activations(model: Any, batches: list[Batch], start: int, n: int, exclude_first: int,
                      desc: str = "repair: hidden states") -> Iterator[dict[str, torch.Tensor]]:
    """Per batch, the fitted tokens' float32 states (N, d): `h` entering the block, `y` leaving it, and
    (when there is a layer before the block) `x` that layer's MLP output and `r` its residual, h = r + x."""
    layers = decoder_layers(model)
    got: dict[str, torch.Tensor] = {}
    handles = []
    if start > 0 and hasattr(getattr(layers[start - 1], "mlp", None), "down_proj"):
        handles.append(layers[start - 1].mlp.register_forward_hook(lambda m, a, out: got.__setitem__("x", out)))

    def enter(module, args, kwargs):
        got["h"] = _hidden(args, kwargs)

    def leave(module, args, kwargs):
        got["y"] = _hidden(args, kwargs)
        raise _Stop

    handles.append(layers[start].register_forward_pre_hook(enter, with_kwargs=True))
    end = layers[start + n] if start + n < len(layers) else final_norm(model)
    handles.append(end.register_forward_pre_hook(leave, with_kwargs=True))
    try:
        for batch in progress(batches, desc=desc, unit="batch"):
            got.clear()
            with contextlib.suppress(_Stop):
                model(**_model_inputs(batch), use_cache=False)
            keep = fit_mask(batch, exclude_first)
            out = {k: got[k][keep].float() for k in ("h", "y")}
            if "x" in got:
                out["x"] = got["x"][keep].float()
                out["r"] = out["h"] - out["x"]
            yield out
    finally:
        for h in handles:
            h.remove()


def _all_reduce(*tensors: torch.Tensor) -> None:
    """Sum over ranks when a caller shards the calibration batches (each rank ran its own). NCCL reduces only
    CUDA tensors, so the sums travel through the GPU there and come back."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    on_gpu = torch.distributed.get_backend() == "nccl"
    for t in tensors:
        moved = t.cuda() if on_gpu else t
        torch.distributed.all_reduce(moved)
        t.copy_(moved.cpu())


def linear_stats(model: Any, batches: list[Batch], start: int, n: int, exclude_first: int,
                 weighting: str = "inverse_norm") -> tuple[torch.Tensor, torch.Tensor, int]:
    """X^T X, X^T (Y - R) in float64 and the token count, over every fitted calibration token (each token's
    row scaled by 1 / ||Y|| under `inverse_norm`)."""
    d = decoder_layers(model)[start - 1].mlp.down_proj.out_features
    xtx = torch.zeros(d, d, dtype=torch.float64)
    xtz = torch.zeros(d, d, dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    for a in block_activations(model, batches, start, n, exclude_first, desc="repair: linear fit"):
        x, y = a["x"].double().cpu(), a["y"].double().cpu()
        z = y - a["r"].double().cpu()
        if weighting == "inverse_norm":
            w = 1.0 / y.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            x, z = x * w, z * w
        xtx += x.T @ x
        xtz += x.T @ z
        tokens += x.shape[0]
    _all_reduce(xtx, xtz, tokens)
    return xtx, xtz, int(tokens)


def solve_linear(xtx: torch.Tensor, xtz: torch.Tensor, tokens: int, ridge: float) -> torch.Tensor:
    """T = (X^T X + lambda I)^-1 X^T (Y - R), lambda = ridge x mean diagonal of X^T X."""
    d = xtx.shape[0]
    if tokens < d and ridge <= 0:
        raise UserError(f"the linear fit has {tokens} calibration tokens for a hidden size of {d}: it is "
                        f"underdetermined; give more calibration rows or a replace_ridge above 0")
    lam = ridge * float(xtx.diagonal().mean())
    return torch.linalg.solve(xtx + lam * torch.eye(d, dtype=xtx.dtype), xtz)


def cached_tokens(model: Any, batches: list[Batch], start: int, n: int, s: RepairSettings,
                  keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The fitted tokens' states for `keys`, concatenated (at most s.max_tokens, in calibration order)."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    count = 0
    for a in block_activations(model, batches, start, n, s.exclude_first, desc="repair: caching states"):
        take = min(a["h"].shape[0], s.max_tokens - count)
        for k in keys:
            parts[k].append(a[k][:take].cpu())
        count += take
        if count >= s.max_tokens:
            break
    return {k: torch.cat(v) for k, v in parts.items()}


def cosine_loss(x: torch.Tensor, r: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(x @ t + r, y, dim=-1)).mean()


def fit_cosine(cache: dict[str, torch.Tensor], t0: torch.Tensor, s: RepairSettings) -> tuple[torch.Tensor, list[float]]:
    """ReplaceMe's cosine objective by Adam from the least-squares map; returns T and the loss every 50 steps."""
    x, r, y = cache["x"], cache["r"], cache["y"]
    t = t0.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([t], lr=learning_rate(s))
    gen = torch.Generator().manual_seed(s.seed)
    batch = min(4096, x.shape[0])
    curve = [float(cosine_loss(x, r, y, t.detach()))]
    for step in progress(range(s.steps), desc="repair: cosine fit", unit="step"):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        loss = cosine_loss(x[idx], r[idx], y[idx], t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == s.steps:
            curve.append(float(cosine_loss(x, r, y, t.detach())))
    return t.detach().double(), curve


def fit_map(model: Any, batches: list[Batch], start: int, n: int, s: RepairSettings) -> tuple[torch.Tensor, dict]:
    """The map T for `linear` or `cosine`, and what the fit records in pruning.json."""
    xtx, xtz, tokens = linear_stats(model, batches, start, n, s.exclude_first, s.weighting)
    t = solve_linear(xtx, xtz, tokens, s.ridge)
    info: dict[str, Any] = {"tokens": tokens}
    if s.method == "cosine":
        cache = cached_tokens(model, batches, start, n, s, ("x", "r", "y"))
        t, curve = fit_cosine(cache, t, s)
        info.update(cosine_steps=s.steps, cosine_lr=learning_rate(s), cosine_tokens=int(cache["x"].shape[0]),
                    cosine_loss_curve=curve)
    return t, info


def fold_map(model: Any, start: int, t: torch.Tensor) -> None:
    """Fold T into the down_proj of the layer before the block: (a W^T + b) T = a (T^T W)^T + T^T b."""
    proj = decoder_layers(model)[start - 1].mlp.down_proj
    with torch.no_grad():
        tt = t.T.to(torch.float64)
        proj.weight.copy_((tt @ proj.weight.double().cpu()).to(proj.weight.dtype))
        if proj.bias is not None:
            proj.bias.copy_((tt @ proj.bias.double().cpu()).to(proj.bias.dtype))


@contextlib.contextmanager
def folded(model: Any, start: int, t: torch.Tensor) -> Iterator[None]:
    """The map folded in for the duration (a loss check on the parent), the original weights restored."""
    proj = decoder_layers(model)[start - 1].mlp.down_proj
    saved = (proj.weight.detach().clone(), None if proj.bias is None else proj.bias.detach().clone())
    fold_map(model, start, t)
    try:
        yield
    finally:
        with torch.no_grad():
            proj.weight.copy_(saved[0])
            if saved[1] is not None:
                proj.bias.copy_(saved[1])
