"""Generation backends (`BACKENDS`): `hf`, our refilling engine on transformers, and `vllm`.

Each opener loads the teacher once and returns (tokenizer, generate) where `generate(prompts,
params, keys=None, counters=None)` yields `Result`s as rows finish; vLLM is an optional extra and its
absence is a clear error. With `keys` (prompt index -> sampling key) sampling is seeded per prompt, so
an attempt draws the same tokens whatever else is in the batch (best-of-k, distill/attempts.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from selfdistill.distill.generate import GenParams, Result, generate_hf, length_sorted, stop_token_ids
from selfdistill.distill.sampled import generate_seeded
from selfdistill.errors import UserError

GenerateFn = Callable[..., Iterator[Result]]


def open_hf(teacher: str, dtype: str, device: str) -> tuple[Any, GenerateFn]:
    from selfdistill.models import load_model

    model, tok = load_model(teacher, dtype=dtype, device=device)
    params_stop = stop_token_ids(tok, model)

    def run(prompts: Iterable[tuple[int, list[int]]], params: GenParams, keys: dict[int, int] | None = None,
            counters: dict[str, int] | None = None) -> Iterator[Result]:
        window = max(1, 8 * params.batch_size)
        params = GenParams(**{**params.__dict__, "stop_ids": params.stop_ids or params_stop})
        if keys is not None and params.temperature > 0:
            # length_sorted's sort is stable, so a prompt's copies stay adjacent and share a prefill chunk
            return generate_seeded(model, tok, length_sorted(prompts, window), params, keys, counters)
        return generate_hf(model, tok, length_sorted(prompts, window), params)

    return tok, run


def open_vllm(teacher: str, dtype: str, device: str) -> tuple[Any, GenerateFn]:
    """vLLM does its own continuous batching; we hand it a window of prompts at a time so rows stream out."""
    try:
        import vllm
    except ImportError:
        raise UserError("backend 'vllm' needs vLLM, which is not installed "
                        "(pip install 'selfdistill[vllm]', Linux + CUDA)") from None
    from selfdistill.models import resolve_model

    llm = vllm.LLM(model=resolve_model(teacher), dtype=dtype, enforce_eager=False)
    tok = llm.get_tokenizer()

    def run(prompts: Iterable[tuple[int, list[int]]], params: GenParams, keys: dict[int, int] | None = None,
            counters: dict[str, int] | None = None) -> Iterator[Result]:
        stops = params.stop_ids or stop_token_ids(tok)

        def sampling(index: int) -> Any:  # a per-request seed keeps each attempt reproducible
            seed = keys[index] % (1 << 31) if keys is not None else params.seed
            return vllm.SamplingParams(temperature=params.temperature, top_p=params.top_p, seed=seed,
                                       max_tokens=params.max_new_tokens, stop_token_ids=list(stops))
        for chunk in _chunks(prompts, max(1, 8 * params.batch_size)):
            outputs = llm.generate([{"prompt_token_ids": ids} for _, ids in chunk], [sampling(i) for i, _ in chunk],
                                   use_tqdm=False)
            for (index, _), out in zip(chunk, outputs):
                done = out.outputs[0]
                tokens = [t for t in done.token_ids if t not in stops]
                yield Result(index, tokens, "length" if done.finish_reason == "length" else "stop")

    return tok, run


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


BACKENDS: dict[str, Callable[[str, str, str], tuple[Any, GenerateFn]]] = {"hf": open_hf, "vllm": open_vllm}
