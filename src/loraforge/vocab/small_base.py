"""A small LLaMA-like base for vocabulary work, built locally: `python -m loraforge.vocab.small_base OUT`.

LLaMA's 32K vocabulary has only a few hundred Chinese characters; every other one falls
back to its 3 UTF-8 bytes. To show what an extension gains without downloading LLaMA, the
base tokenizer here is a 1,500-piece SentencePiece model trained on a small part of the
bundled corpus (its first 40 lines and every line with Latin letters, 58 of 460): it
knows the commonest characters, letters and digits, and falls back to bytes for the
rest. The base model is the tiny LLaMA pre-trained (full) on the whole corpus with that
tokenizer, so its embeddings mean something before the vocabulary grows.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[3] / "examples" / "data"
CORPUS = DATA / "zh_corpus.txt"
BASE_VOCAB = 1500
HEAD_LINES = 40


def base_corpus(corpus: Path, out_file: Path) -> Path:
    """The part of the corpus the base tokenizer sees: the first lines and every line with Latin letters."""
    lines = [line for line in Path(corpus).read_text(encoding="utf-8").splitlines() if line.strip()]
    chosen = lines[:HEAD_LINES] + [line for line in lines[HEAD_LINES:] if re.search(r"[A-Za-z]", line)]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text("\n".join(chosen) + "\n", encoding="utf-8")
    return out_file


def build_base_tokenizer(out_dir: Path, corpus: Path = CORPUS, vocab_size: int = BASE_VOCAB) -> Path:
    from loraforge.tiny import build_spm_tokenizer

    part = base_corpus(corpus, Path(out_dir) / "_base_part.txt")
    build_spm_tokenizer([part], Path(out_dir), vocab_size=vocab_size)
    part.unlink()
    return Path(out_dir)


def build_base_model(out_dir: Path, steps: int = 300, corpus: Path = CORPUS, shape=None, batch_size: int = 16,
                     block_size: int = 128) -> Path:
    """Tokenizer, a random tiny LLaMA sized to it, then `steps` of full pre-training on the corpus."""
    import shutil

    from loraforge.config import load_config
    from loraforge.tiny import TinyShape, build_tiny_model
    from loraforge.train.run import train

    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + "-work")
    tokenizer = build_base_tokenizer(work / "tokenizer", corpus)
    random_model = build_tiny_model(tokenizer, work / "random", shape or TinyShape())
    train(load_config(None, [
        "stage=pt", "method=full", f"model.path={random_model}", f"train.output_dir={out_dir}",
        f"data.datasets={corpus}", f"data.block_size={block_size}", f"train.batch_size={batch_size}", f"train.max_steps={steps}",
        "train.lr=5e-3", "train.logging_steps=20", "train.save_steps=100000", "train.overwrite_output_dir=true",
        "train.seed=0",
    ]))
    shutil.rmtree(work)
    for checkpoint in out_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m loraforge.vocab.small_base OUT_DIR")
    print(f"small base model: {build_base_model(Path(sys.argv[1]))}")
