"""Tiny random models and a byte-level tokenizer built in-process: seconds on CPU, nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer():
    """A byte-level BPE with no merges: every byte is a token, so any text encodes; ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  bos_token="<|endoftext|>", additional_special_tokens=specials[1:2])
    tok.chat_template = CHATML
    return tok


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3")


def make_config(arch: str = "llama", layers: int = 6, hidden: int = 32, vocab: int = 262):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    extra = {"gemma2": dict(head_dim=8, sliding_window=16,
                            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]),
             "qwen3": dict(head_dim=8)}.get(arch, {})
    return AutoConfig.for_model(arch, **common, **extra)


def make_model(arch: str = "llama", layers: int = 6, seed: int = 0, hidden: int = 32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, layers, hidden), dtype=torch.float32)
    return model.eval()


def save_tiny(path: Path, arch: str = "llama", layers: int = 6, seed: int = 0) -> Path:
    model, tok = make_model(arch, layers, seed), make_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def lively(model, seed: int = 0):
    """Re-draw the matrices at unit scale: at HF's 0.02 init a tiny model just repeats one token, which any
    engine or draft would reproduce; a lively one's greedy continuation depends on every position it attends to."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model
