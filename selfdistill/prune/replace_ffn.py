"""`replace: ffn` (LLM-Streamline, arXiv 2403.19135): one light module trained in place of the removed block.

The module is a decoder layer of the model's own class whose attention output projection is zero, so it
computes h + MLP(post_attention_norm(h)) and plain `from_pretrained` loads it with no custom code. Its MLP
and norm start from the block's first layer and are trained by MSE between its output and the hidden state
that left the block, on the parent's hidden states. Those states are computed once and written in shards
to a cache folder beside the child (removed afterwards), then read shard by shard on every epoch, so the
calibration set need not fit in memory.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from selfdistill.console import progress
from selfdistill.models import decoder_layers
from selfdistill.prune.replace import RepairSettings, block_activations, learning_rate
from selfdistill.prune.scoring import Batch

log = logging.getLogger(__name__)

SHARD_TOKENS = 16_384
BATCH_TOKENS = 512


def write_shards(model: Any, batches: list[Batch], start: int, n: int, s: RepairSettings, cache: Path) -> list[Path]:
    """The block's input and output states of the fitted tokens, as float32 safetensors shards."""
    cache.mkdir(parents=True, exist_ok=True)  # the caller's fresh folder (never a path a user could own)
    shards: list[Path] = []
    pending: dict[str, list[torch.Tensor]] = {"h": [], "y": []}
    count = held = 0

    def flush() -> None:
        nonlocal held
        if held:
            path = cache / f"shard-{len(shards):05d}.safetensors"
            save_file({k: torch.cat(v).contiguous() for k, v in pending.items()}, str(path))
            shards.append(path)
            pending["h"], pending["y"], held = [], [], 0

    for a in block_activations(model, batches, start, n, s.exclude_first, desc="repair: caching states"):
        take = min(a["h"].shape[0], s.max_tokens - count)
        pending["h"].append(a["h"][:take].cpu())
        pending["y"].append(a["y"][:take].cpu())
        count, held = count + take, held + take
        if held >= SHARD_TOKENS:
            flush()
        if count >= s.max_tokens:
            break
    flush()
    return shards


def streamline_layer(model: Any, start: int) -> Any:
    """A float32 copy of the block's first layer with its attention silenced (o_proj = 0)."""
    layer = copy.deepcopy(decoder_layers(model)[start]).float()
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        if layer.self_attn.o_proj.bias is not None:
            layer.self_attn.o_proj.bias.zero_()
    return layer


def ffn_out(layer: Any, h: torch.Tensor) -> torch.Tensor:
    """What the silenced layer returns for input h: the residual plus its MLP."""
    return h + layer.mlp(layer.post_attention_layernorm(h))


def ffn_loss(out: torch.Tensor, y: torch.Tensor, weighting: str) -> torch.Tensor:
    """MSE per token; under `inverse_norm` each token's squared error is divided by ||y||^2 (a relative
    error), so the attention sink's huge state does not outweigh every other position (as in the linear fit)."""
    err = (out - y).pow(2).sum(-1)
    if weighting == "inverse_norm":
        err = err / y.pow(2).sum(-1).clamp_min(1e-12)
    return err.mean()


def _trainable(layer: Any) -> list[torch.nn.Parameter]:
    params = [*layer.mlp.parameters(), *layer.post_attention_layernorm.parameters()]
    for p in layer.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def train_ffn(model: Any, batches: list[Batch], start: int, n: int, s: RepairSettings,
              cache: Path) -> tuple[Any, dict[str, Any]]:
    """Train the stand-in layer; returns it (in the model's dtype and device) and its training record."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    try:
        shards = write_shards(model, batches, start, n, s, cache)
        layer = streamline_layer(model, start).to(device)
        params = _trainable(layer)
        sizes = [int(load_file(str(p))["h"].shape[0]) for p in shards]
        tokens = sum(sizes)
        steps = max(1, s.epochs * sum(math.ceil(n / BATCH_TOKENS) for n in sizes))  # batches never span shards
        opt = torch.optim.AdamW(params, lr=learning_rate(s), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / steps)))
        gen = torch.Generator().manual_seed(s.seed)
        curve = [_mse(layer, shards, device, s.weighting)]
        bar = progress(total=steps, desc="repair: training ffn", unit="step")
        for _ in range(s.epochs):
            for i in torch.randperm(len(shards), generator=gen).tolist():
                shard = load_file(str(shards[i]))
                order = torch.randperm(shard["h"].shape[0], generator=gen)
                for j in range(0, len(order), BATCH_TOKENS):
                    idx = order[j:j + BATCH_TOKENS]
                    h, y = shard["h"][idx].to(device), shard["y"][idx].to(device)
                    loss = ffn_loss(ffn_out(layer, h), y, s.weighting)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                    bar.update(1)
            curve.append(_mse(layer, shards, device, s.weighting))
        bar.close()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    for p in layer.parameters():
        p.requires_grad_(False)
    info = {"tokens": tokens, "epochs": s.epochs, "steps": steps, "lr": learning_rate(s),
            "final_lr": opt.param_groups[0]["lr"],
            "batch_tokens": BATCH_TOKENS, "shards": len(shards), "loss_by_epoch": curve,
            "loss": "relative squared error" if s.weighting == "inverse_norm" else "squared error",
            "initialised_from_layer": start}
    return layer.to(dtype), info


@torch.no_grad()
def _mse(layer: Any, shards: list[Path], device: Any, weighting: str) -> float:
    """The training loss over every cached token."""
    total, count = 0.0, 0
    for path in shards:
        shard = load_file(str(path))
        h, y = shard["h"].to(device), shard["y"].to(device)
        total += float(ffn_loss(ffn_out(layer, h), y, weighting)) * y.shape[0]
        count += y.shape[0]
    return total / max(count, 1)


def install_ffn(model: Any, start: int, n: int, layer: Any) -> None:
    """Put the stand-in at the block's first position (it inherits that layer's config entries); the
    caller then removes the block's other layers."""
    decoder_layers(model)[start] = layer
