"""`export lora-gguf`: llama.cpp applying our adapter GGUF answers like the merged model and like peft."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from loraforge.errors import LoraforgeError
from loraforge.export.arch import permute_qk
from loraforge.export.gguf_writer import export_gguf
from loraforge.export.lora_gguf import export_lora_gguf

from conftest import random_adapter

TEXT = "春天来了，公园里的花都开了。Hello world, 混合 English 2024年"


def llama_cpp_logits(model_path, lora_path=None) -> tuple[np.ndarray, list[int]]:
    import llama_cpp

    kwargs = {"lora_path": str(lora_path)} if lora_path else {}
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, **kwargs)
    ids = llm.tokenize(TEXT.encode(), add_bos=True)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)]), ids


def peft_logits(base, adapter, ids) -> np.ndarray:
    """The adapter as peft runs it, unmerged: the reference for every per-module scale."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory):
    """The base exported F32 without adapters, once per base model."""
    made = {}

    def get(base):
        if base not in made:
            made[base] = export_gguf(base, [], tmp_path_factory.mktemp("base") / "base.gguf", "f32")
        return made[base]

    return get


@pytest.mark.parametrize("fixture, lora", [
    ("pretrained_llama", {"r": 8, "lora_alpha": 16}),
    ("pretrained_llama", {"r": 8, "lora_alpha": 16, "use_rslora": True}),
    ("pretrained_llama", {"r": 4, "lora_alpha": 8, "alpha_pattern": {"k_proj": 32}, "rank_pattern": {"o_proj": 2}}),
    ("tiny_qwen2", {"r": 4, "lora_alpha": 8}),
    ("tiny_qwen2", {"r": 8, "lora_alpha": 4, "use_rslora": True, "alpha_pattern": {"v_proj": 16}}),
], ids=["llama", "llama-rslora", "llama-patterns", "qwen2", "qwen2-rslora-pattern"])
def test_llama_cpp_applying_the_adapter_answers_like_the_merged_model_and_peft(request, base_gguf, tmp_path,
                                                                               fixture, lora):
    base = request.getfixturevalue(fixture)
    config = json.loads((base / "config.json").read_text())
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA: k is permuted with n_head_kv
    adapter = random_adapter(base, tmp_path / "adapter", 11, **lora)  # q, k, v, o and down_proj

    applied, ids = llama_cpp_logits(base_gguf(base), export_lora_gguf(adapter, tmp_path / "a.gguf", base))
    merged, _ = llama_cpp_logits(export_gguf(base, [adapter], tmp_path / "merged.gguf", "f32"))
    plain, _ = llama_cpp_logits(base_gguf(base))
    reference = peft_logits(base, adapter, ids)

    # the same sums up to fp32 order: llama.cpp adds s·B(Ax), the merged export has W + s·BA (the
    # order differs between llama.cpp's AVX2 and AVX-512 kernels: up to 1.5e-3 seen with alpha_pattern's
    # 8× scale on k_proj, on logits of about ±4)
    assert np.abs(applied - merged).max() < 3e-3 and np.abs(applied - merged).mean() < 1e-4
    # llama.cpp and transformers differ by ~5e-3 on the base alone, so top-1 is compared where it is decisive
    top2 = np.sort(reference, -1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > 0.02
    assert decisive.mean() > 0.5 and (applied.argmax(-1) == reference.argmax(-1))[decisive].all()
    assert np.abs(applied - reference).max() < 0.03
    assert np.abs(plain - reference).max() > 0.05  # the adapter really changes the answer


def test_metadata_and_tensors(pretrained_llama, tmp_path):
    adapter = random_adapter(pretrained_llama, tmp_path / "adapter", 13, r=4, lora_alpha=12,
                             alpha_pattern={"v_proj": 24})
    reader = gguf.GGUFReader(export_lora_gguf(adapter, tmp_path / "a.gguf", pretrained_llama))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert (field("general.type"), field("adapter.type"), field("general.architecture")) == ("adapter", "lora", "llama")
    assert field("adapter.lora.alpha") == 12.0
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]  # llama.cpp reads it as f32

    tensors = {t.name: t for t in reader.tensors}
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    assert len(tensors) == 2 * 2 * 5  # 2 layers × 5 target modules × (A, B)
    assert [int(n) for n in tensors["blk.0.attn_q.weight.lora_a"].shape] == [64, 4]  # ggml order: columns first
    assert [int(n) for n in tensors["blk.0.attn_k.weight.lora_b"].shape] == [4, 32]  # GQA: 2 kv heads × 16
    assert [int(n) for n in tensors["blk.1.ffn_down.weight.lora_a"].shape] == [128, 4]

    from safetensors.torch import load_file

    peft = {k.removeprefix("base_model.model."): v for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    data = lambda name: torch.from_numpy(np.array(tensors[name].data))  # noqa: E731
    k_proj = "model.layers.0.self_attn.k_proj"
    # A as peft stored it; q/k rows permuted on B only; a module with its own alpha scaled in B
    assert torch.equal(data("blk.0.attn_k.weight.lora_a"), peft[f"{k_proj}.lora_A.weight"])
    assert torch.equal(data("blk.0.attn_k.weight.lora_b"), permute_qk(peft[f"{k_proj}.lora_B.weight"], 2))
    assert torch.equal(data("blk.0.attn_q.weight.lora_b"),
                       permute_qk(peft["model.layers.0.self_attn.q_proj.lora_B.weight"], 4))
    assert torch.allclose(data("blk.1.attn_v.weight.lora_b"), 2 * peft["model.layers.1.self_attn.v_proj.lora_B.weight"])


def test_base_comes_from_the_adapter_config(pretrained_llama, tmp_path):
    adapter = random_adapter(pretrained_llama, tmp_path / "adapter", 14, r=4)  # peft records the local base path
    named = export_lora_gguf(adapter, tmp_path / "named.gguf", pretrained_llama)
    recorded = export_lora_gguf(adapter, tmp_path / "recorded.gguf")
    assert named.read_bytes() == recorded.read_bytes()


def _peft_adapter(base, out, **lora):
    """A fresh peft adapter for configurations `random_adapter` cannot make (its own target modules)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, **lora)).save_pretrained(out)
    return out


def _edit_config(adapter, **changes):
    config_file = adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))
    return adapter


@pytest.mark.parametrize("make, message", [
    (lambda base, out: random_adapter(base, out, 15, r=4, modules_to_save=["embed_tokens", "lm_head"]),
     r"carries whole tensors \(lm_head.weight, model.embed_tokens.weight: modules_to_save.*"
     r"`loraforge export gguf --base .* --adapter"),
    (lambda base, out: _peft_adapter(base, out, target_modules=["q_proj", "embed_tokens"]),
     r"LoRA on an embedding \(model.embed_tokens.lora_embedding_A"),
    (lambda base, out: random_adapter(base, out, 15, r=4, lora_bias=True), r"trains LoRA biases"),
    (lambda base, out: random_adapter(base, out, 15, r=4, use_dora=True),
     r"DoRA adapter \(use_dora=true\): llama.cpp's GGUF adapters are plain LoRA"),
    (lambda base, out: _edit_config(random_adapter(base, out, 15, r=4), peft_type="IA3"), r"a IA3 adapter"),
], ids=["modules_to_save", "embedding-lora", "lora-bias", "dora", "not-lora"])
def test_what_llama_cpp_cannot_load_is_refused_and_nothing_written(pretrained_llama, tmp_path, make, message):
    adapter = make(pretrained_llama, tmp_path / "adapter")
    with pytest.raises(LoraforgeError, match=message):
        export_lora_gguf(adapter, tmp_path / "a.gguf", pretrained_llama)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no output, no temporary


def test_a_base_that_is_not_local_asks_for_base(pretrained_llama, tmp_path):
    adapter = _edit_config(random_adapter(pretrained_llama, tmp_path / "adapter", 16, r=4),
                           base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    with pytest.raises(LoraforgeError, match=r"meta-llama/Llama-2-7b-hf is not a local model directory — pass --base"):
        export_lora_gguf(adapter, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_cli(pretrained_llama, tmp_path):
    adapter = random_adapter(pretrained_llama, tmp_path / "adapter", 17, r=4)
    with_embeddings = random_adapter(pretrained_llama, tmp_path / "embed", 18, r=4, modules_to_save=["lm_head"])
    run = lambda *args: subprocess.run([sys.executable, "-m", "loraforge", "export", "lora-gguf", *args],  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    done = run("--adapter", str(adapter), "--base", str(pretrained_llama), "-o", str(tmp_path / "a.gguf"))
    assert done.returncode == 0, done.stderr
    assert "llama.cpp LoRA adapter" in done.stdout and (tmp_path / "a.gguf").exists()
    wrong = run("--adapter", str(with_embeddings), "--base", str(pretrained_llama), "-o", str(tmp_path / "b.gguf"))
    assert wrong.returncode == 2 and "error: " in wrong.stderr and "export gguf" in wrong.stderr, wrong.stderr
    assert "Traceback" not in wrong.stderr and not (tmp_path / "b.gguf").exists()


@pytest.mark.parametrize("pattern", [{"model.layers.0.self_attn.k_proj": 32, "k_proj": 2},
                                     {r"layers\.1\..*_proj": 40}])
def test_alpha_patterns_follow_peft_first_regex_match(pretrained_llama, tmp_path, pattern):
    """peft takes the first alpha_pattern key that matches the module name's end as a regex."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraforge.export.weights import read_adapter

    adapter_dir = random_adapter(pretrained_llama, tmp_path / "adapter", 18, r=4, lora_alpha=8, alpha_pattern=pattern)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained_llama, dtype=torch.float32),
                                      adapter_dir)
    adapter = read_adapter(adapter_dir)
    for name, module in model.named_modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict) and "default" in module.scaling:
            weight = name.removeprefix("base_model.model.") + ".weight"
            assert adapter.scale(weight, 4) == pytest.approx(module.scaling["default"]), name
