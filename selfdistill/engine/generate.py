"""The engine's entry on a loaded transformers model: `generate_hf`, and `length_sorted` for its prompts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from selfdistill.engine.batching import RefillEngine
from selfdistill.engine.params import GenParams, Result
from selfdistill.engine.prefill import Prompt


def generate_hf(model: Any, tokenizer: Any, prompts: Iterable[Prompt], params: GenParams) -> Iterator[Result]:
    """The default backend: the refilling engine on an already-loaded transformers model."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else params.stop_ids[0]
    return RefillEngine(model, params, pad).run(prompts)


def length_sorted(items: Iterable[Prompt], window: int) -> Iterator[Prompt]:
    """Longest prompt first within each window of `window` items: a refill then always fits the cache."""
    chunk: list[Prompt] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= window:
            yield from sorted(chunk, key=lambda x: -len(x[1]))
            chunk = []
    yield from sorted(chunk, key=lambda x: -len(x[1]))
