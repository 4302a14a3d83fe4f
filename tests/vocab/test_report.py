"""`vocab report`: tokens per Chinese character and per English word, before and after."""

from __future__ import annotations

import json

from loraforge.cli import main
from loraforge.vocab.report import load_tokenizer, text_stats

from conftest import DATA_DIR


def test_counts_on_a_known_text(extended_tokenizer):
    tokenizer = load_tokenizer(extended_tokenizer)
    stats = text_stats(tokenizer, ["中文 and English 混合 123", "龘"])
    assert (stats.chinese_characters, stats.english_words, stats.characters) == (5, 2, 22)
    first, rare = (tokenizer.convert_ids_to_tokens(tokenizer.encode(t, add_special_tokens=False))
                   for t in ["中文 and English 混合 123", "龘"])
    assert stats.tokens == len(first) + len(rare)
    assert stats.byte_tokens == sum(p.startswith("<0x") for p in first + rare)
    # a character the vocabulary lacks costs its 3 bytes, all counted for Chinese
    assert rare == ["▁", "<0xE9>", "<0xBE>", "<0x98>"]  # the dummy-prefix space counts for neither
    assert stats.chinese_tokens == 3 + sum(1 for p in first if any("\u4e00" <= c <= "\u9fff" for c in p))


def test_report_on_held_out_text_shows_the_drop(small_base_tokenizer, extended_tokenizer, tmp_path, capsys):
    assert main(["vocab", "report", "--base", str(small_base_tokenizer), "--new", str(extended_tokenizer),
                 "--text", str(DATA_DIR / "zh_heldout.txt"), "-o", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "vocab_report.json").read_text(encoding="utf-8"))
    base, new = report["base"], report["new"]
    assert new["per_chinese_char"] < 0.8 * base["per_chinese_char"], (base, new)
    assert new["tokens"] < base["tokens"] and new["byte_tokens"] < base["byte_tokens"]
    assert report["pieces_added"] == new["vocab_size"] - base["vocab_size"] > 1000
    assert f"{base['per_chinese_char']:.3f}" in printed and f"{new['per_chinese_char']:.3f}" in printed
    assert "tokens per English word" in printed and "byte-fallback tokens" in printed
    example = report["examples"][0]
    assert example["text"] in printed and len(example["new"]) < len(example["base"])
    assert (tmp_path / "vocab_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab_report.json", "vocab_report.png"]


def test_missing_text_is_an_error(small_base_tokenizer, extended_tokenizer, tmp_path, capsys):
    assert main(["vocab", "report", "--base", str(small_base_tokenizer), "--new", str(extended_tokenizer),
                 "--text", str(tmp_path / "none.txt")]) == 2
    assert "--text" in capsys.readouterr().err
