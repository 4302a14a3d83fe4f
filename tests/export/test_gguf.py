"""GGUF export, checked by an independent reader: llama.cpp itself (llama-cpp-python)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from loraforge.errors import LoraforgeError
from loraforge.export.gguf_writer import export_gguf
from loraforge.export.weights import read_adapter, tokenizer_source

from conftest import random_adapter

TEXTS = ["春天来了，公园里的花都开了。", "Hello world, this is a test.", "混合 English 和中文 2024年 GPU",
         "全角标点：，。！？：“引号”", "数字 1234567890 和  两个空格", "第一行\n第二行\n\n空行", "表情 🙂🚀 结束"]


def llama_cpp_model(path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)


def hf_logits(base, adapters, ids):
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def compare(gguf_path, base, adapters):
    llm = llama_cpp_model(gguf_path)
    # tokenizer.json as written: AutoTokenizer would force Qwen2Tokenizer on model type qwen2,
    # which rebuilds a byte-level pipeline over this fixture's SentencePiece vocabulary
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_source(base, [read_adapter(a) for a in adapters]))
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer.encode(text), text
    ids = tokenizer.encode("".join(TEXTS[:3]))
    llm.eval(ids)
    ours, reference = np.array(llm.scores[: len(ids)]), hf_logits(base, adapters, ids)
    return float((ours.argmax(-1) == reference.argmax(-1)).mean()), float(np.abs(ours - reference).max()), llm


@pytest.fixture(scope="module")
def sft_adapter(pretrained_llama, tmp_path_factory):
    return random_adapter(pretrained_llama, tmp_path_factory.mktemp("adapter") / "sft", 3, r=8, lora_alpha=16)


@pytest.mark.parametrize("quant, min_top1, max_diff", [("f32", 1.0, 1e-2), ("f16", 0.95, 0.05), ("q8_0", 0.9, 0.5)])
def test_llama_with_adapter_answers_like_transformers(pretrained_llama, sft_adapter, tmp_path, quant, min_top1, max_diff):
    out = export_gguf(pretrained_llama, [sft_adapter], tmp_path / f"m-{quant}.gguf", quant)
    top1, diff, llm = compare(out, pretrained_llama, [sft_adapter])
    assert top1 >= min_top1 and diff <= max_diff, (quant, top1, diff)
    assert llm.metadata["general.architecture"] == "llama"
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_tied"])
def test_qwen2_biases_and_tied_embeddings(request, tmp_path, fixture):
    base = request.getfixturevalue(fixture)
    out = export_gguf(base, [], tmp_path / "m.gguf", "f32")
    top1, diff, _ = compare(out, base, [])
    assert top1 == 1.0 and diff < 1e-3, (top1, diff)


def test_unsupported_quant_and_architecture_are_refused(tiny_llama, tmp_path):
    with pytest.raises(LoraforgeError, match="--quant q9_z is not a llama.cpp quantization; choose one of f32, f16"):
        export_gguf(tiny_llama, [], tmp_path / "x.gguf", "q9_z")
    assert not (tmp_path / "x.gguf").exists()


def test_export_command(pretrained_llama, sft_adapter, tmp_path):
    out = tmp_path / "cli.gguf"
    done = subprocess.run([sys.executable, "-m", "loraforge", "export", "gguf", "--base", str(pretrained_llama),
                           "--adapter", str(sft_adapter), "--quant", "q8_0", "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_exported_model_answers_like_the_trained_one(learned_run, tmp_path, quant):
    from loraforge.data.dataset import load_reports, resolve_specs
    from loraforge.infer.hf import exact_matches, load_model, template_of
    from loraforge.infer.llamacpp import greedy_answer_gguf, load_gguf

    config, result = learned_run
    out = export_gguf(config.model.path, [result.output_dir], tmp_path / f"{quant}.gguf", quant)
    records = [r for rep in load_reports(config, resolve_specs(config)) for r in rep.records][:6]
    model, tokenizer = load_model(result.output_dir)
    trained = exact_matches(model, tokenizer, template_of(result.output_dir), records)
    llm = load_gguf(out)
    exported = [greedy_answer_gguf(llm, template_of(result.output_dir), question) for question, _, _ in trained]
    assert [got.strip() for _, _, got in trained] == [a.strip() for a in exported]
    assert llm.metadata["tokenizer.chat_template"].startswith("{#- loraforge chat template 'chinese-alpaca'")


def test_row_blocks_give_the_same_file_as_whole_tensors(tiny_llama, tmp_path, monkeypatch):
    """Big tensors are merged and quantized in row blocks; the bytes must not depend on it."""
    import loraforge.export.gguf_writer as writer

    pt = random_adapter(tiny_llama, tmp_path / "pt", 7, r=4, modules_to_save=["embed_tokens", "lm_head"])
    sft = random_adapter(tiny_llama, tmp_path / "sft", 8, r=8, lora_alpha=16)
    whole = export_gguf(tiny_llama, [pt, sft], tmp_path / "whole.gguf", "q8_0").read_bytes()
    monkeypatch.setattr(writer, "CHUNK_BYTES", 3 * 64 * 4 + 5)  # 3 rows of 64 values per block
    blocks = export_gguf(tiny_llama, [pt, sft], tmp_path / "blocks.gguf", "q8_0").read_bytes()
    assert blocks == whole
