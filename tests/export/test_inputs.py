"""The files users have: `pytorch_model*.bin` shards and Meta's `consolidated.*.pth` as the base, early peft
`adapter_model.bin` adapters as Chinese-LLaMA released them (49,953 then 49,954 embedding rows). Every layout
merges to the same tensors as safetensors, through the same stream."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge.errors import LoraforgeError
from loraforge.export.gguf_writer import export_gguf
from loraforge.export.hf import merge_to_hf
from loraforge.export.meta_pth import MetaCheckpoint
from loraforge.export.pth import merge_to_pth
from loraforge.export.weights import base_config, plan, read_adapter

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 16, 64, 2, 2, 1
MODULES = {"self_attn.q_proj": (HEADS * 8, HIDDEN), "self_attn.k_proj": (KV_HEADS * 8, HIDDEN),
           "self_attn.v_proj": (KV_HEADS * 8, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
           "mlp.gate_proj": (FFN, HIDDEN), "mlp.up_proj": (FFN, HIDDEN), "mlp.down_proj": (HIDDEN, FFN)}
# Chinese-LLaMA-Plus / Alpaca-Plus adapter_config.json as released (peft 0.2/0.3), sizes aside
EARLY_CONFIG = {"base_model_name_or_path": "chinese-llama-7b", "bias": "none", "enable_lora": None,
                "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": 32.0, "lora_dropout": 0.05,
                "merge_weights": False, "modules_to_save": ["embed_tokens", "lm_head"], "peft_type": "LORA", "r": 8,
                "target_modules": ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
                "task_type": "CAUSAL_LM"}


@pytest.fixture(scope="module")
def llama_7b_shaped(spm_tokenizer, tmp_path_factory):
    """LLaMA's 32,000-row vocabulary on a 16-wide, 2-layer model (GQA, so wk is permuted per kv head)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(40)
    config = LlamaConfig(vocab_size=32000, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-6,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    out = tmp_path_factory.mktemp("llama-7b-shaped") / "safetensors"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(spm_tokenizer / name, out / name)
    return out


def as_bin_shards(base, out):
    """The layout of a LLaMA-7B converted in 2023: pytorch_model-0000N-of-00002.bin + index, no safetensors."""
    state = load_file(base / "model.safetensors")
    names = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    out.mkdir()
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, out / file)
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}))
    for name in ("config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, out / name)
    return out


def as_two_parts(pth_dir, out, vocab_parallel: bool):
    """A 13B-style model-parallel release: each matrix split across consolidated.00/.01 as fairscale did."""
    state = torch.load(pth_dir / "consolidated.00.pth", weights_only=True)
    parts: list[dict] = [{}, {}]
    for name, tensor in state.items():
        if tensor.dim() == 1:
            pieces = [tensor, tensor]
        elif name.startswith("tok_embeddings."):
            pieces = tensor.chunk(2, dim=0 if vocab_parallel else 1)
        else:
            pieces = tensor.chunk(2, dim=1 if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else 0)
        for part, piece in zip(parts, pieces):
            part[name] = piece.clone()
    out.mkdir()
    for i, part in enumerate(parts):
        torch.save(part, out / f"consolidated.0{i}.pth")
    for name in ("params.json", "tokenizer.model"):
        shutil.copy(pth_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def bases(llama_7b_shaped, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    pth = merge_to_pth(llama_7b_shaped, [], root / "pth")
    return {"safetensors": llama_7b_shaped, "bin-shards": as_bin_shards(llama_7b_shaped, root / "bin"), "pth": pth,
            "pth-2-parts": as_two_parts(pth, root / "pth2", vocab_parallel=False),
            "pth-2-parts-vocab-parallel": as_two_parts(pth, root / "pth2v", vocab_parallel=True)}


def early_tensors(seed, vocab):
    """Early peft's keys: lora_A/B without the adapter name, modules_to_save under their plain names."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {"base_model.model.model.embed_tokens.weight": torch.randn(vocab, HIDDEN, generator=generator),
               "base_model.model.lm_head.weight": torch.randn(vocab, HIDDEN, generator=generator)}
    for layer in range(LAYERS):
        for module, (rows, cols) in MODULES.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(8, cols, generator=generator) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(rows, 8, generator=generator) * 0.3
    return tensors


def write_adapter(folder, tensors, early: bool, **config):
    folder.mkdir(parents=True)
    if early:
        torch.save(tensors, folder / "adapter_model.bin")
        (folder / "adapter_config.json").write_text(json.dumps({**EARLY_CONFIG, **config}))
    else:
        save_file(tensors, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 8, "lora_alpha": 32.0, "target_modules": EARLY_CONFIG["target_modules"],
             "modules_to_save": ["embed_tokens", "lm_head"], **config}))
    return folder


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """chinese_llama_plus_lora (49,953 rows) then chinese_alpaca_plus_lora (49,954), in both file layouts."""
    root = tmp_path_factory.mktemp("chinese-llama-adapters")
    pt, sft = early_tensors(41, 49953), early_tensors(42, 49954)
    return {layout: [write_adapter(root / layout / "pt", pt, layout == "early-bin"),
                     write_adapter(root / layout / "sft", sft, layout == "early-bin")]
            for layout in ("safetensors", "early-bin")}


@pytest.fixture(scope="module")
def reference(bases, chains, tmp_path_factory):
    """safetensors base + safetensors adapters: the path test_merge checks against peft."""
    return load_file(merge_to_hf(bases["safetensors"], chains["safetensors"],
                                 tmp_path_factory.mktemp("reference") / "m") / "model.safetensors")


@pytest.mark.parametrize("adapters", ["safetensors", "early-bin"])
@pytest.mark.parametrize("base", ["safetensors", "bin-shards", "pth", "pth-2-parts", "pth-2-parts-vocab-parallel"])
def test_every_layout_merges_to_the_same_tensors(bases, chains, reference, tmp_path, base, adapters):
    out = merge_to_hf(bases[base], chains[adapters], tmp_path / "merged")
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name
    assert ours["model.embed_tokens.weight"].shape == (49954, HIDDEN)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 49954 and (out / "tokenizer.model").exists()


def test_meta_checkpoint_reads_back_what_the_pth_writer_wrote(bases):
    """The inverse of export/pth.py: HF names, rotate-half q/k, and a config.json from params.json."""
    original = load_file(bases["safetensors"] / "model.safetensors")
    expected = json.loads((bases["safetensors"] / "config.json").read_text())
    for layout in ("pth", "pth-2-parts", "pth-2-parts-vocab-parallel"):
        checkpoint = MetaCheckpoint(bases[layout])
        assert set(checkpoint.keys()) == set(original)
        for name, tensor in original.items():
            assert torch.equal(checkpoint.read(name), tensor), (layout, name)
            assert torch.equal(checkpoint.read(name, (3, 11)), tensor[3:11]), (layout, name)  # blocks cut heads
        config = base_config(bases[layout])
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "rms_norm_eps", "vocab_size", "bos_token_id", "eos_token_id"):
            assert config[key] == expected[key], (layout, key)
        assert config["rope_parameters"]["rope_theta"] == 10000.0


@pytest.mark.parametrize("base", ["bin-shards", "pth", "pth-2-parts"])
def test_a_swapped_chain_is_still_caught(bases, chains, tmp_path, base):
    pt, sft = chains["early-bin"]
    with pytest.raises(LoraforgeError, match=r"adapter 2 \(.*pt\) has vocab 49953 < adapter 1's 49954.*wrong order"):
        merge_to_hf(bases[base], [sft, pt], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # two exports of a 49,954-token vocabulary: ~12 s
def test_gguf_from_a_pth_base_equals_gguf_from_safetensors(bases, chains, tmp_path):
    import gguf

    files = {layout: export_gguf(bases[layout], chains["early-bin"], tmp_path / f"{layout}.gguf", "f32")
             for layout in ("safetensors", "pth")}
    readers = {layout: gguf.GGUFReader(path) for layout, path in files.items()}
    tensors = {layout: {t.name: t.data for t in reader.tensors} for layout, reader in readers.items()}
    assert tensors["pth"].keys() == tensors["safetensors"].keys()
    for name, data in tensors["safetensors"].items():
        assert (tensors["pth"][name] == data).all(), name


def test_early_config_quirks(bases, chains, tmp_path):
    """fan_in_fan_out=true on LLaMA's nn.Linear is what peft itself resets to False; enable_lora (a fused
    qkv MergedLinear) belongs to another architecture."""
    pt = chains["early-bin"][0]
    flipped = shutil.copytree(pt, tmp_path / "fan-in-fan-out")
    config = json.loads((flipped / "adapter_config.json").read_text())
    (flipped / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    adapter = read_adapter(flipped)
    assert len(adapter.lora) == 2 * len(MODULES) and adapter.vocab_rows == 49953
    assert plan(bases["bin-shards"], [adapter])
    (flipped / "adapter_config.json").write_text(json.dumps({**config, "enable_lora": [True, False, True]}))
    with pytest.raises(LoraforgeError, match=r"enable_lora=\[True, False, True\] is early peft's fused-qkv"):
        read_adapter(flipped)


class Payload:
    """A pickle that runs code when loaded — what weights_only=True exists to refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_with_code_is_refused_unopened(chains, tmp_path):
    marker = tmp_path / "pwned"
    evil = shutil.copytree(chains["early-bin"][1], tmp_path / "evil")
    state = torch.load(evil / "adapter_model.bin", weights_only=True)
    torch.save({**state, "payload": Payload(marker)}, evil / "adapter_model.bin")
    with pytest.raises(LoraforgeError, match=r"adapter_model.bin: torch.load\(weights_only=True\) refused this pickle"
                                             r".*loraforge never unpickles arbitrary code"):
        read_adapter(evil)
    assert not marker.exists()


def test_damaged_inputs_are_named(bases, tmp_path):
    broken = shutil.copytree(bases["bin-shards"], tmp_path / "bin")
    shard = broken / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(LoraforgeError, match=r"pytorch_model-00002-of-00002.bin: cannot read this torch file"):
        plan(broken, [])
    meta = shutil.copytree(bases["pth"], tmp_path / "pth")
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, "use_qk_norm": True}))
    with pytest.raises(LoraforgeError, match=r"params.json: use_qk_norm=True — .*not ignored"):
        plan(meta, [])
    (meta / "params.json").write_text(json.dumps({**params, "multiple_of": 256}))
    with pytest.raises(LoraforgeError, match=r"feed-forward width of 256 but w1 has 64 rows"):
        base_config(meta)
    (meta / "consolidated.02.pth").write_bytes(b"")
    with pytest.raises(LoraforgeError, match=r"consolidated.00.pth, consolidated.02.pth are not numbered"):
        plan(meta, [])


@pytest.mark.slow
def test_verify_reads_a_pth_base_too(bases, tmp_path):
    """--verify's transformers reference comes from the same stream when the base is Meta's layout."""
    from loraforge.eval.parity import verify_export

    out = export_gguf(bases["pth"], [], tmp_path / "pth.gguf", "f32")
    report = verify_export(out, bases["pth"], [], tmp_path / "pth.parity.json")
    assert report["verdict"] == "PASS" and report["overall"]["top1"] == 1.0
