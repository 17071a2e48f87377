"""The model's logits at answer positions only, shared by the trainer's loss and the KD cache's parent pass.

Its own module so that `trainer` (which uses the KD cache) and `kdcache` (which runs the parent) both
import it and neither imports the other.
"""

from __future__ import annotations

from typing import Any

import torch


def _masks_keep_logits() -> bool:
    """Whether models take a boolean `logits_to_keep` mask (transformers >= 5.21, `slice_logits_to_keep`).
    Older ones index [:, mask, :] and fail, so there every position is projected and the mask applied after:
    the same loss at the old cost of the full LM head."""
    import transformers.modeling_utils as mu

    return hasattr(mu, "slice_logits_to_keep")


MASKS_KEEP_LOGITS = _masks_keep_logits()


def answer_logits(model: Any, inputs: dict[str, Any], keep: torch.Tensor) -> Any:
    """The model's output with `.logits` only at the `keep` positions ([kept, vocab], row-major order)."""
    outputs = model(**inputs, use_cache=False, logits_to_keep=keep if MASKS_KEEP_LOGITS else 0)
    if not MASKS_KEEP_LOGITS:
        outputs.logits = outputs.logits[keep]
    return outputs
