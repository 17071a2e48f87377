"""Cost profile: parameters, FLOPs per token (as the paper counts and as executed), latency."""

from __future__ import annotations

from typing import Any


def count_parameters(model: Any) -> dict[str, int]:
    """Unique parameters (tied embeddings counted once), the embedding share, and per decoder layer."""
    from selfdistill.models import decoder_layers

    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    embedding = model.get_input_embeddings().weight.numel()
    layers = decoder_layers(model)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding, "per_layer": per_layer}


def paper_flops_per_token(parameters: int) -> int:
    """The paper's count: 2 FLOPs per parameter per token, embeddings included."""
    return 2 * parameters
