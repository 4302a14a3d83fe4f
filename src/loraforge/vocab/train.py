"""`loraforge vocab train`: a SentencePiece model for the pieces a base vocabulary lacks.

Chinese-LLaMA trained a 20K-piece Chinese SentencePiece model and appended its pieces to
LLaMA's. We train with LLaMA's own settings (`LLAMA_SAFE_SETTINGS`: identity
normalization, every space kept, byte fallback, digits split, coverage 0.9995) so the
merged vocabulary cuts text the same way in sentencepiece, transformers and llama.cpp.

The corpus is streamed to the trainer line by line (`sentence_iterator`), which is where
the progress bar with rate and ETA comes from; the model is written to a temporary name
and renamed when complete, with a `.vocab` listing (piece, score) next to it as
sentencepiece's own trainer writes.
"""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from loraforge.errors import LoraforgeError
from loraforge.outputs import new_file, write_text
from loraforge.vocab.spm import LLAMA_SAFE_SETTINGS, load_proto

# sentencepiece drops longer lines silently (its default is 4192 bytes, ~1400 Chinese
# characters); a paragraph-per-line corpus has longer ones
MAX_SENTENCE_BYTES = 1 << 16


@dataclass
class TrainedVocab:
    model_file: Path
    pieces: int
    model_type: str
    lines: int
    characters: int
    bytes: int
    seconds: float
    sampled: int = 0  # --max-sentences: lines sentencepiece kept of those read

    def describe(self) -> str:
        sample = f", {self.sampled:,} of them sampled" if 0 < self.sampled < self.lines else ""
        return (f"trained a {self.pieces}-piece {self.model_type} SentencePiece model on {self.lines:,} lines{sample} "
                f"({self.characters:,} characters, {self.bytes / 1e6:.2f} MB) in {self.seconds:.2f} s: "
                f"{self.model_file} (+ {self.model_file.with_suffix('.vocab').name})" + (
                    "\nnote: llama.cpp cuts text with score-ordered merges (the bpe algorithm), not unigram's "
                    "Viterbi search: ids differ from sentencepiece on some lines — use bpe for a model bound for "
                    "GGUF" if self.model_type == "unigram" else ""))


def _corpus_lines(corpus: Sequence[Path], counts: dict, progress: tqdm, on_end) -> Iterator[str]:
    for path in corpus:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                progress.update(len(line.encode("utf-8")))
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                counts["lines"] += 1
                counts["characters"] += len(line)
                yield line
    progress.close()
    on_end()  # the trainer has every line; it builds the vocabulary now


def _check_corpus(corpus: Sequence[Path]) -> int:
    if not corpus:
        raise LoraforgeError("vocab train: no --corpus file given")
    total = 0
    for path in corpus:
        if not path.is_file():
            raise LoraforgeError(f"--corpus {path}: no such file")
        with open(path, "rb") as handle:  # line by line: a text-mode read would point at the wrong line
            for number, raw in enumerate(handle, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise LoraforgeError(f"--corpus {path}:{number}: not UTF-8 text ({exc.reason} at byte "
                                         f"{exc.start} of the line) — convert it with iconv -t utf-8") from None
        total += path.stat().st_size
    if total == 0:
        raise LoraforgeError(f"--corpus {', '.join(map(str, corpus))}: empty")
    return total


class _Elapsed:
    """A ticking bar while sentencepiece builds the vocabulary: its C++ trainer reports nothing to Python."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._tick, daemon=True)

    def start(self) -> None:
        self.bar = tqdm(desc=self.desc, bar_format="{desc}: {elapsed}")
        self.thread.start()

    def _tick(self) -> None:
        while not self.stop.wait(0.5):
            self.bar.refresh()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.bar is not None:
            self.thread.join()
            self.bar.close()


def _trainer_refusal(message: str, vocab_size: int, lines: int) -> str:
    """sentencepiece's CHECK failure, said as what to change."""
    needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if needed:
        return (f"--vocab-size {vocab_size} is smaller than the {needed[1]} characters (and <unk>/<s>/</s>) the corpus "
                f"needs at character coverage {LLAMA_SAFE_SETTINGS['character_coverage']}: choose --vocab-size > "
                f"{needed[1]} (Chinese-LLaMA: 20000)")
    detail = message.strip().splitlines()[-1]
    return f"vocab train: sentencepiece refused ({detail}) — for a corpus of {lines:,} lines try a smaller --vocab-size"


def train_vocab(corpus: Sequence[Path], out_file: Path, vocab_size: int = 20000, model_type: str = "bpe",
                max_sentences: int = 0) -> TrainedVocab:
    """Train `out_file` (.model) on the corpus files with llama.cpp-safe settings."""
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise LoraforgeError(f"--model-type {model_type}: choose bpe (LLaMA's and Chinese-LLaMA's) or unigram")
    if vocab_size < 300:
        raise LoraforgeError(f"--vocab-size {vocab_size}: too small — 256 byte pieces and <unk>/<s>/</s> come first")
    if 0 < max_sentences <= 100 or max_sentences < 0:
        raise LoraforgeError(f"--max-sentences {max_sentences}: sentencepiece samples more than 100 lines "
                             "(typically a few million); 0 reads every line")
    corpus = [Path(p) for p in corpus]
    out_file = Path(out_file)
    if out_file.suffix != ".model":
        raise LoraforgeError(f"-o {out_file}: a SentencePiece model file ends in .model")
    total_bytes = _check_corpus(corpus)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    counts = {"lines": 0, "characters": 0}
    model = io.BytesIO()
    started = time.perf_counter()
    settings = {**LLAMA_SAFE_SETTINGS, "max_sentence_length": MAX_SENTENCE_BYTES}
    if max_sentences:
        # sentencepiece samples this many lines at random: bounded memory on a big corpus
        settings.update(input_sentence_size=max_sentences, shuffle_input_sentence=True)
    progress = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="reading corpus")
    with progress, _Elapsed(f"building {vocab_size} {model_type} pieces") as building:
        lines = _corpus_lines(corpus, counts, progress, on_end=building.start)
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, vocab_size=vocab_size,
                                           model_type=model_type, minloglevel=2, **settings)
        except RuntimeError as exc:
            raise LoraforgeError(_trainer_refusal(str(exc), vocab_size, counts["lines"])) from None
    seconds = time.perf_counter() - started

    with new_file(out_file) as tmp:
        tmp.write_bytes(model.getvalue())
        proto = load_proto(tmp)
        write_text(out_file.with_suffix(".vocab"), "".join(f"{p.piece}\t{p.score:g}\n" for p in proto.pieces))
    return TrainedVocab(out_file, len(proto.pieces), model_type, counts["lines"], counts["characters"],
                        total_bytes, seconds, max_sentences)
