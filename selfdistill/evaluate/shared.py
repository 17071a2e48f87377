"""`backend: shared`: an lm-eval model that runs each distinct context once for all its continuations.

lm-eval's HFLM scores every (context, continuation) request as its own sequence, so a multiple-choice
item's context is run once per choice. `SharedContextLM` (registered as `selfdistill-shared`) is HFLM
with one method replaced: `_loglikelihood_tokens` groups the requests by their context tokens (after
HFLM's own tokenization and left truncation) and packs each context with all of its continuations into
one row. A custom 4D attention mask lets every continuation see the context and itself only, and its
position ids restart where the context ends, so each continuation is scored exactly as HFLM scores it
alone. Only the positions that predict continuation tokens go through the LM head. Rolling
log-likelihoods (perplexity windows) and generation are HFLM's unchanged. docs/evaluate.md has the
benchmark.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from selfdistill.console import library_bars_hidden, progress
from selfdistill.engine.compat import attention_implementation
from selfdistill.errors import UserError

# Architectures whose logits are exactly lm_head(decoder(x)) and whose attention takes a 4D mask as given.
# Left out on purpose: gemma2/gemma3 (logit soft-capping, sliding windows), cohere (logit_scale),
# granite (logits_scaling); they run with `--backend hf`.
# A packed row's attention costs row length squared; past ~2k tokens it outweighs the linear layers of a
# small model, so a context with very many continuations is split over rows (each still run once per row)
# unless the context itself is that long (`pack_rows`).
ROW_TOKENS = 2048
FILL = 0.75  # a batch's least share of real (not padding) tokens
SERVABLE = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "phi3", "olmo", "olmo2",
            "smollm3")


def unservable_reason(config: Any) -> str | None:
    """Why `backend: shared` cannot score this model exactly (None: it can), from the config alone."""
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        return f"'{model_type}' is an encoder-decoder model"
    if model_type not in SERVABLE:
        return f"architecture '{model_type}' is not one it serves ({', '.join(SERVABLE)})"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        # The packed mask is a full causal one; a sliding window would need the window in it too.
        return f"'{model_type}' uses sliding-window attention ({window} tokens)"
    return None


@dataclasses.dataclass
class Row:
    """One packed sequence: a context, then some of its continuations (all but each one's last token)."""
    context: tuple[int, ...]
    continuations: list[tuple[int, ...]]

    def __len__(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


def context_groups(requests: list[tuple[Any, list[int], list[int]]],
                   max_length: int) -> dict[tuple[int, ...], dict[tuple[int, ...], list[int]]]:
    """{context tokens: {continuation tokens: request indices}}, with HFLM's left truncation.

    HFLM feeds `(context + continuation)[-(max_length + 1):][:-1]`, so a long context keeps only its
    last `max_length + 1 - len(continuation)` tokens; grouping by that kept part makes equal inputs share."""
    groups: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for i, (_, context, continuation) in enumerate(requests):
        assert context and continuation and len(continuation) <= max_length  # as HFLM asserts
        kept = (context + continuation)[-(max_length + 1):][:-1]
        kept_context = tuple(kept[:len(kept) - len(continuation) + 1])
        groups.setdefault(kept_context, {}).setdefault(tuple(continuation), []).append(i)
    return groups


def pack_rows(groups: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]], max_tokens: int) -> list[Row]:
    """Rows of at most `max_tokens` tokens or twice their context, longest first (a context and one
    continuation always fit).

    Splitting a context's continuations over rows runs the context once more per extra row; that pays only
    when the continuations outweigh it. A long context (few-shot MMLU: ~2k tokens, one-token answers)
    therefore keeps all its continuations in one row however long the row is."""
    rows = []
    for context, continuations in groups.items():
        row, budget = Row(context, []), max(max_tokens, 2 * len(context))
        for cont in sorted(continuations, key=len, reverse=True):
            if row.continuations and len(row) + len(cont) - 1 > budget:
                rows.append(row)
                row = Row(context, [])
            row.continuations.append(cont)
        rows.append(row)
    # Longest first, as HFLM orders its requests: similar lengths share a batch (little padding), and a
    # batch too large for memory fails at once, not at the end.
    return sorted(rows, key=lambda r: (-len(r), r.context))


def batches(rows: list[Row], batch_size: int) -> list[list[Row]]:
    """Consecutive rows padded to at most the tokens of HFLM's batch of `batch_size` requests as long, and
    at least `FILL` of each batch real tokens.

    HFLM pads `batch_size` requests to its longest; a row's longest request is its context plus its longest
    continuation, so the same budget holds every context once and covers about twice the requests. Fewer,
    fuller forwards matter on a busy CPU, where each of a forward's ~1,000 small ops costs a scheduling
    slice whatever its size; the memory stays below HFLM's (no full-vocabulary logits over every position).
    Where row lengths spread widely (few-shot MMLU's contexts run from 300 to 2,300 tokens) the fill floor
    keeps short rows out of a long row's batch, where they would be padded to its width.
    """
    out: list[list[Row]] = []
    for row in rows:  # longest first: a batch's first row sets its padded width
        if out:
            last = out[-1]
            padded = (len(last) + 1) * len(last[0])
            real = sum(map(len, last)) + len(row)
            if padded <= batch_size * _longest_request(last[0]) and real >= FILL * padded:
                last.append(row)
                continue
        out.append([row])
    return out


