"""`merge --format pth`: Meta's consolidated checkpoint, equal to peft's merge after Meta's conventions."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from loraforge.errors import LoraforgeError
from loraforge.export import pth
from loraforge.export.hf import merge_to_hf
from loraforge.export.pth import ffn_params, merge_to_pth
from loraforge.export.weights import base_shards

from conftest import random_adapter


def meta_to_hf(weight, n_heads):
    """Written from the conversion rule, independently of loraforge: Meta's interleaved
    rotary pairs (x0, x1), (x2, x3)… per head → HF's first-half / second-half order."""
    rows, cols = weight.shape
    per_head = rows // n_heads
    heads = weight.reshape(n_heads, per_head, cols)
    return torch.cat([heads[:, 0::2], heads[:, 1::2]], dim=1).reshape(rows, cols)


# the fields of Meta's LLaMA-2 `ModelArgs` that params.json may set (llama/model.py, meta-llama/llama v2)
LLAMA2_MODEL_ARGS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                     "norm_eps"}
EXTENDED_VOCAB = 2064  # the pre-training adapter adds 64 tokens, as Chinese-LLaMA's does (at scale)


def peft_merged(base, adapters, vocab=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if vocab:
        model.resize_token_embeddings(vocab)  # what a user does before loading an extended-vocab adapter
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.state_dict(), model.config


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    """A pre-training adapter with an extended vocabulary (full embed_tokens/lm_head), then an SFT one."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("pth-adapters")
    extended = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    extended.resize_token_embeddings(EXTENDED_VOCAB)
    extended.save_pretrained(root / "extended-base")
    first = random_adapter(root / "extended-base", root / "pt", 21, r=4, lora_alpha=8,
                           modules_to_save=["embed_tokens", "lm_head"])
    second = random_adapter(tiny_llama, root / "sft", 22, r=8, lora_alpha=16)
    return [first, second]


def data_offsets(path):
    """Where each record's bytes start: its local header is 30 bytes + name + extra field."""
    with zipfile.ZipFile(path) as archive, open(path, "rb") as fh:
        offsets = {}
        for info in archive.infolist():
            fh.seek(info.header_offset)
            name_len, extra_len = struct.unpack("<HH", fh.read(30)[26:30])
            offsets[info.filename] = info.header_offset + 30 + name_len + extra_len
        return offsets


@pytest.mark.parametrize("mmap", [False, True])
def test_every_tensor_equals_peft_merge_in_meta_layout(tiny_llama, adapters, tmp_path, mmap):
    out = merge_to_pth(tiny_llama, adapters, tmp_path / "meta")
    state = torch.load(out / "consolidated.00.pth", weights_only=True, mmap=mmap)
    reference, config = peft_merged(tiny_llama, adapters, EXTENDED_VOCAB)
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

    assert {t.dtype for t in state.values()} == {torch.float32}

    params = json.loads((out / "params.json").read_text())
    assert params["dim"] == config.hidden_size and params["n_layers"] == config.num_hidden_layers
    assert (params["n_heads"], params["n_kv_heads"]) == (heads, kv_heads)
    assert params["vocab_size"] == state["tok_embeddings.weight"].shape[0] == EXTENDED_VOCAB
    assert state["output.weight"].shape[0] == EXTENDED_VOCAB
    assert params["norm_eps"] == 1e-5
    # Meta's loaders call ModelArgs(max_seq_len=…, **params), and LLaMA-2's ModelArgs has no rope_theta
    # (fixed at 10000 there): either key would make them raise a TypeError
    assert set(params) <= LLAMA2_MODEL_ARGS
    assert params | ffn_params(config.hidden_size, config.intermediate_size) == params
    assert (out / "tokenizer.model").read_bytes() == (tiny_llama / "tokenizer.model").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert not list(tmp_path.glob(".meta.partial*"))


def test_every_record_is_64_byte_aligned_also_past_4_gib(tiny_llama, tmp_path, monkeypatch):
    """torch.load(mmap=True) maps records in place; a record of 2 GiB or more takes zip64 headers,
    simulated here by lowering zipfile's limit so the tiny tensors take that path too."""
    plain = merge_to_pth(tiny_llama, [], tmp_path / "plain") / "consolidated.00.pth"
    assert all(offset % 64 == 0 for offset in data_offsets(plain).values())
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 2000)
    big = merge_to_pth(tiny_llama, [], tmp_path / "zip64") / "consolidated.00.pth"
    monkeypatch.undo()
    offsets = data_offsets(big)
    assert all(offset % 64 == 0 for offset in offsets.values())
    assert offsets["consolidated.00/data/0"] - offsets["consolidated.00/data.pkl"] > 0
    expected = torch.load(plain, weights_only=True)
    for mmap in (False, True):
        state = torch.load(big, weights_only=True, mmap=mmap)
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_the_base_dtype_is_kept(tiny_llama, adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    base = tmp_path / "bf16"
    shutil.copytree(tiny_llama, base)
    weights = load_file(base / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, base / "model.safetensors",
              metadata={"format": "pt"})
    state = torch.load(merge_to_pth(base, adapters, tmp_path / "meta") / "consolidated.00.pth", weights_only=True)
    hf = load_file(merge_to_hf(base, adapters, tmp_path / "hf") / "model.safetensors")
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert torch.equal(state["layers.1.feed_forward.w2.weight"], hf["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(meta_to_hf(state["layers.1.attention.wk.weight"], 2), hf["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(state["tok_embeddings.weight"], hf["model.embed_tokens.weight"])


def test_a_failure_midway_leaves_nothing(tiny_llama, adapters, tmp_path, monkeypatch):
    def failing(planned, adapters):
        yield next(real(planned, adapters))
        raise OSError(28, "No space left on device")

    real = pth.merged_tensors
    monkeypatch.setattr(pth, "merged_tensors", failing)
    with pytest.raises(LoraforgeError, match=r"writing .*meta stopped: no space left on the device"):
        merge_to_pth(tiny_llama, adapters, tmp_path / "meta")
    assert list(tmp_path.iterdir()) == []


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
    if (dim, intermediate) == (8192, 28672):
        assert p == {"multiple_of": 4096, "ffn_dim_multiplier": 1.3}  # exactly LLaMA-2-70B's


def test_tied_embeddings_share_one_storage(tiny_tied, tmp_path):
    """Meta's model has a separate `output`: it gets the embedding, stored once in the file."""
    state = torch.load(merge_to_pth(tiny_tied, [], tmp_path / "meta") / "consolidated.00.pth", weights_only=True)
    assert "lm_head.weight" not in base_shards(tiny_tied)
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    assert state["output.weight"].untyped_storage().data_ptr() == state["tok_embeddings.weight"].untyped_storage().data_ptr()


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


@pytest.fixture(scope="module")
def tiny_mha(spm_tokenizer, tmp_path_factory):
    from loraforge.tiny import TinyShape, build_tiny_model

    return build_tiny_model(spm_tokenizer, tmp_path_factory.mktemp("mha"), TinyShape(kv_heads=4))


@pytest.mark.parametrize("model, kv_heads", [("tiny_llama", 2), ("tiny_mha", 4)])
def test_meta_to_hf_gives_back_the_base_q_and_k(model, kv_heads, request, tmp_path):
    """The inverse permutation, written in the test, turns wq/wk back into the base's q_proj/k_proj
    bit for bit, with n_kv_heads for wk under grouped-query attention and n_heads without it."""
    from safetensors.torch import load_file

    base = request.getfixturevalue(model)
    out = merge_to_pth(base, [], tmp_path / "meta")
    state, hf = torch.load(out / "consolidated.00.pth", weights_only=True), load_file(base / "model.safetensors")
    params = json.loads((out / "params.json").read_text())
    assert params.get("n_kv_heads", params["n_heads"]) == kv_heads
    assert ("n_kv_heads" in params) == (kv_heads < params["n_heads"])  # LLaMA-1/2-7B's params.json has none
    for i in range(params["n_layers"]):
        assert torch.equal(meta_to_hf(state[f"layers.{i}.attention.wq.weight"], params["n_heads"]),
                           hf[f"model.layers.{i}.self_attn.q_proj.weight"])
        assert torch.equal(meta_to_hf(state[f"layers.{i}.attention.wk.weight"], kv_heads),
                           hf[f"model.layers.{i}.self_attn.k_proj.weight"])


LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("rope, expected", [
    ({"rope_type": "default", "rope_theta": 10000.0}, {}),  # LLaMA-1/2: Meta's params.json has no rope key
    ({"rope_type": "default", "rope_theta": 1000000.0}, {"rope_theta": 1000000.0}),  # CodeLlama
    (LLAMA31_ROPE | {"rope_theta": 500000.0}, {"rope_theta": 500000.0, "use_scaled_rope": True}),  # Llama-3.1
    (LLAMA31_ROPE | {"rope_theta": 500000.0, "factor": 32.0}, "rope_type=llama3, factor=32.0"),  # Meta's code has factor 8 built in
    ({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, "rope_type=linear, factor=4.0"),
])
def test_rope_settings_reach_params_json_or_are_refused(tiny_llama, tmp_path, rope, expected):
    """A rope setting params.json cannot carry would give a model with the wrong rotary frequencies."""
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    config = json.loads((base / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = rope
    (base / "config.json").write_text(json.dumps(config))
    if isinstance(expected, str):
        with pytest.raises(LoraforgeError, match=f"rope scaling {expected}.*use `merge --format hf`"):
            merge_to_pth(base, [], tmp_path / "meta")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
        return
    params = json.loads((merge_to_pth(base, [], tmp_path / "meta") / "params.json").read_text())
    assert {k: params[k] for k in ("rope_theta", "use_scaled_rope") if k in params} == expected
