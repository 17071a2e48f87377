"""Shared fixtures: tiny models on disk, and paths to the real data in ../shared/data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from finetune_data import distill_rows, write_jsonl  # noqa: E402
from tiny import save_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SELFDISTILL_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 6-layer random Llama with a byte-level tokenizer, saved once per test session."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama6")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (SHARED_DATA / "gsm8k" / "train.jsonl").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gsm8k_train(data_dir) -> Path:
    return data_dir / "gsm8k" / "train.jsonl"


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The built-in SmolLM2-135M-Instruct as a cached safetensors folder (converted once)."""
    from selfdistill.models import DEFAULT_MODEL, resolve_model

    return Path(resolve_model(DEFAULT_MODEL))


@pytest.fixture()
def distilled(tmp_path) -> Path:
    """Eight distilled rows (rewrites used) in a JSONL file, as the distill stage writes them."""
    return write_jsonl(tmp_path / "distilled.jsonl", distill_rows())


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core box threads make them 10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Any model load fails the test: the error under test must come before the first one."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
