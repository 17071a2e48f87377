"""Partial fine-tuning: chosen decoder layers (plus optionally the final norm and LM head) in full rank.

Fine-tuning only the last layers and the LM head recovers a depth-pruned model better than LoRA
("Reassessing Layer Pruning in LLMs", arXiv 2411.15558). Everything else is frozen, the embeddings
included, so autograd records nothing below the first trained layer and the backward pass stops there:
on a CPU that is most of the saving. Frozen weights stay in the compute dtype (bf16 where native), the
trained ones are fp32 masters under autocast, as full fine-tuning keeps them; at save time the trained
tensors are written into an fp32 reload of the child, so the frozen weights are saved exactly as they came.

Tied embeddings (SmolLM2 ties the LM head to the input embedding): training the head would also move
the embedding of every prompt token. The head is untied first, as a fp32 copy of the embedding matrix,
and the saved model says `tie_word_embeddings: false` (one more vocab x hidden matrix on disk).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from selfdistill.errors import UserError
from selfdistill.models import decoder_layers

log = logging.getLogger(__name__)


def _cut(model_dir: str) -> int:
    """Index, in the child, of the first layer after the (first) removed block, from prune's pruning.json."""
    report = Path(model_dir).expanduser() / "pruning.json"
    if not report.is_file():
        raise UserError(f"train_layers after_cut needs the prune stage's pruning.json in {model_dir}; "
                        "give last:N or START:END instead")
    removed = json.loads(report.read_text())["removed_layers"]
    return min(removed)


def select_layers(spec: str, n_layers: int, model_dir: str) -> list[int]:
    """Decoder layer indices of the child for `last:N`, `after_cut` or `START:END` (end exclusive)."""
    try:
        if spec == "after_cut":
            start, end = _cut(model_dir), n_layers
        elif spec.startswith("last:"):
            n = int(spec[5:])
            start, end = n_layers - n, n_layers
            if n < 1:
                raise ValueError
        else:
            start, end = (int(x) for x in spec.split(":"))
    except ValueError:
        raise UserError(f"train_layers '{spec}': use last:N, after_cut or START:END") from None
    if not 0 <= start < end <= n_layers:
        raise UserError(f"train_layers '{spec}' selects layers {start}..{end - 1}, outside the child's "
                        f"{n_layers} layers (0..{n_layers - 1})")
    return list(range(start, end))


def _untie_head(model: Any) -> None:
    import torch

    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = torch.nn.Parameter(embed.weight.detach().float().clone())
    model.config.tie_word_embeddings = False
    model.config.get_text_config().tie_word_embeddings = False


def trained_modules(model: Any, layers: list[int], lm_head: bool, norm: bool) -> dict[str, Any]:
    """name -> module for every trained part."""
    names = {id(m): n for n, m in model.named_modules()}
    chosen = {names[id(layer)]: layer for i, layer in enumerate(decoder_layers(model)) if i in layers}
    if norm:
        final = getattr(getattr(model, "model", model), "norm", None)
        if final is None:
            raise UserError(f"train_norm: {type(model).__name__} has no final norm at model.norm")
        chosen[names[id(final)]] = final
    if lm_head:
        chosen[names[id(model.get_output_embeddings())]] = model.get_output_embeddings()
    return chosen


def freeze_for_partial(model: Any, spec: str, lm_head: bool, norm: bool, model_dir: str) -> list[str]:
    """Freeze everything but the chosen parts, which become fp32 and trainable; returns their names."""
    layers = select_layers(spec, len(decoder_layers(model)), model_dir)
    if lm_head:
        _untie_head(model)
    model.requires_grad_(False)
    chosen = trained_modules(model, layers, lm_head, norm)
    for module in chosen.values():
        module.float().requires_grad_(True)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("partial: training %s (%s parameters, layers %d..%d)", ", ".join(chosen), f"{n:,}", layers[0],
             layers[-1])
    return sorted(chosen)


def trained_state(model: Any) -> dict[str, Any]:
    """The trained tensors (fp32), by parameter name."""
    return {n: p.detach().float() for n, p in model.named_parameters() if p.requires_grad}


def saved_model(model_dir: str, model: Any, lm_head: bool, allow_pickle: bool) -> Any:
    """The child reloaded in fp32 with the trained tensors put in (frozen weights exactly as loaded)."""
    from selfdistill.models import load_model

    base, _ = load_model(model_dir, dtype="float32", allow_pickle=allow_pickle, with_tokenizer=False)
    if lm_head:
        _untie_head(base)
    state = trained_state(model)
    missing = [k for k in state if k not in dict(base.named_parameters())]
    if missing:
        raise RuntimeError(f"partial: trained tensors not in the reloaded child: {missing[:3]}")
    base.load_state_dict(state, strict=False)
    return base
