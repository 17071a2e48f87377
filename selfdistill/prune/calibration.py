"""Calibration text for the layer scorers: tokenized batches, and where each sample's content ends.

Gromov et al. read the residual stream at the last token of the text. With a chat template applied, the
last token of the *sequence* is the template's end-of-turn marker and trailing newline: formatting tokens
whose residual stream barely moves through the early layers, so the angular scorer then prefers an early
block (on SmolLM2-135M it picks layers 3..8 and leaves the child at chance). Every sample therefore carries
the position of the last token of its content (the answer's last token, before any closing template tokens).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from selfdistill.data import Example, render_text
from selfdistill.errors import UserError

Batch = dict[str, torch.Tensor]
POSITION_NOTE = "last token of the sample's content (before the chat template's end-of-turn and trailing tokens)"


@dataclass
class Calibration:
    batches: list[Batch]  # input_ids, attention_mask, and `positions`: the content's last token per row
    heldout: list[Batch]  # rows outside the calibration sample, for checking candidate blocks by their loss
    samples: int
    tokens: int
    trailing_tokens: float  # mean count of template tokens after the content's last token


def content_end(example: Example, tokenizer: Any, chat_template: bool) -> tuple[str, int]:
    """The rendered text and the character offset where its content (the reference answer) ends."""
    text = render_text(example, tokenizer, chat_template)
    answer = example.reference.strip()
    at = text.rfind(answer) if answer else -1
    return text, (at + len(answer)) if at >= 0 else len(text.rstrip())


def _encode(text: str, end: int, tokenizer: Any, max_length: int) -> tuple[list[int], int]:
    """Token ids (truncated to max_length) and the index of the last token that starts before `end`."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=False,
                        return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        last = max((i for i, (start, _) in enumerate(offsets) if start < end), default=len(ids) - 1)
    else:  # slow tokenizers have no offsets: the prefix's token count locates the same token
        ids = tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=False)["input_ids"]
        last = len(tokenizer(text[:end], add_special_tokens=False)["input_ids"]) - 1
    return ids, max(0, min(last, len(ids) - 1))


def _batches(encoded: list[tuple[list[int], int]], batch_size: int, pad: int, device: str) -> list[Batch]:
    """Sorted by length (less padding) and right-padded."""
    encoded = sorted(encoded, key=lambda e: len(e[0]))
    batches = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (seq, _) in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        positions = torch.tensor([last for _, last in chunk], dtype=torch.long)
        batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device),
                        "positions": positions.to(device)})
    return batches


def split_rows(examples: list[Example], samples: int, heldout: int, shuffle: bool,
               seed: int) -> tuple[list[Example], list[Example]]:
    """The calibration sample and the held-out rows (disjoint): the first rows in order, or a seeded draw."""
    if shuffle:
        examples = random.Random(seed).sample(examples, min(len(examples), samples + heldout))
    return examples[:samples], examples[samples:samples + heldout]


def build(examples: list[Example], heldout_examples: list[Example], tokenizer: Any, *, chat_template: bool,
          max_length: int, batch_size: int, device: str, source: str) -> Calibration:
    """Tokenize both row sets into batches with content positions."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(rows: list[Example]) -> list[tuple[list[int], int]]:
        encoded = [_encode(*content_end(e, tokenizer, chat_template), tokenizer, max_length) for e in rows]
        return [e for e in encoded if len(e[0]) > 1]

    main, held = encode(examples), encode(heldout_examples)
    if not main:
        raise UserError(f"{source}: no calibration sample has at least 2 tokens")
    trailing = sum(len(ids) - 1 - last for ids, last in main) / len(main)
    return Calibration(_batches(main, batch_size, pad, device), _batches(held, batch_size, pad, device),
                       samples=len(main), tokens=sum(len(ids) for ids, _ in main), trailing_tokens=trailing)
