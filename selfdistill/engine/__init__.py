"""The generation engine: continuous batching with refill on a transformers model (the `hf` backend).

`generate_hf(model, tokenizer, prompts, GenParams(...))` yields a `Result` per prompt as rows finish; prompts
are `(index, token ids)`, best ordered by `length_sorted`. One module per idea:

- params.py: `GenParams`, `Result`;
- generate.py: `generate_hf`, `length_sorted`;
- batching.py: `RefillEngine`, the slots kept busy by refilling them (continuous batching);
- prefill.py: prompts prefilled left-padded in chunks of about `prefill_tokens`;
- kv.py: the sliding KV window, one preallocated buffer per layer, as a transformers cache;
- attention.py: ragged grouped decode attention, each group of slots reading only its own columns;
- packed.py: the packed decode step, every live row's tokens as one sequence, drafts verified;
- drafts.py: prompt-lookup (n-gram) drafts;
- next_token.py: the greedy argmax on 16-bit bits, top-p sampling;
- packed_linears.py: 16-bit CPU linears on weights packed once for oneDNN;
- compat.py: every private or version-fragile transformers/torch API, checked once, with fallbacks.

Greedy decoding drafts tokens by prompt lookup and keeps the longest prefix the model's own argmax agrees
with, so its output is the greedy output (up to floating-point rounding between batch shapes) in fewer
steps (docs/distill.md).
"""

from selfdistill.engine.batching import RefillEngine
from selfdistill.engine.drafts import NgramDrafter
from selfdistill.engine.generate import generate_hf, length_sorted
from selfdistill.engine.next_token import greedy_ids
from selfdistill.engine.packed_linears import can_pack, packed_linears
from selfdistill.engine.params import GenParams, Result

__all__ = ["GenParams", "NgramDrafter", "RefillEngine", "Result", "can_pack", "generate_hf", "greedy_ids",
           "length_sorted", "packed_linears"]
