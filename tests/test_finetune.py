"""Recovery fine-tuning on a tiny random Llama: masking, packing, LoRA-only updates, merge, KD, resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfdistill.errors import UserError
from selfdistill.finetune import FinetuneConfig, checkpoint_dir, finetune
from selfdistill.finetune.kd import forward_kl, jsd
from selfdistill.finetune.run import prepare
from selfdistill.rundir import read_manifest

sys.path.insert(0, str(Path(__file__).parent))
from finetune_data import cfg, distill_rows, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_answer_only_masking(tiny_model_dir, distilled, tmp_path):
    """Labels are -100 on every token of the chat-templated prompt and equal the ids on the answer."""
    p = prepare(cfg(tiny_model_dir, distilled, tmp_path / "out", padding_free=False))
    tok, row = p.tokenizer, p.data.rows[3]
    batch = p.trainer.data_collator([p.trainer.train_dataset[3]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[n_prompt:]) == "3 plus 3 makes 6.<|im_end|>\n"
    assert p.data.column == "response" and p.data.rewrites_used == 8


def test_original_arm_reads_original_column(tiny_model_dir, distilled, tmp_path):
    p = prepare(cfg(tiny_model_dir, distilled, tmp_path / "out", responses="original"))
    assert p.data.rows[3]["completion"][0]["content"] == "6" and p.data.column == "original"


def test_packed_batch_equals_separate_rows(tiny_model_dir, distilled, tmp_path):
    """Padding-free (one concatenated row, position_ids reset) gives the padded batch's loss: no cross-talk."""
    packed = prepare(cfg(tiny_model_dir, distilled, tmp_path / "a", padding_free=True)).trainer
    padded = prepare(cfg(tiny_model_dir, distilled, tmp_path / "b", padding_free=False)).trainer
    rows = [packed.train_dataset[i] for i in (0, 5, 2, 7)]  # two lengths, so padding is needed
    b1, b2 = packed.data_collator(rows), padded.data_collator(rows)
    assert b1["input_ids"].shape[0] == 1 and "attention_mask" not in b1
    assert b2["input_ids"].shape[0] == 4 and (b2["attention_mask"] == 0).any()
    with torch.no_grad():
        l1 = packed.compute_loss(packed.model, b1)
        l2 = padded.compute_loss(padded.model, b2)
        # and each row alone, averaged over all answer tokens
        singles = [padded.data_collator([r]) for r in rows]
        n = [int((s["labels"][:, 1:] != -100).sum()) for s in singles]
        l3 = sum(padded.compute_loss(padded.model, s, num_items_in_batch=sum(n)) for s in singles)
    assert torch.allclose(l1, l2, atol=1e-5) and torch.allclose(l1, l3, atol=1e-5)


@pytest.fixture(scope="module")
def wide_logits_dir(tmp_path_factory) -> Path:
    """The tiny Llama with 8x larger (tied) embeddings: at init scale its logits stay within about +-0.6, so
    adapters on the decoder layers alone could never reach a low loss; 8x makes overfitting possible."""
    from tiny import make_model, make_tokenizer

    model, path = make_model(), tmp_path_factory.mktemp("wide") / "llama6"
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_lora_overfits_changes_only_adapters_and_merges(wide_logits_dir, distilled, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tiny_model_dir, out = wide_logits_dir, tmp_path / "out"
    result = finetune(cfg(tiny_model_dir, distilled, out, max_steps=20, limit=4, lora_dropout=0.0,
                          target_modules=["all-linear"], lr_scheduler="constant", learning_rate=1e-2))
    losses = [e["loss"] for e in log_lines(out) if "loss" in e]
    assert len(losses) == 20 and losses[-1] < 0.6 * losses[0], losses
    assert result["steps"] == 20 and result["answer_tokens"] > 0
    assert read_manifest(out) is not None and not checkpoint_dir(out).exists()
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    # merged weights differ from the child only in the LoRA-targeted linear layers
    base, merged = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed)
    assert not any("norm" in k or "embed" in k for k in changed)
    # merged model == base + adapter deltas
    ids = torch.tensor([[5, 17, 40, 99, 3, 77]])
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                     out / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, lora(ids).logits, atol=1e-5)
    assert "self-data distillation" in (out / "README.md").read_text()


