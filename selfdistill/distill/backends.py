"""Generation backends (`BACKENDS`): `hf`, our refilling engine on transformers, and `vllm`.

Each opener loads the teacher once and returns (tokenizer, generate) where `generate(prompts,
params, keys=None, counters=None)` yields `Result`s as rows finish; vLLM is an optional extra and its
absence is a clear error. With `keys` (prompt index -> sampling key) sampling is seeded per prompt, so
an attempt draws the same tokens whatever else is in the batch (best-of-k, distill/attempts.py).

Under a multi-process launch (`accelerate launch`, torchrun) the HF engine runs one copy per GPU on its
shard. vLLM uses its external launcher there (vLLM's torchrun examples): every process holds one worker,
`tensor_parallel_size` consecutive ranks form one engine, and each engine is a data-parallel replica that
decodes its own shard; within a replica all ranks produce the same outputs and its first rank writes them
(`vllm_layout`). The vLLM paths follow vLLM's documented API but are not exercised by this project's
tests or GPU check (docs/distill.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from selfdistill.distill.sampled import generate_seeded
from selfdistill.engine import GenParams, Result, generate_hf, length_sorted
from selfdistill.errors import UserError
from selfdistill.models import stop_token_ids

GenerateFn = Callable[..., Iterator[Result]]


def vllm_layout(rank: int, world: int, tensor_parallel_size: int) -> tuple[int, int, bool]:
    """(replica index, replica count, whether this rank writes its replica's rows) under the external launcher,
    whose ranks [k * tp, (k + 1) * tp) form replica k."""
    if tensor_parallel_size < 1 or world % tensor_parallel_size:
        raise UserError(f"tensor_parallel_size {tensor_parallel_size} must divide the process count {world}")
    return rank // tensor_parallel_size, world // tensor_parallel_size, rank % tensor_parallel_size == 0


def open_hf(teacher: str, dtype: str, device: str, tensor_parallel_size: int = 1,
            seed: int = 0) -> tuple[Any, GenerateFn]:
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


def open_vllm(teacher: str, dtype: str, device: str, tensor_parallel_size: int = 1,
              seed: int = 0) -> tuple[Any, GenerateFn]:
    """vLLM does its own continuous batching; we hand it a window of prompts at a time so rows stream out.

    `device` is not passed: vLLM places its workers itself (one process: GPUs 0..tp-1 of those visible;
    under a launcher: the rank's own GPU, through the external launcher)."""
    import os

    try:
        import vllm
    except ImportError:
        raise UserError("backend 'vllm' needs vLLM, which is not installed "
                        "(pip install 'selfdistill[vllm]', Linux + CUDA)") from None
    from selfdistill.models import check_safe_weights, resolve_model

    source = resolve_model(teacher)
    check_safe_weights(source)  # vLLM loads the folder itself: refuse pickle-only weights as load_model does

    world = int(os.environ.get("WORLD_SIZE", "1"))
    parallel: dict[str, Any] = {"tensor_parallel_size": tensor_parallel_size}
    if world > 1:
        replica, replicas, _ = vllm_layout(int(os.environ.get("RANK", "0")), world, tensor_parallel_size)
        # The same seed on every rank: a replica's ranks must sample the same tokens (vLLM's torchrun example).
        parallel.update(data_parallel_size=replicas, distributed_executor_backend="external_launcher", seed=seed)
    llm = vllm.LLM(model=source, dtype=dtype, enforce_eager=False, **parallel)
    if world > 1:
        config = llm.llm_engine.vllm_config.parallel_config
        if (config.data_parallel_rank, config.data_parallel_size) != (replica, replicas):
            raise UserError(f"vLLM placed this rank in replica {config.data_parallel_rank} of "
                            f"{config.data_parallel_size}, not {replica} of {replicas}: rows would be lost")
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
