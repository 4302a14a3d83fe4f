"""Training really learns: loss falls, answers come back, runs resume, files are right."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from loraforge.data.dataset import load_reports, resolve_specs
from loraforge.errors import LoraforgeError
from loraforge.infer.hf import exact_matches, load_model, template_of
from loraforge.train.callbacks import read_log
from loraforge.train.run import train

from conftest import sft_config

pytestmark = pytest.mark.slow


def test_sft_halves_the_loss_and_reproduces_trained_answers(learned_run):
    config, result = learned_run
    losses = [r["loss"] for r in read_log(result.output_dir / "trainer_log.jsonl") if "loss" in r]
    per_epoch = len(losses) // 120  # batches differ in length: compare whole epochs, not single steps
    first, last = sum(losses[:per_epoch]) / per_epoch, sum(losses[-per_epoch:]) / per_epoch
    assert last < first / 2, (first, last)
    model, tokenizer = load_model(result.output_dir)
    records = [r for rep in load_reports(config, resolve_specs(config)) for r in rep.records if len(r.turns) == 2]
    rows = exact_matches(model, tokenizer, template_of(result.output_dir), records[:8], max_new_tokens=96)
    exact = [q for q, want, got in rows if got.strip() == want.strip()]
    assert len(exact) >= 2, rows


def test_run_directory_layout(learned_run):
    config, result = learned_run
    out = result.output_dir
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 32 and adapter["peft_type"] == "LORA"
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert any(k.endswith("lora_A.weight") for k in f.keys())
    saved = (out / "loraforge.yaml").read_text()
    assert "template: chinese-alpaca" in saved
    tokenizer_cfg = json.loads((out / "tokenizer_config.json").read_text())
    chat_template = tokenizer_cfg.get("chat_template") or (out / "chat_template.jinja").read_text()
    assert "### Response: " in chat_template
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "tokenizer.model").read_bytes() == (Path(config.model.path) / "tokenizer.model").read_bytes()


def test_trainer_log_has_progress_fields(learned_run):
    _, result = learned_run
    rows = read_log(result.output_dir / "trainer_log.jsonl")
    losses = [r for r in rows if "loss" in r]
    assert len(losses) == result.steps
    last = losses[-1]
    for key in ("step", "loss", "lr", "epoch", "tokens_per_s", "elapsed_s", "remaining_s", "tokens_seen"):
        assert key in last, key
    assert last["tokens_per_s"] > 0 and last["remaining_s"] == pytest.approx(0, abs=1)


def test_resume_continues_the_same_loss_curve(pretrained_llama, tmp_path):
    common = ("data.max_samples=24", "train.max_steps=8", "train.lr=5e-3", "train.save_steps=4",
              "train.batch_size=4", "train.group_by_length=false")
    full = train(sft_config(pretrained_llama, tmp_path / "full", *common))
    whole = {r["step"]: r["loss"] for r in read_log(full.output_dir / "trainer_log.jsonl") if "loss" in r}

    # a run killed right after its step-4 checkpoint: only that checkpoint survives
    cut = tmp_path / "cut"
    shutil.copytree(full.output_dir / "checkpoint-4", cut / "checkpoint-4")
    resumed = train(sft_config(pretrained_llama, cut, *common, "train.resume_from_checkpoint=last"))
    assert resumed.steps == 8
    tail = {r["step"]: r["loss"] for r in read_log(cut / "trainer_log.jsonl") if "loss" in r}
    assert sorted(tail) == [5, 6, 7, 8]
    for step, loss in tail.items():
        assert loss == pytest.approx(whole[step], rel=1e-4), (step, loss, whole[step])
    assert abs(tail[8] - whole[4]) > 0.05  # it really trained on, not restarted or stood still


def test_same_config_and_seed_give_the_same_adapter(pretrained_llama, tmp_path):
    """The adapter's random init follows train.seed, whatever ran earlier in the process."""
    import torch

    common = ("data.max_samples=8", "train.max_steps=2", "train.batch_size=4", "train.save_steps=100")
    adapters = []
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        torch.rand(7)  # unrelated random draws before training must not matter
        result = train(sft_config(pretrained_llama, tmp_path / name, *common, f"train.seed={seed}"))
        with safe_open(str(result.output_dir / "adapter_model.safetensors"), framework="pt") as f:
            adapters.append({k: f.get_tensor(k) for k in f.keys()})
    same, other = adapters[1], adapters[2]
    assert all(torch.equal(adapters[0][k], same[k]) for k in same)
    assert not all(torch.equal(adapters[0][k], other[k]) for k in other)


