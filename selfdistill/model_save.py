"""Write model folders: safetensors, config, tokenizer, generation config and a model card.

Apart from `models.py` (loading) so that `gguf.py`, which saves the dequantized built-in model, and
`models.py`, which resolves a GGUF name through it, import in one direction only: models -> gguf -> here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selfdistill.rundir import atomic_dir, atomic_write_text


def drop_quantization(model: Any) -> None:
    """A GGUF-loaded model is dequantized but still flagged quantized, which blocks save and PEFT."""
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None
    model.is_quantized = False


def save_model(model: Any, tokenizer: Any, out: str | Path, card: dict[str, Any] | None = None) -> Path:
    """Write a standard HF folder (safetensors, config, tokenizer, generation config, model card)."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        write_model(model, tokenizer, tmp, card)
    return out


def write_model(model: Any, tokenizer: Any, folder: str | Path, card: dict[str, Any] | None = None) -> None:
    """Write the model files into an existing folder (callers that add files use `atomic_dir` around it)."""
    folder = Path(folder)
    drop_quantization(model)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    atomic_write_text(folder / "README.md", model_card(model, card or {}))


def model_card(model: Any, card: dict[str, Any]) -> str:
    lines = ["---", "library_name: transformers", "tags: [selfdistill]", "---", "",
             f"# {card.get('title', 'selfdistill model')}", "",
             f"Architecture: `{type(model).__name__}`, {model.config.num_hidden_layers} decoder layers.", ""]
    for key, value in card.items():
        if key == "title":
            continue
        shown = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
        lines.append(f"- **{key}**: {shown}")
    lines += ["", "Made with [selfdistill](https://github.com/selfdistill/selfdistill); loads with "
              "`AutoModelForCausalLM.from_pretrained`.", ""]
    return "\n".join(lines)
