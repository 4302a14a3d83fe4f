"""`export lora-gguf`: llama.cpp applying our adapter GGUF computes what the merged model computes."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest

from loraforge.errors import LoraforgeError
from loraforge.export.gguf_writer import export_gguf
from loraforge.export.lora_gguf import export_lora_gguf

from conftest import random_adapter

TEXT = "春天来了，公园里的花都开了。Hello world, 混合 English 2024年"


def logits(model_path, lora_path=None):
    import llama_cpp

    kwargs = {"lora_path": str(lora_path)} if lora_path else {}
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, **kwargs)
    ids = llm.tokenize(TEXT.encode(), add_bos=True)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.fixture(scope="module")
def base_gguf(pretrained_llama, tmp_path_factory):
    return export_gguf(pretrained_llama, [], tmp_path_factory.mktemp("base") / "base.gguf", "f32")


@pytest.mark.parametrize("lora", [
    {"r": 8, "lora_alpha": 16},
    {"r": 8, "lora_alpha": 16, "use_rslora": True},
    {"r": 4, "lora_alpha": 8, "alpha_pattern": {"k_proj": 32}, "rank_pattern": {"o_proj": 2}},
], ids=["plain", "rslora", "patterns"])
def test_adapter_applied_by_llama_cpp_equals_the_merged_export(pretrained_llama, base_gguf, tmp_path, lora):
    adapter = random_adapter(pretrained_llama, tmp_path / "adapter", 11, **lora)
    merged = logits(export_gguf(pretrained_llama, [adapter], tmp_path / "merged.gguf", "f32"))
    applied = logits(base_gguf, export_lora_gguf(adapter, tmp_path / "a.gguf", pretrained_llama))
    plain = logits(base_gguf)
    # same logits up to fp32 summation order (llama.cpp adds B(Ax), the merge adds BA to W)
    assert np.abs(applied - merged).max() < 5e-3 and (applied.argmax(-1) == merged.argmax(-1)).all()
    assert np.abs(plain - merged).max() > 0.05  # the adapter really changes the answer


def test_qwen2_adapter(tiny_qwen2, tmp_path):
    adapter = random_adapter(tiny_qwen2, tmp_path / "adapter", 12, r=4, lora_alpha=8)
    merged = logits(export_gguf(tiny_qwen2, [adapter], tmp_path / "merged.gguf", "f32"))
    base = export_gguf(tiny_qwen2, [], tmp_path / "base.gguf", "f32")
    applied = logits(base, export_lora_gguf(adapter, tmp_path / "a.gguf", tiny_qwen2))
    assert np.abs(applied - merged).max() < 5e-3


def test_metadata_and_tensor_names(pretrained_llama, tmp_path):
    adapter = random_adapter(pretrained_llama, tmp_path / "adapter", 13, r=4, lora_alpha=12)
    reader = gguf.GGUFReader(export_lora_gguf(adapter, tmp_path / "a.gguf", pretrained_llama))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert (field("general.type"), field("adapter.type"), field("general.architecture")) == ("adapter", "lora", "llama")
    assert field("adapter.lora.alpha") == 12.0
    shapes = {t.name: list(t.shape) for t in reader.tensors}  # ggml order: columns first
    assert shapes["blk.0.attn_q.weight.lora_a"] == [64, 4] and shapes["blk.0.attn_q.weight.lora_b"] == [4, 64]
    assert shapes["blk.1.ffn_down.weight.lora_a"] == [128, 4]


def test_base_comes_from_the_adapter_config(pretrained_llama, tmp_path):
    adapter = random_adapter(pretrained_llama, tmp_path / "adapter", 14, r=4)
    assert export_lora_gguf(adapter, tmp_path / "a.gguf").exists()  # peft recorded the local base path


def test_full_embedding_tensors_are_refused_and_nothing_written(pretrained_llama, tmp_path):
    adapter = random_adapter(pretrained_llama, tmp_path / "adapter", 15, r=4, modules_to_save=["embed_tokens", "lm_head"])
    with pytest.raises(LoraforgeError, match=r"carries whole tensors \(lm_head.weight, model.embed_tokens.weight: "
                                             r"modules_to_save.*loraforge export gguf --base BASE --adapter"):
        export_lora_gguf(adapter, tmp_path / "a.gguf", pretrained_llama)
    assert list(tmp_path.glob("*.gguf")) == list(tmp_path.glob(".*partial*")) == []


def test_cli(pretrained_llama, tmp_path):
    adapter = random_adapter(pretrained_llama, tmp_path / "adapter", 16, r=4)
    with_embeddings = random_adapter(pretrained_llama, tmp_path / "embed", 17, r=4, modules_to_save=["lm_head"])
    run = lambda *args: subprocess.run([sys.executable, "-m", "loraforge", "export", "lora-gguf", *args],  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    done = run("--adapter", str(adapter), "--base", str(pretrained_llama), "-o", str(tmp_path / "a.gguf"))
    assert done.returncode == 0, done.stderr
    wrong = run("--adapter", str(with_embeddings), "--base", str(pretrained_llama), "-o", str(tmp_path / "b.gguf"))
    assert wrong.returncode == 2 and "error: " in wrong.stderr and "export gguf" in wrong.stderr, wrong.stderr
    assert not (tmp_path / "b.gguf").exists()