@pytest.mark.parametrize("method, extra, adapter_key", [
    ("lora", ("lora.use_dora=true",), "lora_magnitude_vector"),
    ("lora", ("lora.use_rslora=true",), "lora_A"),
    ("adalora", (), "lora_E"),
    ("prompt_tuning", (), "prompt_embeddings"),
    ("prefix_tuning", (), "prompt_embeddings"),
    ("p_tuning", (), "prompt_embeddings"),
])
def test_peft_methods_train_and_save(tiny_llama, tmp_path, method, extra, adapter_key):
    config = sft_config(tiny_llama, tmp_path / method, f"method={method}", "data.max_samples=16",
                        "train.max_steps=12", "train.lr=1e-2", *extra)
    result = train(config)
    assert result.last_loss < result.first_loss
    with safe_open(result.output_dir / "adapter_model.safetensors", "pt") as f:
        assert any(adapter_key in k for k in f.keys()), list(f.keys())[:5]


def test_full_finetuning_saves_a_whole_model(tiny_llama, tmp_path):
    result = train(sft_config(tiny_llama, tmp_path / "full", "method=full", "data.max_samples=16",
                              "train.max_steps=10", "train.lr=1e-3"))
    assert result.last_loss < result.first_loss
    assert (result.output_dir / "model.safetensors").exists()
    assert not (result.output_dir / "adapter_config.json").exists()


def test_modules_to_save_trains_embeddings_in_full(tiny_llama, tmp_path):
    result = train(sft_config(tiny_llama, tmp_path / "mts", "data.max_samples=8", "train.max_steps=2",
                              "lora.modules_to_save=embed_tokens,lm_head"))
    with safe_open(result.output_dir / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any("embed_tokens" in k for k in keys) and any("lm_head" in k for k in keys)


def test_qlora_on_cpu_says_it_needs_cuda(tiny_llama, tmp_path):
    with pytest.raises(LoraforgeError, match="needs a CUDA GPU.*method: lora"):
        train(sft_config(tiny_llama, tmp_path / "q", "method=qlora", "train.max_steps=1"))


def test_existing_run_dir_is_not_overwritten(learned_run, tiny_llama):
    config, result = learned_run
    with pytest.raises(LoraforgeError, match="already holds a run.*resume_from_checkpoint=last"):
        train(sft_config(tiny_llama, result.output_dir, "train.max_steps=1"))


def test_tokenizer_larger_than_embedding_is_refused(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    bigger = tmp_path / "tok"
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.add_tokens([f"新词{i}" for i in range(5)])
    tokenizer.save_pretrained(bigger)
    with pytest.raises(LoraforgeError, match=r"has 2005 tokens but the model's embedding has 2000 rows"):
        train(sft_config(tiny_llama, tmp_path / "o", f"model.tokenizer={bigger}", "train.max_steps=1"))


def test_pretraining_stage_learns_new_text(pretrained_llama, tmp_path):
    config = sft_config(pretrained_llama, tmp_path / "pt", "stage=pt", "data.datasets=zh_heldout",
                        "data.block_size=64", "train.max_steps=80", "train.lr=5e-3", "lora.r=16")
    result = train(config)
    losses = [r["loss"] for r in read_log(result.output_dir / "trainer_log.jsonl") if "loss" in r]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
def test_deepspeed_config_is_checked_before_training(tiny_llama, tmp_path):
    with pytest.raises(LoraforgeError, match="no such DeepSpeed JSON file"):
        train(sft_config(tiny_llama, tmp_path / "a", f"train.deepspeed={tmp_path / 'missing.json'}"))
    ds = tmp_path / "ds_z2.json"
    ds.write_text('{"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}')
    with pytest.raises(LoraforgeError, match=r"needs the deepspeed package: pip install 'loraforge\[gpu\]'"):
        train(sft_config(tiny_llama, tmp_path / "b", f"train.deepspeed={ds}"))


def test_eval_split_reports_eval_loss(tiny_llama, tmp_path):
    result = train(sft_config(tiny_llama, tmp_path / "ev", "data.max_samples=20", "data.val_size=0.2",
                              "train.max_steps=4", "train.eval_steps=2", "train.gradient_checkpointing=true",
                              "train.grad_accum=2"))
    evals = [r for r in read_log(result.output_dir / "trainer_log.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]  # no duplicate final eval
    assert result.eval_loss == pytest.approx(evals[-1]["eval_loss"])
    assert result.train_examples == 16


def test_skip_invalid_training_says_what_it_dropped(tiny_llama, tmp_path, capsys):
    data = tmp_path / "mixed.jsonl"
    good = {"instruction": "天空是什么颜色？", "output": "蓝色。"}
    data.write_text("\n".join([json.dumps(good, ensure_ascii=False)] * 6
                              + ['{"instruction": "空的回答", "output": ""}', '{"instruction": "x"}']) + "\n")
    for attempt in ("fresh", "cached"):
        train(sft_config(tiny_llama, tmp_path / attempt, f"data.datasets={data}", "data.skip_invalid=true",
                         "train.max_steps=1"))
        out = capsys.readouterr().out
        assert "data: 6 records → 6 examples" in out, out
        assert "dropped 2 invalid records" in out and "mixed.jsonl:7" in out, out
    assert "from the cache" in out
    assert "lora: training" in out and "parameters (" in out
