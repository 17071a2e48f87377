"""Model loading and saving: local folders, safety defaults, layer access, the built-in GGUF model."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import make_model, make_tokenizer

from selfdistill.errors import UserError
from selfdistill.models import decoder_layers, load_model, resolve_model, save_model


def test_save_and_reload_roundtrip(tmp_path):
    model, tok = make_model(layers=3), make_tokenizer()
    save_model(model, tok, tmp_path / "m", card={"note": "hello"})
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert "hello" in (tmp_path / "m" / "README.md").read_text()
    reloaded, tok2 = load_model(tmp_path / "m")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert tok2.chat_template and tok2.pad_token_id == 2


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path):
    model, tok = make_model(layers=2), make_tokenizer()
    model.save_pretrained(tmp_path / "p")
    tok.save_pretrained(tmp_path / "p")
    # transformers 5 only writes safetensors; make the legacy pickle layout that old checkpoints have
    (tmp_path / "p" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "p" / "pytorch_model.bin")
    with pytest.raises(UserError, match="allow-pickle"):
        load_model(tmp_path / "p")
    loaded, _ = load_model(tmp_path / "p", allow_pickle=True)
    assert loaded.config.num_hidden_layers == 2


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UserError, match="architecture 'gpt2'"):
        decoder_layers(model)


def test_resolution_of_names(tmp_path):
    assert resolve_model("someorg/some-model") == "someorg/some-model"  # hub ids pass through
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(tmp_path / "empty")
    with pytest.raises(UserError, match="model not found"):
        resolve_model("./missing-folder")


@pytest.mark.slow
def test_builtin_model_is_cached_safetensors_with_chat_template():
    path = resolve_model("smollm2-135m-instruct")
    config = json.loads((path_ := __import__("pathlib").Path(path)).joinpath("config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    model, tok = load_model("smollm2-135m-instruct")
    assert resolve_model("smollm2-135m-instruct") == str(path_)  # converted once, then reused
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])
