"""`loraforge merge`: the streamed merge equals peft's merge_and_unload, tensor for tensor."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from loraforge.errors import LoraforgeError
from loraforge.export.hf import merge_to_hf

from conftest import random_adapter


@pytest.fixture(scope="module")
def two_adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    first = random_adapter(tiny_llama, root / "pt", 1, r=4, lora_alpha=8, modules_to_save=["embed_tokens", "lm_head"])
    second = random_adapter(tiny_llama, root / "sft", 2, r=8, lora_alpha=8, use_rslora=True)
    return first, second


def peft_reference(base, adapters):
    """What a user gets today: apply and merge each adapter in turn with peft."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model


def test_streamed_merge_equals_peft_merge_and_unload(tiny_llama, two_adapters, tmp_path):
    out = merge_to_hf(tiny_llama, list(two_adapters), tmp_path / "merged")
    ours = load_file(out / "model.safetensors")
    reference = peft_reference(tiny_llama, two_adapters).state_dict()
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    base = load_file(tiny_llama / "model.safetensors")
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_reference(tiny_llama, two_adapters)(ids).logits)
    assert (out / "tokenizer.json").exists() and json.loads((out / "config.json").read_text())["vocab_size"] == 2000


def test_sharding_writes_an_index_that_transformers_loads(tiny_llama, two_adapters, tmp_path):
    out = merge_to_hf(tiny_llama, list(two_adapters), tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).exists() for s in shards)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    whole = merge_to_hf(tiny_llama, list(two_adapters), tmp_path / "whole")
    single = load_file(whole / "model.safetensors")
    for name, tensor in merged.state_dict().items():
        assert torch.equal(tensor, single[name]), name


def write_adapter(path, tensors, **config):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config}))
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def test_adapters_in_the_wrong_order_are_named(tiny_llama, tmp_path):
    big = write_adapter(tmp_path / "pt", {"base_model.model.model.embed_tokens.weight": torch.zeros(2064, 64)})
    small = write_adapter(tmp_path / "sft", {"base_model.model.model.embed_tokens.weight": torch.zeros(2048, 64)})
    with pytest.raises(LoraforgeError, match=r"adapter 2 \(.*sft\) has vocab 2048 < adapter 1's 2064.*wrong order"):
        merge_to_hf(tiny_llama, [big, small], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lora_for_another_base_is_refused(tiny_llama, tmp_path):
    wrong = write_adapter(tmp_path / "a", {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 128),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)})
    with pytest.raises(LoraforgeError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*trained on a different base"):
        merge_to_hf(tiny_llama, [wrong], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_base_shard_is_named_and_nothing_is_written(tiny_llama, tmp_path):
    broken = tmp_path / "base"
    shutil.copytree(tiny_llama, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraforgeError, match=r"model\.safetensors: cannot read safetensors .*corrupt or truncated"):
        merge_to_hf(broken, [], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))


def test_merge_command(tiny_llama, two_adapters, tmp_path):
    a, b = two_adapters
    done = subprocess.run([sys.executable, "-m", "loraforge", "merge", "--base", str(tiny_llama), "--adapter", f"{a},{b}",
                           "-o", str(tmp_path / "m")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m" / "model.safetensors").exists()
    again = subprocess.run([sys.executable, "-m", "loraforge", "merge", "--base", str(tiny_llama), "--adapter", f"{a},{b}",
                            "-o", str(tmp_path / "m")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
