"""Cheaper recovery tokens on a tiny random Llama: partial fine-tuning and the cached parent logits for KD."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfdistill.errors import UserError
from selfdistill.finetune import finetune
from selfdistill.finetune.run import prepare

sys.path.insert(0, str(Path(__file__).parent))
from finetune_data import cfg, distill_rows, write_jsonl  # noqa: E402


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


@pytest.fixture(scope="module")
def other_parent(tmp_path_factory) -> Path:
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("parent") / "llama6b", seed=7)


def _kd_loss(prepared, n: int = 4) -> float:
    trainer = prepared.trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    trainer._metrics["train"]["kd_loss"].clear()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    return trainer._metrics["train"]["kd_loss"][-1]


@pytest.mark.parametrize("padding_free", [True, False])
def test_kd_from_the_full_cache_equals_kd_from_the_live_parent(tiny_model_dir, other_parent, distilled, tmp_path,
                                                               padding_free):
    common = dict(kd_weight=0.5, teacher=str(other_parent), kd_temperature=2.0, padding_free=padding_free,
                  kd_loss="kl")
    live = _kd_loss(prepare(cfg(tiny_model_dir, distilled, tmp_path / "live", **common)))
    cached = prepare(cfg(tiny_model_dir, distilled, tmp_path / "c", kd_cache=True, kd_top_k=262, **common))
    folder = distilled.with_name("distilled.kd-distilled-k262-t2")
    assert (folder / "meta.json").is_file() and list(folder.glob("shard-*.safetensors"))
    assert cached.trainer.teacher is None  # no parent in memory while training
    assert live > 0.01 and abs(_kd_loss(cached) - live) < 1e-4 * live
    top8 = prepare(cfg(tiny_model_dir, distilled, tmp_path / "c8", kd_cache=True, kd_top_k=8, **common))
    assert 0 < _kd_loss(top8) <= live * 1.01  # 9 buckets: a coarser distribution, never a larger KL


def test_kd_cache_is_reused_and_rejects_other_data_or_parent(tiny_model_dir, other_parent, distilled, tmp_path,
                                                             monkeypatch):
    from selfdistill.finetune import kdcache

    common = dict(kd_weight=0.5, teacher=str(other_parent), kd_cache=True, kd_top_k=4)
    finetune(cfg(tiny_model_dir, distilled, tmp_path / "a", max_steps=2, **common))
    monkeypatch.setattr(kdcache, "build", lambda *a, **k: pytest.fail("the cache was rebuilt"))
    result = finetune(cfg(tiny_model_dir, distilled, tmp_path / "b", max_steps=2, epochs=2.0, **common))
    assert result["steps"] == 2
    changed = write_jsonl(tmp_path / "other.jsonl", distill_rows(6))
    folder = distilled.with_name("distilled.kd-distilled-k4-t1")
    for data, teacher, message in [(changed, other_parent, "made from other data"),
                                   (distilled, tiny_model_dir, "made with another parent")]:
        with pytest.raises(UserError, match=message):
            finetune(cfg(tiny_model_dir, data, tmp_path / "bad", **{**common, "teacher": str(teacher),
                                                                     "kd_cache_dir": str(folder)}))
        assert not (tmp_path / "bad").exists()
