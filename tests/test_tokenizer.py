"""The HF tokenizer we write cuts text exactly like sentencepiece (the ground truth)."""

from __future__ import annotations

from transformers import AutoTokenizer

from loraforge.vocab.spm import id_mismatches, load_proto

from conftest import CORPUS

TRICKY = [
    "你好，世界！", "“引号”与（括号）：；、。？", "  两个空格开头", "结尾两个空格  ", " ", "",
    "a\nb\n\nc", "mixed 中文 English 123 数字 2024年", "emoji 🙂🚀", "罕见字：龘 饕餮 耄耋",
    "tab\tseparated", "Python 3.11 的 GPU 加速",
]


def test_hf_ids_equal_sentencepiece_on_corpus_and_tricky_strings(spm_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(spm_tokenizer)
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    assert id_mismatches(spm_tokenizer / "tokenizer.model", tokenizer, lines + TRICKY) == []


def test_decode_round_trips_spaces_and_bytes(spm_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(spm_tokenizer)
    for text in TRICKY:
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


def test_trained_with_llama_cpp_safe_settings(spm_tokenizer):
    proto = load_proto(spm_tokenizer / "tokenizer.model")
    assert proto.normalizer_spec.name == "identity"
    assert proto.normalizer_spec.remove_extra_whitespaces is False
    assert proto.trainer_spec.byte_fallback is True


def test_special_tokens_in_text_are_single_ids(spm_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(spm_tokenizer)
    ids = tokenizer.encode("答</s>", add_special_tokens=False)
    assert ids[-1] == tokenizer.eos_token_id
