"""A tiny model on Meta's real 32,000-piece LLaMA-2 vocabulary through train → export --verify → both
engines: the ids training used are the ids llama.cpp sees, and greedy answers are the same tokens."""

from __future__ import annotations

import shutil

import pytest

from loraforge.eval.parity import ParityFailed, verify_export
from loraforge.export.gguf_writer import export_gguf
from loraforge.infer.engine import GenerationConfig, open_engine
from loraforge.tokenizer import is_sentencepiece, load_tokenizer

from conftest import sft_config

QUESTIONS = ["请用一句话介绍一下长城。", "def f(x):\n    return x  # 解释这段代码", "| a |  b |\n|---|---|"]


@pytest.fixture(scope="module")
def llama2_run(real_tokenizers, tmp_path_factory):
    from loraforge.tiny import TinyShape, build_tiny_model
    from loraforge.train.run import train

    base = build_tiny_model(real_tokenizers["llama2"], tmp_path_factory.mktemp("llama2-64"), TinyShape(hidden=64))
    out = tmp_path_factory.mktemp("runs") / "sft"
    result = train(sft_config(base, out, "train.max_steps=6", "lora.r=8", "train.lr=1e-3"))
    return base, result.output_dir


@pytest.mark.slow
def test_llama2_vocabulary_train_export_verify_and_both_engines(llama2_run, tmp_path):
    base, run = llama2_run
    assert is_sentencepiece(load_tokenizer(run)) and len(load_tokenizer(run)) == 32000
    gguf = export_gguf(base, [run], tmp_path / "sft-f32.gguf", "f32")
    report = verify_export(gguf, base, [run], tmp_path / "parity.json")
    assert report["verdict"] == "PASS"
    rows = report["tokenization"]
    assert all(r["match"] for r in rows) and sum(r["text"].startswith("### Instruction") or "Instruction" in r["text"]
                                                 for r in rows) >= 3  # every chat-template rendering compared
    hf, cpp = open_engine(str(run), engine="hf"), open_engine(str(gguf), n_ctx=512)
    try:
        greedy = GenerationConfig(temperature=0, max_new_tokens=16)
        for question in QUESTIONS:
            messages = [{"role": "user", "content": question}]
            assert hf.tokenize(hf.render(messages)) == cpp.tokenize(cpp.render(messages))
            assert hf.complete(messages, greedy).token_ids == cpp.complete(messages, greedy).token_ids, question
    finally:
        hf.close()
        cpp.close()


@pytest.mark.slow
def test_verify_fails_on_a_tokenizer_llama_cpp_cuts_otherwise(real_tokenizer_models, tmp_path):
    """transformers 5's own LlamaTokenizer pipeline, saved without tokenizer.model, prepends no `▁` to a text
    that starts with a space; llama.cpp (and sentencepiece) do. --verify must say so, naming the text."""
    from transformers import LlamaTokenizer

    base = tmp_path / "base"
    shutil.copytree(real_tokenizer_models["llama2"], base)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (base / name).unlink()
    LlamaTokenizer.from_pretrained(real_tokenizer_models["llama2"]).save_pretrained(base)
    (base / "tokenizer.model").unlink(missing_ok=True)
    gguf = export_gguf(base, [], tmp_path / "b.gguf", "f32")
    with pytest.raises(ParityFailed, match=r"strings tokenize differently \(first: '  leading spaces") as failed:
        verify_export(gguf, base, [], tmp_path / "parity.json")
    first = next(r for r in failed.value.report["tokenization"] if not r["match"])
    assert first["first_difference"] == 1 and first["gguf"] != first["hf"]  # right after BOS
