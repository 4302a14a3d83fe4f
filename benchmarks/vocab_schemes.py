"""`vocab merge` scoring schemes on real vocabularies: which cuts Chinese into fewer tokens, how far the
two agree, and how far the tokenizer.json written for other tools agrees with sentencepiece.

Inputs (nothing downloaded): Meta's LLaMA-2 `tokenizer.model` and Chinese-LLaMA's `chinese_sp.model`
from ../shared/fixtures/tokenizers, and a 3,000-piece `vocab train` bpe model of the bundled corpus.
Text: examples/data/zh_heldout.txt (71 lines, shares no text with the corpus) and zh_corpus.txt.
Ground truth is sentencepiece on the merged tokenizer.model.

    python benchmarks/vocab_schemes.py [--append]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
REAL = ROOT.parent / "shared" / "fixtures" / "tokenizers"
DATA = ROOT / "examples" / "data"
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")


def lines_of(name: str) -> list[str]:
    return [line for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()

    import sentencepiece as spm

    from loraforge.tokenizer import load_tokenizer_json
    from loraforge.vocab.merge import merge_vocab
    from loraforge.vocab.spm import id_mismatches
    from loraforge.vocab.train import train_vocab

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="vocab-schemes-"))
    zh = train_vocab([DATA / "zh_corpus.txt"], work / "zh.model", 3000).model_file
    texts = {"held-out": lines_of("zh_heldout.txt"), "corpus": lines_of("zh_corpus.txt")}
    base = spm.SentencePieceProcessor(model_file=str(REAL / "llama2.model"))
    rows = []
    for label, add in (("chinese_sp.model (unigram, 20,000)", REAL / "chinese_sp.model"),
                       ("vocab train bpe (3,000)", zh)):
        merged = {}
        for scheme in ("chinese-llama", "ranked"):
            out = merge_vocab(REAL / "llama2.model", add, work / f"{add.stem}-{scheme}", scheme=scheme)
            merged[scheme] = (out, spm.SentencePieceProcessor(model_file=str(out.out_dir / "tokenizer.model")))
        for text_label, lines in texts.items():
            chars = sum(len(HAN.findall(line)) for line in lines)
            per_char = {s: sum(len(sp.encode(line)) for line in lines) / chars for s, (_, sp) in merged.items()}
            same = sum(merged["chinese-llama"][1].encode(line) == merged["ranked"][1].encode(line) for line in lines)
            json_ok = {s: len(lines) - len(id_mismatches(out.out_dir / "tokenizer.model",
                                                         load_tokenizer_json(out.out_dir), lines))
                       for s, (out, _) in merged.items()}
            rows.append((label, merged["ranked"][0].base_pieces + merged["ranked"][0].added, text_label, len(lines),
                         sum(len(base.encode(line)) for line in lines) / chars, per_char["chinese-llama"],
                         per_char["ranked"], same, json_ok["chinese-llama"], json_ok["ranked"]))
    load = os.getloadavg()[0]
    head = ("| added model | pieces | text | lines | LLaMA-2 tok/汉字 | chinese-llama tok/汉字 | ranked tok/汉字 | "
            "lines cut alike by both | tokenizer.json = sentencepiece, chinese-llama | … ranked |")
    table = [head, "|" + "---|" * 10]
    for r in rows:
        table.append(f"| {r[0]} | {r[1]:,} | {r[2]} | {r[3]} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} | "
                     f"{r[7]}/{r[3]} | {r[8]}/{r[3]} | {r[9]}/{r[3]} |")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    report = (f"## vocab_schemes.py — {stamp} — {platform.machine()}, {os.cpu_count()} cores, "
              f"load average {load:.1f}\n\nLLaMA-2's tokenizer.model + each added model, merged with both "
              f"schemes; ids from sentencepiece. Run took {time.time() - started:.0f} s.\n\n" + "\n".join(table) + "\n")
    print(report)
    if args.append:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as handle:
            handle.write("\n" + report)


if __name__ == "__main__":
    main()
