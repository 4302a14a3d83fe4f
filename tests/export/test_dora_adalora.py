"""DoRA and AdaLoRA through the one stream: peft's own merge_and_unload is the oracle, and llama.cpp runs the
GGUF export (DoRA merged) and the adapter export (AdaLoRA as plain LoRA) like transformers runs peft."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loraforge.export.gguf_writer import export_gguf
from loraforge.export.hf import merge_to_hf
from loraforge.export.lora_gguf import export_lora_gguf
from loraforge.export.weights import merged_chunks, merged_tensors, plan, read_adapter

from conftest import random_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = "春天来了，公园里的花都开了。Hello world, 混合 English 2024年"


def dora_adapter(base, out, seed, **lora):
    """A DoRA adapter whose magnitudes are no longer the base's row norms (as after training)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(use_dora=True, init_lora_weights=False, target_modules=TARGETS,
                                                  **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.5 * torch.randn_like(param))
            elif "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(out)
    return out


def adalora_adapter(base, out, seed, steps, keep_pattern=True):
    """AdaLoRA as training leaves it: the budget schedule masks ranks to zeros in E and records the mask
    as the config's rank_pattern, by which peft cuts them from A/E/B on save. Without the pattern
    (`keep_pattern=False`, a checkpoint saved before any pruning was recorded) the zeros stay in E."""
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = AdaLoraConfig(init_r=6, target_r=2, tinit=0, tfinal=1, deltaT=1, total_step=3, lora_alpha=16,
                           target_modules=TARGETS)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    ids = torch.randint(3, 2000, (2, 24))
    for step in range(steps):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        peft_model.base_model.update_and_allocate(step)
        peft_model.zero_grad()
    if not keep_pattern:
        peft_model.peft_config["default"].rank_pattern = None
    peft_model.save_pretrained(out)
    return out


def peft_merged(base, adapters):
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("dora-adalora")
    return {
        "lora": random_adapter(tiny_llama, root / "lora", 30, r=4, lora_alpha=8),
        "dora": dora_adapter(tiny_llama, root / "dora", 31, r=4, lora_alpha=8),
        "dora-rslora": dora_adapter(tiny_llama, root / "dora-rs", 32, r=8, lora_alpha=4, use_rslora=True,
                                    alpha_pattern={"v_proj": 16}),
        "adalora-masked": adalora_adapter(tiny_llama, root / "ada-masked", 33, steps=2, keep_pattern=False),
        "adalora-pruned": adalora_adapter(tiny_llama, root / "ada-pruned", 34, steps=3),
    }


@pytest.mark.parametrize("chain", [["dora"], ["dora-rslora"], ["lora", "dora"], ["adalora-masked"],
                                   ["adalora-pruned"], ["adalora-pruned", "dora"]],
                         ids=lambda chain: "+".join(chain))
def test_merge_equals_peft_merge_and_unload(tiny_llama, adapters, tmp_path, chain):
    paths = [adapters[name] for name in chain]
    ours = load_file(merge_to_hf(tiny_llama, paths, tmp_path / "merged") / "model.safetensors")
    reference = peft_merged(tiny_llama, paths).state_dict()
    base = load_file(tiny_llama / "model.safetensors")
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # the oracle is not the base: every module some adapter kept a rank for changed, and only those
    adapted = {name for path in paths for adapter in [read_adapter(path)] for name in adapter.lora
               if adapter.lora_a(name).any()}
    assert {n for n in base if not torch.equal(base[n], reference[n])} == adapted and len(adapted) > 6


def test_adalora_fixtures_are_what_training_leaves(adapters):
    masked, pruned = read_adapter(adapters["adalora-masked"]), read_adapter(adapters["adalora-pruned"])
    assert masked.config["rank_pattern"] is None and pruned.config["rank_pattern"]
    zeros = sum(int((masked.tensor(key) == 0).sum()) for key in masked.singular.values())
    assert zeros > 0  # masked ranks are zeros in E, still stored
    ranks = sorted(pruned.shapes[key][0] for key in pruned.singular.values())
    assert ranks[0] == 0 and sum(ranks) < 6 * len(ranks)  # pruned ranks are cut from the files, some to none


def test_row_blocks_merge_like_whole_tensors(tiny_llama, adapters):
    """DoRA's norm is per output row, so the GGUF path's blocks of rows give the same bytes."""
    chain = [read_adapter(adapters[name]) for name in ("adalora-pruned", "dora")]
    planned = plan(tiny_llama, chain)
    whole = {item.name: tensor for item, tensor in merged_tensors(planned, chain)}
    blocks: dict[str, list[torch.Tensor]] = {}
    for item, _, rows in merged_chunks(planned, chain, max_bytes=3 * 64 * 4, whole=lambda name: False):
        blocks.setdefault(item.name, []).append(rows)
    assert len(blocks["model.layers.0.self_attn.q_proj.weight"]) > 1
    for name, tensor in whole.items():
        torch.testing.assert_close(torch.cat(blocks[name]) if tensor.dim() else blocks[name][0], tensor,
                                   rtol=0, atol=1e-6, msg=name)


def llama_cpp_logits(model_path, lora_path=None) -> tuple[np.ndarray, list[int]]:
    import llama_cpp

    kwargs = {"lora_path": str(lora_path)} if lora_path else {}
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, **kwargs)
    ids = llm.tokenize(TEXT.encode(), add_bos=True)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)]), ids


def transformers_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_gguf_f32_of_a_dora_chain_runs_like_transformers(tiny_llama, adapters, tmp_path):
    chain = [adapters["lora"], adapters["dora"]]
    ours, ids = llama_cpp_logits(export_gguf(tiny_llama, chain, tmp_path / "m.gguf", "f32"))
    merged = peft_merged(tiny_llama, chain)
    reference = transformers_logits(merged, ids)
    # peft's merge saved and exported without adapters: llama.cpp runs the same weights
    merged.save_pretrained(tmp_path / "peft-merged")
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (tmp_path / "peft-merged" / name).write_bytes((tiny_llama / name).read_bytes())
    same, _ = llama_cpp_logits(export_gguf(tmp_path / "peft-merged", [], tmp_path / "p.gguf", "f32"))
    plain = transformers_logits(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), ids)
    assert np.abs(ours - same).max() < 1e-5
    # llama.cpp and transformers differ by ~1e-3 in fp32 on these logits, the adapters by far more
    assert np.abs(ours - reference).max() < 1e-2 and (ours.argmax(-1) == reference.argmax(-1)).all()
    assert np.abs(plain - reference).max() > 0.05


def test_adalora_as_a_llama_cpp_adapter_runs_like_peft(tiny_llama, adapters, tmp_path):
    from peft import PeftModel

    adapter = adapters["adalora-pruned"]
    base_gguf = export_gguf(tiny_llama, [], tmp_path / "base.gguf", "f32")
    applied, ids = llama_cpp_logits(base_gguf, export_lora_gguf(adapter, tmp_path / "a.gguf", tiny_llama))
    plain, _ = llama_cpp_logits(base_gguf)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                           adapter)
    reference = transformers_logits(peft_model, ids)
    merged, _ = llama_cpp_logits(export_gguf(tiny_llama, [adapter], tmp_path / "merged.gguf", "f32"))
    # the same sums up to fp32 order: llama.cpp adds s·B((A⊙E)x), the merged export has W + s·B(A⊙E)
    assert np.abs(applied - merged).max() < 1e-4
    assert np.abs(applied - reference).max() < 1e-2 and (applied.argmax(-1) == reference.argmax(-1)).all()
    assert np.abs(plain - reference).max() > 0.05
