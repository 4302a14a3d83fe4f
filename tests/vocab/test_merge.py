"""`vocab merge`: new pieces appended, base ids unchanged, three tokenizer files that agree."""

from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from transformers import AutoTokenizer

from loraforge.cli import main
from loraforge.errors import LoraforgeError
from loraforge.tokenizer import load_tokenizer
from loraforge.vocab.merge import merge_vocab
from loraforge.vocab.spm import id_mismatches

from conftest import DATA_DIR


def _proto(path):
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


@pytest.mark.parametrize("scheme", ["chinese-llama", "ranked"])
def test_pieces_appended_in_order_without_duplicates(small_base_tokenizer, zh_model, scheme, tmp_path):
    out = merge_vocab(small_base_tokenizer, zh_model, tmp_path / "tok", scheme=scheme).out_dir
    base, add = _proto(small_base_tokenizer / "tokenizer.model"), _proto(zh_model)
    merged = _proto(out / "tokenizer.model")
    n = len(base.pieces)
    assert [(p.piece, p.type, p.score) for p in merged.pieces[:n]] == [(p.piece, p.type, p.score) for p in base.pieces]
    base_set = {p.piece for p in base.pieces}
    expected_new = [p.piece for p in add.pieces if p.type == 1 and p.piece not in base_set]
    assert [p.piece for p in merged.pieces[n:]] == expected_new
    assert len({p.piece for p in merged.pieces}) == len(merged.pieces)
    scores = [p.score for p in merged.pieces[n:]]
    if scheme == "chinese-llama":
        assert set(scores) == {0.0}  # Chinese-LLaMA's merge_tokenizers.py
    else:  # strictly decreasing below the base: a piece's id is its merge rank in all three tokenizers
        assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
        assert max(scores) < min(p.score for p in base.pieces if p.type == 1)
    assert merged.normalizer_spec == base.normalizer_spec


@pytest.mark.parametrize("scheme", ["chinese-llama", "ranked"])
def test_tokenizer_files_agree_with_sentencepiece(small_base_tokenizer, zh_model, scheme, tmp_path):
    out = merge_vocab(small_base_tokenizer, zh_model, tmp_path / "tok", scheme=scheme).out_dir
    ours = load_tokenizer(out)  # what loraforge trains with: sentencepiece's ids, whatever the scheme
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert len(ours) == sp.get_piece_size()
    held_out = (DATA_DIR / "zh_heldout.txt").read_text(encoding="utf-8").splitlines()
    assert id_mismatches(out / "tokenizer.model", ours, held_out) == []
    plain = AutoTokenizer.from_pretrained(out)  # what plain transformers users get: exact when ranked
    mismatched = len(id_mismatches(out / "tokenizer.model", plain, held_out))
    assert mismatched == 0 if scheme == "ranked" else mismatched < len(held_out) / 2
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"], config["pad_token"]) == \
        ("<s>", "</s>", "<unk>", None)
    assert ours("你好").input_ids[0] == plain("你好").input_ids[0] == 1  # BOS still added


def test_pad_token_goes_after_the_pieces(small_base_tokenizer, zh_model, tmp_path, capsys):
    out = tmp_path / "with_pad"
    assert main(["vocab", "merge", "--base", str(small_base_tokenizer), "--add", str(zh_model), "--pad-token", "[PAD]",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    pieces = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).get_piece_size()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == pieces + 1 and tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == pieces
    assert f"pad token '[PAD]' (id {pieces})" in printed and f"({pieces + 1} tokens)" in printed
    assert tokenizer.encode("甲[PAD]乙", add_special_tokens=False).count(pieces) == 1


def test_chat_template_of_the_base_is_kept(small_base_tokenizer, zh_model, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(small_base_tokenizer, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    merge_vocab(base, zh_model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == \
        "{{ messages[0]['content'] }}"


def test_refusals(small_base_tokenizer, zh_model, bpe_tokenizers, tmp_path):
    with pytest.raises(LoraforgeError, match="byte-level BPE tokenizer .* SentencePiece pieces cannot be appended"):
        merge_vocab(bpe_tokenizers["llama3"], zh_model, tmp_path / "a")
    with_pad = tmp_path / "padded_base"
    merge_vocab(small_base_tokenizer, zh_model, with_pad, pad_token="[PAD]")
    with pytest.raises(LoraforgeError, match=r"adds 1 token\(s\) after the .* SentencePiece pieces: '\[PAD\]'"):
        merge_vocab(with_pad, zh_model, tmp_path / "b")
    with pytest.raises(LoraforgeError, match="already in .* nothing to add"):
        merge_vocab(small_base_tokenizer, small_base_tokenizer / "tokenizer.model", tmp_path / "c")
    with pytest.raises(LoraforgeError, match="exists and is not empty"):
        merge_vocab(small_base_tokenizer, zh_model, with_pad)
    with pytest.raises(LoraforgeError, match="no tokenizer.model"):
        merge_vocab(tmp_path, zh_model, tmp_path / "d")
    unigram = tmp_path / "uni.model"
    from loraforge.vocab.train import train_vocab

    train_vocab([DATA_DIR / "zh_corpus.txt"], unigram, 2600, "unigram")
    with pytest.raises(LoraforgeError, match="bpe model but the base .* is unigram.*--model-type unigram"):
        merge_vocab(unigram, small_base_tokenizer / "tokenizer.model", tmp_path / "e")
    with pytest.raises(LoraforgeError, match="--scheme rank: choose one of chinese-llama, ranked"):
        merge_vocab(small_base_tokenizer, zh_model, tmp_path / "f", scheme="rank")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["padded_base", "uni.model", "uni.vocab"]


def test_unigram_base_and_unigram_addition(tmp_path):
    from loraforge.vocab.spm import save_hf_tokenizer, train_spm
    from loraforge.vocab.train import train_vocab

    part = tmp_path / "part.txt"
    part.write_text("\n".join((DATA_DIR / "zh_corpus.txt").read_text(encoding="utf-8").splitlines()[:60]),
                    encoding="utf-8")
    base = tmp_path / "base"
    save_hf_tokenizer(train_spm([part], tmp_path / "spm" / "u", 1200, model_type="unigram",
                                character_coverage=0.98), base)
    add = train_vocab([DATA_DIR / "zh_corpus.txt"], tmp_path / "zh.model", 2600, "unigram").model_file
    out = merge_vocab(base, add, tmp_path / "out")  # checks tokenizer.json against sentencepiece itself
    assert out.added > 500
    merged, added = _proto(tmp_path / "out" / "tokenizer.model"), _proto(add)
    scores = {p.piece: p.score for p in added.pieces}
    assert all(p.score == scores[p.piece] for p in merged.pieces[1200:])  # unigram keeps its log-probabilities
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    held_out = (DATA_DIR / "zh_heldout.txt").read_text(encoding="utf-8").splitlines()
    assert id_mismatches(tmp_path / "out" / "tokenizer.model", tokenizer, held_out) == []
