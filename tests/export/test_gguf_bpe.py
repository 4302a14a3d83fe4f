"""Byte-level BPE (Llama-3, Qwen2) tokenizers in GGUF: llama.cpp must cut text into the ids
transformers does, and the exported model must answer like the HF one."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from loraforge.errors import LoraforgeError
from loraforge.export.gguf_writer import export_gguf
from loraforge.export.vocab_meta import BPE_PRE_TOKENIZERS
from loraforge.tiny import TinyShape, build_tiny_model

QWEN2_SPLIT, LLAMA3_SPLIT = (next(r for r, name in BPE_PRE_TOKENIZERS.items() if name == n) for n in ("qwen2", "llama-bpe"))

LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}<|start_header_id|>assistant<|end_header_id|>\n\n")
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "<|im_start|>assistant\n")
USER_TOKEN = "智能体"
CHAT = {
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\n你好，世界！<|eot_id|><|start_header_id|>assistant"
              "<|end_header_id|>\n\n",
    "qwen2": "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n你好？<|im_end|>\n<|im_start|>assistant\n",
}
TEXTS = ["春天来了，公园里的花都开了。", "Hello world, this is a test. It's John's book, I'll see.",
         "混合 English 和中文 2024年 GPU", "全角标点：，。！？：“引号”‘单引号’", "数字 1234567890 和 3.14159 与 007",
         "电话 13800138000，价格 ¥1,299.00", "两个  空格   三个\t制表", "第一行\n第二行\n\n空行\r\n结束 \n ",
         "表情 🙂🚀 结束👍🏽", "智能体 agent，智能体。", "  leading and trailing  ", "A1B22C333D4444"]


def bpe_model(source, tmp_path, style, split=None):
    """A tiny model on a copy of the fixture tokenizer, with its chat template and (optionally)
    another split regex — tokenizer.json's vocabulary and merges work with any split.

    The Chinese corpus has almost no numbers, so two-digit merges are added: without them
    Llama-3's digit runs and Qwen2's single digits cut text the same and a wrong
    `tokenizer.ggml.pre` would go unnoticed."""
    tok_dir = tmp_path / "tok"
    shutil.copytree(source, tok_dir)
    spec = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    for pair in (f"{a}{b}" for a in "0123456789" for b in "0123456789"):
        if pair not in vocab:
            vocab[pair] = len(vocab)
            merges.append([pair[0], pair[1]])
    # a non-special added token: llama.cpp must match it as raw text (user-defined type)
    spec["added_tokens"].append({"id": len(vocab), "content": USER_TOKEN, "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": False})
    if split is not None:
        spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = split
    (tok_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = LLAMA3_TEMPLATE if style == "llama3" else CHATML_TEMPLATE
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    arch = "llama" if style == "llama3" else "qwen2"
    return build_tiny_model(tok_dir, tmp_path / "model", TinyShape(arch=arch))


@pytest.mark.parametrize("style, split, pre, add_bos", [
    ("llama3", None, "llama-bpe", True),
    ("qwen2", QWEN2_SPLIT, "qwen2", False),
])
def test_bpe_tokenizer_and_logits_match_transformers(bpe_tokenizers, tmp_path, style, split, pre, add_bos):
    import llama_cpp

    base = bpe_model(bpe_tokenizers[style], tmp_path, style, split)
    out = export_gguf(base, [], tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)

    assert llm.metadata["tokenizer.ggml.model"] == "gpt2"
    assert llm.metadata["tokenizer.ggml.pre"] == pre
    assert llm.metadata["tokenizer.ggml.add_bos_token"] == str(add_bos).lower()
    assert llm.metadata["tokenizer.chat_template"] == (LLAMA3_TEMPLATE if style == "llama3" else CHATML_TEMPLATE)
    assert llm.n_vocab() == AutoModelForCausalLM.from_pretrained(base).config.vocab_size
    for text in [*TEXTS, CHAT[style]]:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer.encode(text), text
    chat_ids = tokenizer.encode(CHAT[style])
    assert llm.token_eos() == tokenizer.eos_token_id
    assert (chat_ids[0] == tokenizer.bos_token_id) == add_bos
    assert llm.detokenize(tokenizer.encode(TEXTS[3], add_special_tokens=False)).decode() == TEXTS[3]

    reader = gguf.GGUFReader(out)
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert types[tokenizer.convert_tokens_to_ids(USER_TOKEN)] == gguf.TokenType.USER_DEFINED
    assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert len(tokens) == len(types) == len(tokenizer)  # build_tiny_model sizes the embedding to the tokenizer

    ids = tokenizer.encode("".join(TEXTS[:4]))
    llm.eval(ids)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    ours = np.array(llm.scores[: len(ids)])
    assert (ours.argmax(-1) == reference.numpy().argmax(-1)).all()


@pytest.mark.parametrize("split", [
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",  # GPT-2's
    LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}{1,4}"),
])
def test_unknown_pre_tokenizer_is_refused(bpe_tokenizers, tmp_path, split):
    base = bpe_model(bpe_tokenizers["llama3"], tmp_path, "llama3", split)
    with pytest.raises(LoraforgeError, match=r"pre-tokenizer .* is not one llama.cpp reimplements") as error:
        export_gguf(base, [], tmp_path / "x.gguf", "f32")
    assert repr(split) in str(error.value) and "llama-bpe" in str(error.value) and "qwen2" in str(error.value)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial*"))


def test_embedding_rows_past_the_tokenizer_become_unused_pads(bpe_tokenizers, tmp_path):
    from loraforge.export.vocab_meta import add_tokenizer

    base = bpe_model(bpe_tokenizers["qwen2"], tmp_path, "qwen2", QWEN2_SPLIT)
    n = len(PreTrainedTokenizerFast.from_pretrained(base))
    writer = gguf.GGUFWriter(tmp_path / "vocab.gguf", "qwen2")
    add_tokenizer(writer, base, n + 3)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    fields = gguf.GGUFReader(tmp_path / "vocab.gguf").fields
    assert fields["tokenizer.ggml.tokens"].contents()[n:] == [f"[PAD{i}]" for i in range(n, n + 3)]
    assert fields["tokenizer.ggml.token_type"].contents()[n:] == [gguf.TokenType.UNUSED] * 3
    with pytest.raises(LoraforgeError, match=f"has {n} tokens but the embedding has {n - 1} rows"):
        add_tokenizer(gguf.GGUFWriter(tmp_path / "small.gguf", "qwen2"), base, n - 1)