def test_lora_leaves_base_weights_untouched(tiny_model_dir, distilled, tmp_path):
    p = prepare(cfg(tiny_model_dir, distilled, tmp_path / "out", max_steps=2))
    before = {k: v.clone() for k, v in p.trainer.model.named_parameters()}
    p.trainer.train()
    after = dict(p.trainer.model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert {k for k, v in after.items() if v.requires_grad} == {k for k in before if "lora_" in k}


def test_kd_zero_when_child_is_parent(tiny_model_dir, distilled, tmp_path):
    out = tmp_path / "out"
    finetune(cfg(tiny_model_dir, distilled, out, max_steps=1, kd_weight=1.0, teacher=str(tiny_model_dir)))
    first = log_lines(out)[0]
    assert abs(first["kd_loss"]) < 1e-6 and abs(first["loss"]) < 1e-6 and first["ce_loss"] > 1.0


def test_divergences():
    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    for fn in (forward_kl, jsd):
        assert fn(s, s).abs().max() < 1e-6 and (fn(s, t) > 0).all()
    ref = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(forward_kl(s, t), ref, atol=1e-6)
    assert torch.allclose(jsd(s, t), jsd(t, s), atol=1e-6)  # beta=0.5 is symmetric


def test_full_finetune_changes_all_weights(tiny_model_dir, distilled, tmp_path):
    out = tmp_path / "full"
    finetune(cfg(tiny_model_dir, distilled, out, method="full", max_steps=1))
    assert not (out / "adapter").exists()
    base, tuned = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert not torch.equal(base["model.layers.0.mlp.down_proj.weight"], tuned["model.layers.0.mlp.down_proj.weight"])


def test_plain_dataset_and_bad_inputs(tiny_model_dir, distilled, tmp_path):
    plain = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "1+1?", "answer": "2\n#### 2"}] * 3)
    p = prepare(cfg(tiny_model_dir, plain, tmp_path / "p", responses="original"))
    assert p.data.rows[0]["completion"][0]["content"] == "2\n#### 2"
    out = tmp_path / "bad"
    cases = {
        "--responses original": cfg(tiny_model_dir, plain, out),  # plain data has no rewrites
        "no 'response' field": cfg(tiny_model_dir, write_jsonl(
            tmp_path / "x.jsonl", [{k: v for k, v in r.items() if k != "response"} for r in distill_rows(2)]), out),
        "empty": cfg(tiny_model_dir, write_jsonl(tmp_path / "e.jsonl", []), out),
        "not a model folder": cfg(tmp_path, distilled, out),
        "matches no module": cfg(tiny_model_dir, distilled, out, target_modules=["qq_proj"]),
    }
    for message, bad in cases.items():
        with pytest.raises(UserError, match=message):
            finetune(bad)
    assert not out.exists() and not checkpoint_dir(out).exists()


def test_kd_tokenizer_mismatch(tiny_model_dir, distilled, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    tok_file = other / "tokenizer.json"
    data = json.loads(tok_file.read_text())
    vocab = data["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, different ids
    tok_file.write_text(json.dumps(data))
    with pytest.raises(UserError, match="different tokenizers"):
        finetune(cfg(tiny_model_dir, distilled, tmp_path / "out", kd_weight=0.5, teacher=str(other)))
    assert not (tmp_path / "out").exists()


def test_cli_error_is_one_line(tiny_model_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}], "original": "x"}])
    proc = subprocess.run([sys.executable, "-m", "selfdistill", "finetune", "--model", str(tiny_model_dir),
                           "--data", str(bad), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=ENV, timeout=240)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("selfdistill: error: ") and "Traceback" not in proc.stderr
    assert "bad.jsonl:1" in proc.stderr and not (tmp_path / "out").exists()


def _md5s(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_bad_data_is_named_with_file_and_line_on_both_responses_paths(tiny_model_dir, tmp_path, capsys):
    """--responses distilled (the default) names the row as exactly as --responses original: a plain dataset
    with bad JSON on line 4 is refused at its line 1 (the row that is not distill output), a folder as a folder."""
    from selfdistill.cli import main

    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"question": f"{i}+{i}?", "answer": f"#### {2 * i}"}) for i in range(6)]
    lines[3] = '{"question": "3+3?", "answer": '
    plain = data / "plain.jsonl"
    plain.write_text("\n".join(lines) + "\n", encoding="utf-8")
    folder = data / "rows"
    write_jsonl(folder.mkdir() or folder / "distilled.jsonl", distill_rows(3))
    before = _md5s(data)
    expected = {(plain, "original"): f"{plain}:4: invalid JSON", (plain, "distilled"): f"{plain}:1: not distill output",
                (folder, "original"): f"{folder} is a folder", (folder, "distilled"): f"{folder} is a folder"}
    for (source, responses), message in expected.items():
        capsys.readouterr()
        code = main(["finetune", "--model", str(tiny_model_dir), "--data", str(source), "--responses", responses,
                     "--out", str(tmp_path / "out" / "child")])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("selfdistill: error:")]
        assert code == 2 and len(lines) == 1 and message in lines[0], (source, responses, err)
        assert "Traceback" not in err
    assert _md5s(data) == before and not (tmp_path / "out" / "child").exists()


