"""Generation backends (`BACKENDS`): `hf`, our refilling engine on transformers, and `vllm`.

Each opener loads the teacher once and returns (tokenizer, generate) where `generate(prompts,
params)` yields `Result`s as rows finish; vLLM is an optional extra and its absence is a clear error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from selfdistill.distill.generate import GenParams, Result, generate_hf, length_sorted, stop_token_ids
from selfdistill.errors import UserError

GenerateFn = Callable[[Iterable[tuple[int, list[int]]], GenParams], Iterator[Result]]


def open_hf(teacher: str, dtype: str, device: str) -> tuple[Any, GenerateFn]:
    from selfdistill.models import load_model

    model, tok = load_model(teacher, dtype=dtype, device=device)
    params_stop = stop_token_ids(tok, model)

    def run(prompts: Iterable[tuple[int, list[int]]], params: GenParams) -> Iterator[Result]:
        window = max(1, 8 * params.batch_size)
        params = GenParams(**{**params.__dict__, "stop_ids": params.stop_ids or params_stop})
        return generate_hf(model, tok, length_sorted(prompts, window), params)

    return tok, run


def open_vllm(teacher: str, dtype: str, device: str) -> tuple[Any, GenerateFn]:
    """vLLM does its own continuous batching; we hand it a window of prompts at a time so rows stream out."""
    from selfdistill.models import check_safe_weights, resolve_model

    source = resolve_model(teacher)
    check_safe_weights(source)  # vLLM loads the folder itself: refuse pickle-only weights as load_model does
    try:
        import vllm
    except ImportError:
        raise UserError("backend 'vllm' needs vLLM, which is not installed "
                        "(pip install 'selfdistill[vllm]', Linux + CUDA)") from None
    llm = vllm.LLM(model=source, dtype=dtype, enforce_eager=False)
    tok = llm.get_tokenizer()

    def run(prompts: Iterable[tuple[int, list[int]]], params: GenParams) -> Iterator[Result]:
        stops = params.stop_ids or stop_token_ids(tok)
        sampling = vllm.SamplingParams(temperature=params.temperature, top_p=params.top_p, seed=params.seed,
                                       max_tokens=params.max_new_tokens, stop_token_ids=list(stops))
        for chunk in _chunks(prompts, max(1, 8 * params.batch_size)):
            outputs = llm.generate([{"prompt_token_ids": ids} for _, ids in chunk], sampling, use_tqdm=False)
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
