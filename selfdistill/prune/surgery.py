"""Layer surgery: remove decoder layers and leave a model that plain transformers reloads.

Removing layers is more than deleting modules: attention layers index the KV cache by
`layer_idx`, per-layer config lists (e.g. Gemma2's alternating `layer_types`) must keep
describing the layers that remain, and the config must say how many layers there are.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.nn as nn

from selfdistill.errors import UserError
from selfdistill.models import decoder_layers, set_decoder_layers, text_config

log = logging.getLogger(__name__)


def format_range(layers: list[int]) -> str:
    """Unambiguous text for a set of 0-based layers: '[10, 16) = layers 10..15 (0-based)' when contiguous."""
    layers = sorted(layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"[{layers[0]}, {layers[-1] + 1}) = layers {layers[0]}..{layers[-1]} (0-based, end-exclusive)"
    return f"layers {layers} (0-based)"


def parse_range(text: str, num_layers: int) -> list[int]:
    """'10:16' -> [10..15] (0-based, end-exclusive), checked against the model's layer count."""
    try:
        start_s, end_s = text.split(":")
        start, end = int(start_s), int(end_s)
    except ValueError:
        raise UserError(f"--layers must look like START:END (0-based, end-exclusive), not '{text}'") from None
    if start < 0:
        raise UserError(f"--layers {text}: START must be 0 or more (layers count from 0)")
    if start >= end:
        raise UserError(f"--layers {text}: START must be below END (END is exclusive: {start}:{start + 1} "
                        f"removes layer {start} alone)")
    if end > num_layers:  # checked again once the model is loaded (before, num_layers is unbounded)
        raise UserError(f"--layers {text}: END {end} is past the model's {num_layers} layers")
    if end - start >= num_layers:
        raise UserError(f"--layers {text} would remove all {num_layers} layers")
    return list(range(start, end))


def remove_layers(model: Any, removed: list[int]) -> Any:
    """Remove the given 0-based decoder layers in place and fix indices and config; returns model."""
    layers = decoder_layers(model)
    total = len(layers)
    removed_set = set(removed)
    if not removed_set or not removed_set <= set(range(total)) or len(removed_set) >= total:
        raise UserError(f"cannot remove {sorted(removed_set)} from a model with {total} layers")
    kept = [i for i in range(total) if i not in removed_set]
    set_decoder_layers(model, nn.ModuleList([layers[i] for i in kept]))
    for new_idx, layer in enumerate(decoder_layers(model)):
        # The KV cache is indexed by layer_idx; stale indices would make generation read the wrong cache slot.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    config = text_config(model)
    for key, value in list(vars(config).items()):
        # Per-layer lists (layer_types, no_rope_layers, ...) must keep describing the layers that remain.
        if isinstance(value, (list, tuple)) and len(value) == total and key != "architectures":
            setattr(config, key, type(value)(value[i] for i in kept))
    config.num_hidden_layers = len(kept)
    # Indices refer to the model this one was cut from (recorded as `pruned_from` by the prune stage).
    config.removed_layers = sorted(removed_set)
    log.info("removed %s; %d layers remain", format_range(sorted(removed_set)), len(kept))
    return model