def _answer_tokens(model_dir, rows) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return sum(len(tok(r["response"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]) for r in rows)


def test_resume_after_kill(tiny_model_dir, distilled, tmp_path):
    """SIGKILL a run after its first checkpoint; --resume continues from that step, not from 0, and reports
    the whole run's answer tokens, not only the resumed part's."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "selfdistill", "finetune", "--model", str(tiny_model_dir), "--data",
            str(distilled), "--out", str(out), "--dtype", "float32", "--batch-size", "2", "--grad-accum", "1",
            "--max-steps", "8", "--save-steps", "2", "--learning-rate", "0.01"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = checkpoint_dir(out) / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state.exists() and read_manifest(out) is None  # killed: nothing that looks complete
    ckpts = sorted(int(p.name.split("-")[1]) for p in checkpoint_dir(out).glob("checkpoint-*"))
    # the kill may land mid-save, so the newest folder need not be complete: expect the newest finished one
    complete = max(c for c in ckpts if (checkpoint_dir(out) / f"checkpoint-{c}" / "trainer_state.json").is_file())
    # a kill during a save leaves a half-written newer checkpoint; make sure there is one to skip
    (checkpoint_dir(out) / f"checkpoint-{ckpts[-1] + 2}").mkdir()
    result = finetune(cfg(tiny_model_dir, distilled, out, batch_size=2, max_steps=8, save_steps=2, resume=True))
    steps = [e["step"] for e in log_lines(out) if "loss" in e]
    assert result["steps"] == 8 and steps == list(range(1, 9)), steps  # no step trained twice
    assert ckpts[-1] >= 2 and read_manifest(out) is not None
    assert result["resumed_from_step"] == complete
    # 8 steps x 2 rows = the 8 rows twice, whichever step the kill came after
    assert result["answer_tokens"] == 2 * _answer_tokens(tiny_model_dir, distill_rows())
    assert read_manifest(out)["result"]["answer_tokens"] == result["answer_tokens"]


def test_two_processes_gloo(tiny_model_dir, distilled, tmp_path):
    out = tmp_path / "ddp"
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "selfdistill", "finetune",
           "--model", str(tiny_model_dir), "--data", str(distilled), "--out", str(out), "--dtype", "float32",
           "--batch-size", "2", "--grad-accum", "1", "--max-steps", "2"]
    exe = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run([str(exe), *cmd[1:]], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_manifest(out) is not None and len(log_lines(out)) >= 2
    summary, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index('{\n  "out"'):])  # per rank
    # 2 ranks x batch 2 x 2 steps = all 8 rows once: the token count is gathered from both processes
    assert summary["steps"] == 2 and summary["answer_tokens"] == _answer_tokens(tiny_model_dir, distill_rows())


@pytest.mark.slow
def test_real_model_pruned_lora_8_steps(real_model_dir, gsm8k_train, tmp_path):
    from transformers import AutoModelForCausalLM

    from selfdistill.models import decoder_layers, load_model, save_model

    model, tok = load_model(real_model_dir, dtype="float32")
    layers = decoder_layers(model)
    model.model.layers = torch.nn.ModuleList([layer for i, layer in enumerate(layers) if not 18 <= i < 24])
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = len(model.model.layers)
    child = save_model(model, tok, tmp_path / "child")
    out = tmp_path / "out"
    result = finetune(FinetuneConfig(model=str(child), data=str(gsm8k_train), responses="original", limit=8,
                                     out=str(out), max_steps=8, batch_size=1, grad_accum=1, max_length=128))
    assert result["steps"] == 8 and read_manifest(out) is not None
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 24
    enc = tok("Hello", return_tensors="pt")
    assert torch.isfinite(reloaded(**enc).logits).all()


def test_sharded_weights_are_gathered_by_the_trainer_on_every_process(tmp_path):
    """FSDP / ZeRO-3 shard the weights: every process calls the Trainer's save_model (which gathers them), and an
    FSDP run with a sharded state-dict type is switched to a full one, for which save_model writes weights."""
    from types import SimpleNamespace

    from selfdistill.finetune.run import gather_weights

    class Plugin:
        state_dict_type = "StateDictType.SHARDED_STATE_DICT"

        def set_state_dict_type(self, kind):
            self.state_dict_type = f"StateDictType.{kind}"

    saved = []
    plugin = Plugin()
    trainer = SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)),
                              is_fsdp_enabled=True, model=SimpleNamespace(config=SimpleNamespace(use_cache=False)),
                              save_model=lambda out: saved.append((out, plugin.state_dict_type)))
    gather_weights(FinetuneConfig(model="m", data="d", out=str(tmp_path / "o")), trainer, tmp_path / "staged")
    assert saved == [(str(tmp_path / "staged"), "StateDictType.FULL_STATE_DICT")] and trainer.model.config.use_cache
