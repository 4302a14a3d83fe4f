"""`vocab train`: a SentencePiece model whose settings survive llama.cpp."""

from __future__ import annotations

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from loraforge.cli import main
from loraforge.errors import LoraforgeError
from loraforge.vocab.train import train_vocab

from conftest import CORPUS

ZH_PIECES = 3000  # tests/vocab/conftest.py


def test_trained_model_has_llama_cpp_safe_settings(zh_model):
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(zh_model.read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    assert len(proto.pieces) == ZH_PIECES
    assert (norm.name, norm.remove_extra_whitespaces, norm.precompiled_charsmap) == ("identity", False, b"")
    assert spec.byte_fallback and spec.split_digits
    assert spec.character_coverage == pytest.approx(0.9995)
    assert spec.model_type == sp_pb2.TrainerSpec.BPE
    assert [proto.pieces[i].piece for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    assert zh_model.with_suffix(".vocab").read_text(encoding="utf-8").count("\n") == ZH_PIECES


def test_full_width_punctuation_spaces_and_digits_survive(zh_model):
    sp = spm.SentencePieceProcessor(model_file=str(zh_model))
    text = "全角，标点：“引号”  两个空格 123"
    pieces = sp.encode(text, out_type=str)
    assert "，" in "".join(pieces) and "," not in "".join(pieces)  # nmt_nfkc would make it ','
    assert sp.decode(sp.encode(text)) == text  # both spaces kept
    assert {"1", "2", "3"} <= set(pieces)  # digits split one by one
    assert sp.encode("龘", out_type=str) in (["▁", "<0xE9>", "<0xBE>", "<0x98>"], ["▁龘"], ["▁", "龘"])


def test_command_reports_corpus_and_time(tmp_path, capsys):
    out = tmp_path / "zh.model"
    assert main(["vocab", "train", "--corpus", str(CORPUS), "--vocab-size", "2600", "--model-type", "unigram",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2600-piece unigram" in printed and "460 lines" in printed and " s: " in printed
    assert "note: llama.cpp cuts text with score-ordered merges" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zh.model", "zh.vocab"]
    assert spm.SentencePieceProcessor(model_file=str(out)).get_piece_size() == 2600


def test_bad_input_is_refused_and_nothing_written(tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("好\n".encode() + "caf\xe9\n".encode("latin-1"))
    cases = [([tmp_path / "missing.txt"], "zh.model", "no such file"), ([latin1], "zh.model", "latin1.txt:2: not UTF-8 text"),
             ([CORPUS], "zh.txt", "ends in .model")]
    for corpus, name, message in cases:
        with pytest.raises(LoraforgeError, match=message):
            train_vocab(corpus, tmp_path / "out" / name, 500)
    assert main(["vocab", "train", "--corpus", str(CORPUS), "--vocab-size", "100", "-o", str(tmp_path / "a.model")]) == 2
    assert "error: --vocab-size 100: too small" in capsys.readouterr().err
    with pytest.raises(LoraforgeError, match=r"--vocab-size 800 is smaller than the \d+ characters .* choose --vocab-size >"):
        train_vocab([CORPUS], tmp_path / "out" / "zh.model", 800)
    with pytest.raises(LoraforgeError, match="--max-sentences 50: sentencepiece samples more than 100 lines"):
        train_vocab([CORPUS], tmp_path / "out" / "zh.model", 3000, max_sentences=50)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_big_corpus_can_be_sampled(tmp_path):
    result = train_vocab([CORPUS], tmp_path / "zh.model", 2600, max_sentences=200)
    assert (result.lines, result.sampled) == (460, 200) and "460 lines, 200 of them sampled" in result.describe()
