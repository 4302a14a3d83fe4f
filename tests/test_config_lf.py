"""LLaMA-Factory YAMLs as they are: every key of its examples is mapped, noted or refused.

The key lists below were read off LLaMA-Factory's `examples/{train_lora,train_full,
train_qlora,merge_lora,inference}/*.yaml` (hiyouga/LLaMA-Factory at ff6d4d1, including the
commented `### eval` keys users uncomment); the YAMLs written here are our own files with
the keys and values of its `qwen3_lora_sft.yaml`, `qwen3_lora_pretrain.yaml`,
`merge_lora/qwen3_lora_sft.yaml` and `inference/qwen3_lora_sft.yaml`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

from loraforge import config as config_module
from loraforge.cli import main
from loraforge.config import read_config
from loraforge.config_lf import read_lf_command
from loraforge.errors import LoraforgeError

from conftest import DATA_DIR, random_adapter

# every key in LLaMA-Factory's train_* example YAMLs
TRAIN_EXAMPLE_KEYS = [
    "model_name_or_path", "trust_remote_code", "stage", "do_train", "finetuning_type", "lora_rank", "lora_target",
    "deepspeed", "dataset", "dataset_dir", "template", "cutoff_len", "max_samples", "preprocessing_num_workers",
    "dataloader_num_workers", "packing", "output_dir", "logging_steps", "save_steps", "plot_loss",
    "overwrite_output_dir", "save_only_model", "report_to", "per_device_train_batch_size",
    "gradient_accumulation_steps", "gradient_checkpointing", "gradient_checkpointing_kwargs", "learning_rate",
    "num_train_epochs", "lr_scheduler_type", "warmup_ratio", "bf16", "ddp_timeout", "resume_from_checkpoint",
    "val_size", "per_device_eval_batch_size", "eval_strategy", "eval_steps", "eval_dataset", "pref_beta",
    "pref_loss", "quantization_bit", "quantization_method", "double_quantization", "tokenized_path",
    "image_max_pixels", "video_max_pixels", "video_fps", "video_maxlen", "use_reentrant_gc", "freeze_vision_tower",
    "freeze_multi_modal_projector", "freeze_language_model", "ray_num_workers", "ray_init_kwargs",
    "adapter_name_or_path", "export_dir", "export_size", "export_device", "export_legacy_format",
    "export_quantization_bit", "export_quantization_dataset", "infer_backend",
]

MINIMAL = {"model_name_or_path": "m", "dataset": "a", "output_dir": "o"}

QWEN3_LORA_SFT = """\
### model
model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/qwen3-4b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""

