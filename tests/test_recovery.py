"""Cheaper recovery tokens on a tiny random Llama: partial fine-tuning and the cached parent logits for KD."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfdistill.errors import UserError
from selfdistill.finetune import FinetuneConfig, finetune
from selfdistill.finetune.run import prepare

sys.path.insert(0, str(Path(__file__).parent))
from test_finetune import distill_rows, write_jsonl  # noqa: E402


@pytest.fixture()
def distilled(tmp_path) -> Path:
    return write_jsonl(tmp_path / "distilled.jsonl", distill_rows())


def cfg(model: Path, data: Path, out: Path, **kw) -> FinetuneConfig:
    base = dict(model=str(model), data=str(data), out=str(out), dtype="float32", batch_size=4, grad_accum=1,
                max_steps=2, learning_rate=1e-2, save_steps=50, seed=0)
    return FinetuneConfig(**{**base, **kw})


def test_partial_trains_only_the_chosen_layers(tiny_model_dir, distilled, tmp_path):
    p = prepare(cfg(tiny_model_dir, distilled, tmp_path / "p", method="partial", train_layers="last:2",
                    train_lm_head=False, train_norm=True))
    model = p.trainer.model
    trained = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trained and all(n.startswith(("model.layers.4.", "model.layers.5.", "model.norm.")) for n in trained)
    assert any(n.startswith("model.layers.4.") for n in trained) and "model.norm.weight" in trained
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    # One backward: frozen parameters get no gradient at all (autograd stops at layer 4)
    batch = p.trainer.data_collator([p.trainer.train_dataset[i] for i in range(2)])
    loss = p.trainer.compute_loss(model, {k: v for k, v in batch.items()})
    loss.backward()
    for n, q in model.named_parameters():
        assert (q.grad is not None) == (n in trained), n
    model.zero_grad()
    p.trainer.train()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed == trained


def test_partial_with_lm_head_unties_it_and_saves_the_rest_exactly(tiny_model_dir, distilled, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "p"
    finetune(cfg(tiny_model_dir, distilled, out, method="partial", train_layers="3:6", train_lm_head=True,
                 train_norm=False, max_steps=2))
    base, tuned = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert torch.equal(base["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"])  # untied, frozen
    assert not torch.equal(tuned["lm_head.weight"], tuned["model.embed_tokens.weight"])
    for k in base:
        same = torch.equal(base[k], tuned[k])
        assert same == (not k.startswith(("model.layers.3.", "model.layers.4.", "model.layers.5."))), k
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(reloaded.lm_head.weight, tuned["lm_head.weight"])


def test_partial_layer_selection_errors(tiny_model_dir, distilled, tmp_path):
    for spec, message in [("last:7", "outside the child's 6 layers"), ("4:9", "outside"), ("two", "use last:N"),
                          ("after_cut", "pruning.json")]:
        with pytest.raises(UserError, match=message):
            finetune(cfg(tiny_model_dir, distilled, tmp_path / "bad", method="partial", train_layers=spec))
        assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.checkpoints").exists()


def test_after_cut_reads_the_pruned_block(tiny_model_dir, tmp_path):
    from selfdistill.finetune.partial import select_layers

    (tmp_path / "pruning.json").write_text(json.dumps({"removed_layers": [2, 3]}))
    assert select_layers("after_cut", 4, str(tmp_path)) == [2, 3]
    assert select_layers("last:1", 4, str(tmp_path)) == [3] and select_layers("0:2", 4, "") == [0, 1]
