"""`merge --format pth`: Meta's consolidated checkpoint, equal to peft's merge after Meta's conventions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from loraforge.errors import LoraforgeError
from loraforge.export.pth import ffn_params, merge_to_pth

from conftest import random_adapter


def meta_to_hf(weight, n_heads):
    """Written from the conversion rule, independently of loraforge: Meta's interleaved
    rotary pairs (x0, x1), (x2, x3)… per head → HF's first-half / second-half order."""
    rows, cols = weight.shape
    per_head = rows // n_heads
    heads = weight.reshape(n_heads, per_head, cols)
    return torch.cat([heads[:, 0::2], heads[:, 1::2]], dim=1).reshape(rows, cols)


def peft_merged(base, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.state_dict(), model.config


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("pth-adapters")
    first = random_adapter(tiny_llama, root / "pt", 21, r=4, lora_alpha=8, modules_to_save=["embed_tokens", "lm_head"])
    second = random_adapter(tiny_llama, root / "sft", 22, r=8, lora_alpha=16)
    return [first, second]


@pytest.mark.parametrize("mmap", [False, True])
def test_every_tensor_equals_peft_merge_in_meta_layout(tiny_llama, adapters, tmp_path, mmap):
    out = merge_to_pth(tiny_llama, adapters, tmp_path / "meta")
    state = torch.load(out / "consolidated.00.pth", weights_only=True, mmap=mmap)
    reference, config = peft_merged(tiny_llama, adapters)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    assert kv_heads < heads  # grouped-query attention, as in LLaMA-2-70B
    assert len(state) == 2 + 1 + 9 * config.num_hidden_layers
    pairs = {"tok_embeddings.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
             "norm.weight": "model.norm.weight"}
    for i in range(config.num_hidden_layers):
        for meta, hf in [("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
                         ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w2", "mlp.down_proj"),
                         ("feed_forward.w3", "mlp.up_proj"), ("attention_norm", "input_layernorm"),
                         ("ffn_norm", "post_attention_layernorm")]:
            pairs[f"layers.{i}.{meta}.weight"] = f"model.layers.{i}.{hf}.weight"
        torch.testing.assert_close(meta_to_hf(state[f"layers.{i}.attention.wq.weight"], heads),
                                   reference[f"model.layers.{i}.self_attn.q_proj.weight"], rtol=0, atol=1e-6)
        torch.testing.assert_close(meta_to_hf(state[f"layers.{i}.attention.wk.weight"], kv_heads),
                                   reference[f"model.layers.{i}.self_attn.k_proj.weight"], rtol=0, atol=1e-6)
        assert not torch.equal(state[f"layers.{i}.attention.wq.weight"],
                               reference[f"model.layers.{i}.self_attn.q_proj.weight"])
    for meta, hf in pairs.items():
        torch.testing.assert_close(state[meta], reference[hf], rtol=0, atol=1e-6)

    params = json.loads((out / "params.json").read_text())
    assert params["dim"] == config.hidden_size and params["n_layers"] == config.num_hidden_layers
    assert (params["n_heads"], params["n_kv_heads"]) == (heads, kv_heads)
    assert params["vocab_size"] == state["tok_embeddings.weight"].shape[0] == config.vocab_size
    assert (out / "tokenizer.model").exists()


@pytest.mark.parametrize("dim, intermediate", [(4096, 11008), (5120, 13824), (8192, 28672), (4096, 14336),
                                               (64, 128), (256, 640), (2048, 5632), (100, 333)])
def test_params_reproduce_the_feed_forward_size_by_metas_formula(dim, intermediate):
    p = ffn_params(dim, intermediate)
    hidden = int(2 * 4 * dim / 3)
    if "ffn_dim_multiplier" in p:
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    assert p["multiple_of"] * ((hidden + p["multiple_of"] - 1) // p["multiple_of"]) == intermediate
    if (dim, intermediate) == (4096, 11008):
        assert p == {"multiple_of": 256}  # exactly LLaMA-2-7B's params.json


def test_tied_embeddings_share_one_storage(tiny_tied, tmp_path):
    state = torch.load(merge_to_pth(tiny_tied, [], tmp_path / "meta") / "consolidated.00.pth", weights_only=True)
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])


def test_qwen2_is_refused_and_nothing_written(tiny_qwen2, tmp_path):
    with pytest.raises(LoraforgeError, match="Meta's .pth layout exists only for LLaMA-style models — use `merge "
                                             "--format hf`"):
        merge_to_pth(tiny_qwen2, [], tmp_path / "meta")
    assert list(tmp_path.iterdir()) == []


def test_cli(tiny_llama, adapters, tmp_path):
    run = lambda out: subprocess.run([sys.executable, "-m", "loraforge", "merge", "--base", str(tiny_llama),  # noqa: E731
                                      "--adapter", ",".join(map(str, adapters)), "--format", "pth", "-o", str(out)],
                                     capture_output=True, text=True, timeout=300)
    done = run(tmp_path / "meta")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "meta" / "consolidated.00.pth").exists()
    again = run(tmp_path / "meta")
    assert again.returncode == 2 and "already exists" in again.stderr