QWEN3_LORA_PRETRAIN = """\
### model
model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
trust_remote_code: true

### method
stage: pt
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: c4_demo
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/qwen3-4b/lora/pretrain
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""


def write(tmp_path, tree, name="lf.yaml"):
    path = tmp_path / name
    path.write_text(tree if isinstance(tree, str) else yaml.safe_dump(tree, allow_unicode=True, sort_keys=False))
    return path


def field(config, dotted):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(config_module, "_has_cuda", lambda: False)


# --- the table: mapped, noted, refused ------------------------------------------------

@pytest.mark.parametrize("key, value, ours, expected", [
    ("model_name_or_path", "base", "model.path", "base"),
    ("trust_remote_code", True, "model.trust_remote_code", True),
    ("stage", "pt", "stage", "pt"),
    ("stage", "dpo", "stage", "dpo"),
    ("stage", "kto", "stage", "kto"),
    ("stage", "rm", "stage", "rm"),
    ("finetuning_type", "full", "method", "full"),
    ("lora_rank", 16, "lora.r", 16),
    ("lora_target", "all", "lora.target", ["all"]),
    ("lora_target", "q_proj,v_proj", "lora.target", ["q_proj", "v_proj"]),
    ("deepspeed", "ds_z3_config.json", "train.deepspeed", "ds_z3_config.json"),
    ("dataset", "identity,alpaca_en_demo", "data.datasets", ["identity", "alpaca_en_demo"]),
    ("dataset", ["identity", "alpaca_zh_demo"], "data.datasets", ["identity", "alpaca_zh_demo"]),
    ("dataset_dir", "data", "data.dir", "data"),
    ("template", "qwen3_nothink", "data.template", "qwen3_nothink"),
    ("cutoff_len", 4096, "data.cutoff_len", 4096),
    ("max_samples", 1000, "data.max_samples", 1000),
    ("dataloader_num_workers", 4, "train.dataloader_workers", 4),
    ("packing", True, "data.packing", True),
    ("output_dir", "saves/x", "train.output_dir", "saves/x"),
    ("logging_steps", 10, "train.logging_steps", 10),
    ("save_steps", 500, "train.save_steps", 500),
    ("overwrite_output_dir", True, "train.overwrite_output_dir", True),
    ("per_device_train_batch_size", 2, "train.batch_size", 2),
    ("gradient_accumulation_steps", 8, "train.grad_accum", 8),
    ("gradient_checkpointing", True, "train.gradient_checkpointing", True),
    ("learning_rate", 1.0e-4, "train.lr", 1e-4),
    ("num_train_epochs", 3.0, "train.epochs", 3.0),
    ("lr_scheduler_type", "cosine", "train.scheduler", "cosine"),
    ("warmup_ratio", 0.1, "train.warmup_ratio", 0.1),
    ("resume_from_checkpoint", None, "train.resume_from_checkpoint", None),
    ("val_size", 0.1, "data.val_size", 0.1),
    ("eval_steps", 500, "train.eval_steps", 500),
    ("pref_beta", 0.2, "pref.beta", 0.2),
    ("pref_loss", "simpo", "pref.loss", "simpo"),
])
def test_mapped_key_lands_on_our_field(tmp_path, key, value, ours, expected):
    config, _ = read_config(write(tmp_path, {**MINIMAL, key: value}))
    assert field(config, ours) == expected


@pytest.mark.parametrize("key, value, note", [
    ("do_train", True, "always trains"),
    ("preprocessing_num_workers", 16, "one process"),
    ("plot_loss", True, "loss.png"),
    ("report_to", "none", "trainer_log.jsonl"),
    ("report_to", ["none"], "trainer_log.jsonl"),
    ("save_only_model", False, "optimizer state"),
    ("ddp_timeout", 180000000, "timeout"),
    ("overwrite_cache", True, "keyed by content"),
    ("per_device_eval_batch_size", 1, "per_device_train_batch_size"),
    ("eval_strategy", "steps", "eval_steps"),
    ("gradient_checkpointing_kwargs", {"use_reentrant": False}, "checkpointing mode"),
    ("use_reentrant_gc", False, "checkpointing mode"),
    ("quantization_method", "bnb", "bitsandbytes"),
    ("double_quantization", True, "double-quantizes"),
    ("flash_attn", "fa2", "attention kernel"),
    ("temperature", 0.95, "not used in training"),
])
def test_noted_key_prints_its_note_once_and_changes_nothing(tmp_path, key, value, note):
    plain, _ = read_config(write(tmp_path, MINIMAL, "plain.yaml"))
    config, notes = read_config(write(tmp_path, {**MINIMAL, key: value}), [f"{key}={json.dumps(value)}"])
    mine = [n for n in notes if n.startswith(f"{key}:")]
    assert len(mine) == 1 and note in mine[0], notes
    assert config == plain


@pytest.mark.parametrize("key, value, reason", [
    ("report_to", "wandb", "nothing is sent to wandb"),
    ("do_train", False, "loraforge eval generate"),
    ("finetuning_type", "freeze", "finetuning_type: lora"),
    ("stage", "ppo", "stage: rm"),
    ("image_max_pixels", 262144, "text-only"),
    ("freeze_vision_tower", True, "text-only"),
    ("video_fps", 1.0, "text-only"),
    ("ray_num_workers", 4, "torchrun --nproc_per_node"),
    ("quantization_method", "gptq", "bitsandbytes"),
    ("quantization_method", "awq", "bitsandbytes"),
    ("quantization_bit", 8, "4-bit NF4 only"),
    ("double_quantization", False, "always double-quantizes"),
    ("adapter_name_or_path", "saves/lora/sft", "loraforge merge --base BASE --adapter saves/lora/sft"),
    ("export_dir", "saves/merged", "loraforge merge FILE.yaml"),
    ("export_size", 5, "loraforge merge FILE.yaml"),
    ("infer_backend", "huggingface", "loraforge chat FILE.yaml"),
    ("tokenized_path", "saves/ds", "data.cache_dir"),
    ("eval_dataset", "alpaca_en_demo", "val_size"),
    ("use_galore", True, "AdamW"),
    ("rope_scaling", "linear", "RoPE"),
])
def test_refused_key_names_its_reason_and_line(tmp_path, key, value, reason):
    with pytest.raises(LoraforgeError) as err:
        read_config(write(tmp_path, {**MINIMAL, key: value}))
    message = str(err.value)
    assert f"'{key}" in message and "not supported" in message and reason in message, message
    assert "(line 4)" in message, message  # the fourth key of the file


def test_every_key_of_llama_factorys_examples_is_known(tmp_path):
    for key in TRAIN_EXAMPLE_KEYS:
        try:
            read_config(write(tmp_path, {**MINIMAL, key: None}))
        except LoraforgeError as err:
            assert "unknown config key" not in str(err), key


def test_quantization_bit_4_is_qlora(tmp_path):
    config, notes = read_config(write(tmp_path, {**MINIMAL, "quantization_bit": 4, "quantization_method": "bnb",
                                                 "finetuning_type": "lora"}))
    assert config.method == "qlora"
    assert any("method: qlora" in n for n in notes)
    with pytest.raises(LoraforgeError, match="cannot go with finetuning_type: full"):
        read_config(write(tmp_path, {**MINIMAL, "quantization_bit": 4, "finetuning_type": "full"}))


def test_bf16_on_cpu_trains_in_fp32_with_a_note(tmp_path, no_cuda):
    config, notes = read_config(write(tmp_path, {**MINIMAL, "bf16": True}))
    assert config.train.precision == "fp32"
    assert any(n.startswith("bf16: true needs a CUDA GPU") for n in notes)


def test_bf16_on_cuda_is_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "_has_cuda", lambda: True)
    assert read_config(write(tmp_path, {**MINIMAL, "bf16": True}))[0].train.precision == "bf16"
    assert read_config(write(tmp_path, {**MINIMAL, "fp16": True}))[0].train.precision == "fp16"
    with pytest.raises(LoraforgeError, match="bf16 and fp16 are both true"):
        read_config(write(tmp_path, {**MINIMAL, "bf16": True, "fp16": True}))


def test_llama_factory_defaults_fill_what_an_lf_yaml_leaves_out(tmp_path):
    lf, notes = read_config(write(tmp_path, MINIMAL))
    # the HF Trainer's defaults, which LLaMA-Factory keeps
    assert (lf.train.lr, lf.train.scheduler, lf.train.batch_size, lf.train.group_by_length) == (5e-5, "linear", 8, False)
    assert lf.data.cutoff_len == 2048
    assert any("LLaMA-Factory's defaults apply" in n for n in notes)
    ours, notes = read_config(write(tmp_path, {"model": {"path": "m"}, "data": {"datasets": "a"},
                                               "train": {"output_dir": "o"}}, "ours.yaml"))
    assert (ours.train.lr, ours.train.group_by_length, notes) == (2e-4, True, [])


# --- every bad key in one run, hints from a table ---------------------------------------

def test_all_bad_keys_are_reported_at_once_with_lines(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\n"      # 1
                           "dataset: a\n"                 # 2
                           "output_dir: o\n"              # 3
                           "do_train: true\n"             # 4 noted: fine
                           "lora_rnak: 8\n"               # 5 misspelt
                           "report_to: wandb\n"           # 6 refused value
                           "image_max_pixels: 262144\n"   # 7 multimodal
                           "video_fps: 1.0\n"             # 8 multimodal
                           "finetuning_type: freeze\n"    # 9 refused value
                           "learning_rate: fast\n")       # 10 wrong type
    with pytest.raises(LoraforgeError) as err:
        read_config(path, ["ray_num_workers=4", "lora.rnak=3"])
    message = str(err.value)
    for expected in ("unknown config key 'lora_rnak' — did you mean 'lora.r'? (line 5)",
                     "'report_to: wandb' (line 6)",
                     "'image_max_pixels: 262144' (line 7), 'video_fps: 1.0' (line 8) are not supported — loraforge "
                     "trains text-only",
                     "'finetuning_type: freeze' (line 9)",
                     "train.lr: Input should be a valid number",
                     "override 'ray_num_workers=4': 'ray_num_workers: 4' is not supported",
                     "override 'lora.rnak=3': unknown config key 'lora.rnak' — did you mean 'lora.r'?"):
        assert expected in message, (expected, message)
    assert "do_train" not in message


@pytest.mark.parametrize("key, hint", [
    # the wrong hints: do_train → train, export_size → data.val_size, adapter_name_or_path → model.path
    ("export_size", "loraforge merge FILE.yaml"),
    ("adapter_name_or_path", "loraforge merge --base BASE"),
    # names of other tools, from the table
    ("max_seq_length", "did you mean 'data.cutoff_len'"),
    ("base_model", "did you mean 'model.path'"),
    ("micro_batch_size", "did you mean 'train.batch_size'"),
    ("lora_r", "did you mean 'lora.r'"),
    ("val_set_size", "did you mean 'data.val_size'"),
    # misspelt LLaMA-Factory names: distance over its names, answered with our key
    ("num_train_epoch", "did you mean 'train.epochs'"),
    ("gradient_accumulation_step", "did you mean 'train.grad_accum'"),
    ("preprocessing_num_worker", "did you mean 'preprocessing_num_workers'"),
])
def test_hints_come_from_the_table_first(tmp_path, key, hint):
    with pytest.raises(LoraforgeError) as err:
        read_config(write(tmp_path, {**MINIMAL, key: 5}))
    assert hint in str(err.value), str(err.value)
    assert "data.val_size'" not in str(err.value) or key == "val_set_size"


def test_do_train_is_not_hinted_as_train(tmp_path):
    config, notes = read_config(write(tmp_path, {**MINIMAL, "do_train": True}))
    assert "do_train: `loraforge train` always trains" in notes


def test_a_key_set_twice_is_an_error(tmp_path):
    with pytest.raises(LoraforgeError, match="'learning_rate' and 'train.lr' both set train.lr"):
        read_config(write(tmp_path, {**MINIMAL, "train": {"lr": 1e-4}, "learning_rate": 2e-4}))
    path = write(tmp_path, "model_name_or_path: m\ndataset: a\noutput_dir: o\nlora_rank: 8\nlora_rank: 16\n")
    with pytest.raises(LoraforgeError, match=r"'lora_rank' is written twice \(lines 4 and 5\)"):
        read_config(path)


def test_overrides_take_llama_factory_names_and_win(tmp_path):
    config, notes = read_config(write(tmp_path, {**MINIMAL, "learning_rate": 1e-4}),
                                ["learning_rate=3e-4", "lora_rank=4", "do_train=true"])
    assert (config.train.lr, config.lora.r) == (3e-4, 4)
    assert any(n.startswith("do_train:") for n in notes)


# --- merge_lora and inference YAMLs -----------------------------------------------------

def test_merge_yaml_reads_as_loraforge_merge_arguments(tmp_path):
    path = write(tmp_path, {"model_name_or_path": "Qwen/Qwen3-4B-Instruct-2507",
                            "adapter_name_or_path": "saves/qwen3-4b/lora/sft", "template": "qwen3_nothink",
                            "trust_remote_code": True, "export_dir": "saves/qwen3_sft_merged", "export_size": 5,
                            "export_device": "cpu", "export_legacy_format": False})
    args, notes = read_lf_command(path, "merge")
    assert args == {"base": "Qwen/Qwen3-4B-Instruct-2507", "adapter": "saves/qwen3-4b/lora/sft",
                    "output": "saves/qwen3_sft_merged", "max_shard_gb": 5}
    assert {n.split(":")[0] for n in notes} == {"template", "trust_remote_code", "export_device", "export_legacy_format"}


def test_gptq_merge_yaml_is_refused_pointing_at_gguf(tmp_path):
    path = write(tmp_path, {"model_name_or_path": "m", "template": "qwen3_nothink", "export_dir": "o",
                            "export_quantization_bit": 4, "export_quantization_dataset": "data/c4_demo.jsonl",
                            "export_size": 5, "lora_rank": 8})
    with pytest.raises(LoraforgeError) as err:
        read_lf_command(path, "merge")
    message = str(err.value)
    assert "3 keys need a change" in message
    assert "'export_quantization_bit: 4' is not supported" in message and "loraforge export gguf" in message
    assert "'lora_rank' (line 7) is not read by `loraforge merge` (a training key: `loraforge train FILE.yaml`)" \
        in message


def test_loraforge_merge_takes_a_merge_yaml(tmp_path, tiny_llama, capsys):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = random_adapter(tiny_llama, tmp_path / "adapter", seed=3)
    out = tmp_path / "merged"
    path = write(tmp_path, {"model_name_or_path": str(tiny_llama), "adapter_name_or_path": str(adapter),
                            "template": "qwen3_nothink", "trust_remote_code": True, "export_dir": str(out),
                            "export_size": 5, "export_device": "cpu", "export_legacy_format": False})
    assert main(["merge", str(path)]) == 0
    assert "note: export_device:" in capsys.readouterr().err
    merged = {}
    for shard in out.glob("*.safetensors"):
        merged.update(load_file(shard))
    # ground truth: peft's own merge of the same adapter
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                          adapter).merge_and_unload().state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(merged[name].float(), reference[name], atol=1e-5)
    assert not torch.allclose(merged[name].float(), load_file(next(tiny_llama.glob("*.safetensors")))[name].float())


def test_train_given_a_merge_yaml_says_which_command_reads_it(tmp_path, capsys):
    path = write(tmp_path, {"model_name_or_path": "m", "adapter_name_or_path": "a", "template": "qwen3_nothink",
                            "export_dir": "out", "export_size": 5})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "run `loraforge merge FILE.yaml`" in err and "loraforge merge --base BASE --adapter a" in err
    assert "Traceback" not in err


def test_merge_without_base_names_both_ways(capsys):
    assert main(["merge", "-o", "x"]) == 2
    assert "merge needs --base (or a LLaMA-Factory merge_lora YAML" in capsys.readouterr().err


def test_inference_yaml_reads_as_chat_arguments_with_lfs_generation_defaults(tmp_path):
    path = write(tmp_path, {"model_name_or_path": "Qwen/Qwen3-4B-Instruct-2507",
                            "adapter_name_or_path": "saves/qwen3-4b/lora/sft", "template": "qwen3_nothink",
                            "infer_backend": "huggingface", "trust_remote_code": True})
    args, notes = read_lf_command(path, "chat")
    assert args == {"model": "Qwen/Qwen3-4B-Instruct-2507", "adapter": "saves/qwen3-4b/lora/sft",
                    "template": "qwen3_nothink", "engine": "hf",
                    "temperature": 0.95, "top_p": 0.7, "top_k": 50, "max_new_tokens": 1024, "min_p": 0.0}
    with pytest.raises(LoraforgeError, match="infer_backend: sglang is not available"):
        read_lf_command(write(tmp_path, {"model_name_or_path": "m", "infer_backend": "sglang"}, "s.yaml"), "chat")


def test_serve_given_an_inference_yaml_names_the_command(tmp_path, capsys):
    path = write(tmp_path, {"model_name_or_path": "Qwen/Qwen3-4B-Instruct-2507",
                            "adapter_name_or_path": "saves/qwen3-4b/lora/sft", "template": "qwen3_nothink",
                            "infer_backend": "huggingface", "trust_remote_code": True})
    assert main(["serve", str(path)]) == 2
    assert "loraforge serve saves/qwen3-4b/lora/sft --chat-template qwen3_nothink" in capsys.readouterr().err


def loraforge(*args, cwd=None, stdin=None):
    return subprocess.run([sys.executable, "-m", "loraforge", *args], capture_output=True, text=True, cwd=cwd,
                          input=stdin, timeout=600)


def test_loraforge_chat_takes_an_inference_yaml(tmp_path, tiny_llama):
    adapter = random_adapter(tiny_llama, tmp_path / "adapter", seed=4)
    path = write(tmp_path, {"model_name_or_path": str(tiny_llama), "adapter_name_or_path": str(adapter),
                            "template": "qwen3_nothink", "infer_backend": "huggingface", "trust_remote_code": True,
                            "do_sample": False})
    by_yaml = loraforge("chat", str(path), "--max-new-tokens", "6", "--device", "cpu", stdin="你好\n/exit\n")
    assert by_yaml.returncode == 0, by_yaml.stderr
    assert "note: trust_remote_code:" in by_yaml.stderr and "Traceback" not in by_yaml.stderr
    by_flags = loraforge("chat", str(tiny_llama), "--adapter", str(adapter), "--template", "qwen3_nothink",
                         "--engine", "hf", "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu",
                         stdin="你好\n/exit\n")
    assert by_flags.returncode == 0, by_flags.stderr
    assert by_yaml.stdout == by_flags.stdout and by_yaml.stdout.strip()


# --- `loraforge train` on LLaMA-Factory's own YAMLs -------------------------------------

def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "trainer_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("text, run, dataset", [
    (QWEN3_LORA_SFT, "saves/qwen3-4b/lora/sft", "alpaca_zh_demo"),
    (QWEN3_LORA_PRETRAIN, "saves/qwen3-4b/lora/pretrain", "zh_corpus"),
], ids=["sft", "pretrain"])
def test_loraforge_train_runs_llama_factorys_yaml_unedited(tmp_path, tiny_llama, text, run, dataset):
    path = write(tmp_path, text)
    done = loraforge("train", str(path), f"model_name_or_path={tiny_llama}", f"dataset_dir={DATA_DIR}",
                     f"dataset={dataset}", "max_steps=4", "logging_steps=1", "max_samples=64", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for note in ("note: do_train:", "note: report_to:", "note: ddp_timeout:", "note: plot_loss:",
                 "note: save_only_model:", "note: preprocessing_num_workers:"):
        assert done.stderr.count(note) == 1, note
    run_dir = tmp_path / run  # output_dir as the YAML says, relative to where it ran
    for name in ("adapter_config.json", "adapter_model.safetensors", "loraforge.yaml", "trainer_log.jsonl",
                 "loss.png"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "adapter_config.json").read_text())["r"] == 8  # lora_rank: 8
    saved = yaml.safe_load((run_dir / "loraforge.yaml").read_text())
    assert saved["train"]["grad_accum"] == 8 and saved["train"]["lr"] == 1e-4 and saved["data"]["cutoff_len"] == 2048
    seen = losses(run_dir)
    assert len(seen) >= 4 and all(math.isfinite(x) for x in seen)
    assert "trained 4 steps" in done.stdout