def _longest_request(row: Row) -> int:
    return len(row.context) + max(len(c) for c in row.continuations) - 1


def packed_inputs(rows: list[Row], pad_id: int, device: Any) -> dict[str, torch.Tensor]:
    """input_ids, position_ids and segment ids (0: context, k: k-th continuation, -1: padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row.context)
        ids[b, :n], positions[b, :n], segments[b, :n] = torch.tensor(row.context), torch.arange(n), 0
        start = n
        for k, cont in enumerate(row.continuations, start=1):
            fed = cont[:-1]  # the last token is only ever a target
            end = start + len(fed)
            ids[b, start:end] = torch.tensor(fed, dtype=torch.long)
            positions[b, start:end] = torch.arange(n, n + len(fed))  # as if it followed the context alone
            segments[b, start:end] = k
            start = end
    return {"input_ids": ids.to(device), "position_ids": positions.to(device), "segments": segments.to(device)}


def attention_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [batch, 1, query, key] mask: causal, and a continuation sees the context and itself only.

    Additive (0 / dtype min) rather than boolean because eager attention adds the mask to the scores
    and SDPA accepts either; padding queries see the context, so no softmax row is empty."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = causal & ((key == 0) | (key == query))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def scored_positions(rows: list[Row]) -> tuple[list[int], list[int], list[tuple[int, ...]]]:
    """(batch index, position) of every hidden state that predicts a continuation token, and the targets."""
    batch_idx, pos_idx, targets = [], [], []
    for b, row in enumerate(rows):
        start = len(row.context)
        for cont in row.continuations:
            # The context's last token predicts the first continuation token; each fed token the next.
            positions = [len(row.context) - 1, *range(start, start + len(cont) - 1)]
            batch_idx += [b] * len(positions)
            pos_idx += positions
            targets.append(cont)
            start += len(cont) - 1
    return batch_idx, pos_idx, targets


def _crosses(rows: list[Row]) -> bool:
    """Whether some row feeds tokens of more than one continuation (which must not see each other)."""
    return any(sum(len(c) > 1 for c in row.continuations) > 1 for row in rows)


@register_model("selfdistill-shared")
class SharedContextLM(HFLM):
    """HFLM that runs each distinct context once per batch of its continuations (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        reason = unservable_reason(self.model.config)
        attn = attention_implementation(self.model.config, "sdpa")
        if reason is None and attn not in ("sdpa", "eager"):
            reason = f"attention '{attn}' ignores custom 4D masks"
        if reason is not None or self.backend != "causal":
            raise UserError(f"--backend shared cannot serve this model: {reason or 'not a causal LM'}")

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # lm-eval's "Tokenizing inputs" bar passes disable= itself, so the quiet terminal hides it here; the
        # requests bar below is our own and stays unless the caller asked for none.
        self._bar_off = disable_tqdm
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or library_bars_hidden())
        finally:
            del self._bar_off

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        if override_bs is not None:  # loglikelihood_rolling's disjoint windows: HFLM's exact path
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        size = self.batch_size if isinstance(self.batch_size, int) else 16  # "auto" probes HFLM's shapes, not ours
        groups = context_groups(requests, self.max_length)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = progress(total=len(requests), disable=getattr(self, "_bar_off", disable_tqdm) or self.rank != 0,
                        desc="loglikelihood requests (shared contexts)")
        for batch in batches(pack_rows(groups, ROW_TOKENS), size):
            for row, answers in zip(batch, self._score_rows(batch), strict=True):
                for cont, answer in zip(row.continuations, answers, strict=True):
                    for i in groups[row.context][cont]:
                        results[i] = answer
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                        pbar.update(1)
        pbar.close()
        return results  # type: ignore[return-value]

    def _score_rows(self, rows: list[Row]) -> list[list[tuple[float, bool]]]:
        """(log-likelihood, is greedy) of every continuation of every row, from one forward pass."""
        model = self.model
        inputs = packed_inputs(rows, self.tokenizer.pad_token_id or 0, self.device)
        segments = inputs.pop("segments")
        # Plain causal attention is exact while no row feeds tokens of two continuations (e.g. MMLU's one-token
        # answers feed none), and the padding lies after every real token. The model then attends without a
        # mask, so the attention kernel skips the future instead of reading a dense mask: on rows of ~1-2k
        # tokens (few-shot MMLU) that is most of a forward's attention (docs/evaluate.md).
        mask = attention_mask(segments, self.mixed_precision_dtype or model.dtype) if _crosses(rows) else None
        batch_idx, pos_idx, targets = scored_positions(rows)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            hidden = model.get_decoder()(**inputs, attention_mask=mask, use_cache=False).last_hidden_state
            logits = model.get_output_embeddings()(hidden[batch_idx, pos_idx])
        # Same softmax dtype as HFLM (the model's unless softmax_dtype is set), so bf16 figures match too.
        logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        flat = torch.tensor([t for cont in targets for t in cont], device=logprobs.device)
        picked = logprobs.gather(1, flat[:, None])[:, 0]
        greedy = logprobs.argmax(dim=-1) == flat
        out: list[list[tuple[float, bool]]] = []
        start = 0
        for row in rows:
            answers = []
            for cont in row.continuations:
                end = start + len(cont)
                answers.append((float(picked[start:end].sum()), bool(greedy[start:end].all())))
                start = end
            out.append(answers)
        return out
