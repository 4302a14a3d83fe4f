"""`loraforge vocab report`: what an extended vocabulary gains on held-out text.

Every token of the text is attributed to what it stands for (its text; a byte-fallback
piece, the character it is part of): a token with a Chinese character counts for Chinese,
one with ASCII letters for English, anything else (spaces, digits, punctuation) for
neither. Tokens
per Chinese character = Chinese tokens / Chinese characters; per English word = English
tokens / `[A-Za-z]+` runs. A character the vocabulary lacks falls back to its UTF-8
bytes — 3 tokens for one Chinese character, all attributed to it.

Written next to the new tokenizer (or to `-o`): `vocab_report.json`, `vocab_report.png`
(bars before/after) and the table that the CLI prints.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loraforge.errors import LoraforgeError
from loraforge.outputs import new_file, write_text
from loraforge.tokenizer import is_sentencepiece, load_tokenizer

HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]")
ENGLISH_WORD = re.compile(r"[A-Za-z]+")
BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")


@dataclass
class TextStats:
    """One tokenizer on one text."""

    vocab_size: int
    tokens: int
    characters: int
    chinese_characters: int
    chinese_tokens: int
    english_words: int
    english_tokens: int
    byte_tokens: int  # byte-fallback pieces <0x..>: characters the vocabulary lacks

    @property
    def per_chinese_char(self) -> float:
        return self.chinese_tokens / max(self.chinese_characters, 1)

    @property
    def per_english_word(self) -> float:
        return self.english_tokens / max(self.english_words, 1)

    @property
    def per_char(self) -> float:
        return self.tokens / max(self.characters, 1)


@dataclass
class VocabReport:
    text_file: str
    base_dir: str
    new_dir: str
    base: TextStats
    new: TextStats
    pieces_added: int
    examples: list[dict] = field(default_factory=list)
    png: str | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        for key in ("base", "new"):
            stats = getattr(self, key)
            data[key].update(per_chinese_char=stats.per_chinese_char, per_english_word=stats.per_english_word,
                             per_char=stats.per_char)
        return data


def segment(tokenizer, text: str) -> list[tuple[str, str]]:
    """(piece, the text it covers) for each token; byte pieces cover the character they are part of."""
    if is_sentencepiece(tokenizer):
        return tokenizer.segment(text)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    pieces = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    return [(piece, text[start:end]) for piece, (start, end) in zip(pieces, encoded["offset_mapping"])]


def text_stats(tokenizer, lines: list[str]) -> TextStats:
    tokens = zh_tokens = en_tokens = byte_tokens = 0
    for line in lines:
        for piece, covered in segment(tokenizer, line):
            tokens += 1
            is_byte = bool(BYTE_PIECE.match(piece))
            byte_tokens += is_byte
            # a byte piece stands for the character it is part of; any other piece for its own text
            # (the dummy-prefix `▁` covers the first character's offsets but is a space)
            covered = covered if is_byte else tokenizer.convert_tokens_to_string([piece])
            if HAN.search(covered):
                zh_tokens += 1
            elif ENGLISH_WORD.search(covered):
                en_tokens += 1
    return TextStats(
        vocab_size=len(tokenizer), tokens=tokens, characters=sum(map(len, lines)),
        chinese_characters=sum(len(HAN.findall(line)) for line in lines), chinese_tokens=zh_tokens,
        english_words=sum(len(ENGLISH_WORD.findall(line)) for line in lines), english_tokens=en_tokens,
        byte_tokens=byte_tokens)


def pick_examples(lines: list[str], base_tok, count: int = 4) -> list[str]:
    """Short lines that show the difference: plain Chinese, mixed with English or digits, rare characters."""
    short = sorted((line for line in lines if 8 <= len(line) <= 60), key=len) or sorted(lines, key=len)
    chosen: list[str] = []
    wants = [lambda s: not re.search(r"[A-Za-z0-9]", s), lambda s: bool(ENGLISH_WORD.search(s)),
             lambda s: bool(re.search(r"[0-9]", s)),
             lambda s: any(BYTE_PIECE.match(p) for p, _ in segment(base_tok, s))]
    for want in wants:
        match = next((line for line in short if want(line) and line not in chosen), None)
        if match:
            chosen.append(match)
    return chosen[:count]


def show(pieces: list[str], width: int = 110) -> str:
    text = "|".join(pieces)
    return text if len(text) <= width else text[: width - 1] + "…"


def vocab_report(base_dir: Path, new_dir: Path, text_file: Path, out_dir: Path | None = None) -> VocabReport:
    text_file = Path(text_file)
    if not text_file.is_file():
        raise LoraforgeError(f"--text {text_file}: no such file")
    lines = [line for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise LoraforgeError(f"--text {text_file}: no text in it")
    base_tok, new_tok = load_tokenizer(base_dir), load_tokenizer(new_dir)
    base, new = text_stats(base_tok, lines), text_stats(new_tok, lines)
    examples = [{"text": line, "base": [p for p, _ in segment(base_tok, line)],
                 "new": [p for p, _ in segment(new_tok, line)]} for line in pick_examples(lines, base_tok)]
    report = VocabReport(str(text_file), str(base_dir), str(new_dir), base, new,
                         pieces_added=len(new_tok) - len(base_tok), examples=examples)
    out_dir = Path(out_dir or new_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.png = str(plot_report(report, out_dir / "vocab_report.png"))
    write_text(out_dir / "vocab_report.json", json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    return report


def _change(before: float, after: float) -> str:
    return f"{100 * (after - before) / before:+.1f}%" if before else ""


def format_report(report: VocabReport) -> str:
    b, n = report.base, report.new
    rows = [("vocabulary size", f"{b.vocab_size:,}", f"{n.vocab_size:,}", f"{report.pieces_added:+,} pieces"),
            ("tokens (whole text)", f"{b.tokens:,}", f"{n.tokens:,}", _change(b.tokens, n.tokens)),
            ("tokens per character", f"{b.per_char:.3f}", f"{n.per_char:.3f}", _change(b.per_char, n.per_char)),
            (f"tokens per Chinese character ({b.chinese_characters:,})", f"{b.per_chinese_char:.3f}",
             f"{n.per_chinese_char:.3f}", _change(b.per_chinese_char, n.per_chinese_char)),
            (f"tokens per English word ({b.english_words:,})", f"{b.per_english_word:.3f}",
             f"{n.per_english_word:.3f}", _change(b.per_english_word, n.per_english_word)),
            ("byte-fallback tokens", f"{b.byte_tokens:,}", f"{n.byte_tokens:,}", _change(b.byte_tokens, n.byte_tokens))]
    width = max(len(r[0]) for r in rows)
    out = [f"held-out text: {report.text_file} ({b.characters:,} characters)",
           f"{'':<{width}}  {'base':>10}  {'extended':>10}  change", *(
               f"{name:<{width}}  {before:>10}  {after:>10}  {change}" for name, before, after, change in rows), ""]
    for example in report.examples:
        out += [example["text"],
                f"  base     {len(example['base']):>3}  {show(example['base'])}",
                f"  extended {len(example['new']):>3}  {show(example['new'])}"]
    out.append(f"chart: {report.png}")
    return "\n".join(out)


def plot_report(report: VocabReport, out_png: Path) -> Path:
    """Bars before/after: tokens per Chinese character, per English word, per character; total tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, n = report.base, report.new
    panels = [("tokens per Chinese character", b.per_chinese_char, n.per_chinese_char, "{:.2f}"),
              ("tokens per English word", b.per_english_word, n.per_english_word, "{:.2f}"),
              ("tokens, whole held-out text", b.tokens, n.tokens, "{:,.0f}")]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 3.8))
    labels = [f"base\n{b.vocab_size:,}", f"extended\n{n.vocab_size:,}"]
    for ax, (title, before, after, fmt) in zip(axes, panels):
        bars = ax.bar(labels, [before, after], color=["#9aa5b1", "#2f7ed8"], width=0.6)
        for bar, value in zip(bars, (before, after)):
            ax.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=10, xytext=(0, 2), textcoords="offset points")
        change = _change(before, after)
        ax.set_title(f"{title}\n{change}", fontsize=10)
        ax.set_ylim(0, max(before, after, 1e-9) * 1.2)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(f"vocabulary extension: {report.pieces_added:+,} pieces, on {Path(report.text_file).name} "
                 f"({b.chinese_characters:,} Chinese characters, {b.english_words:,} English words)", fontsize=11)
    fig.tight_layout()
    with new_file(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_png
