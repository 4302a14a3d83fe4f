"""Vocabulary fixtures: a small LLaMA-like base, a Chinese SentencePiece model, their merge.

The base tokenizer (1,500 pieces, trained on 58 of the corpus's 460 lines) knows the
commonest characters and falls back to bytes for the rest, as LLaMA's does for most
Chinese; the Chinese model (3,000 pieces) is trained on the whole corpus.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = ROOT / "examples" / "data"
CORPUS = DATA_DIR / "zh_corpus.txt"
HELDOUT = DATA_DIR / "zh_heldout.txt"
EXAMPLES = ROOT / "examples"
ZH_PIECES = 3000


@pytest.fixture(scope="session")
def small_base_tokenizer(tmp_path_factory) -> Path:
    from loraforge.vocab.small_base import build_base_tokenizer

    return build_base_tokenizer(tmp_path_factory.mktemp("small_base_tok"))


@pytest.fixture(scope="session")
def zh_model(tmp_path_factory) -> Path:
    from loraforge.vocab.train import train_vocab

    return train_vocab([CORPUS], tmp_path_factory.mktemp("zh") / "zh.model", ZH_PIECES).model_file


@pytest.fixture(scope="session")
def extended_tokenizer(small_base_tokenizer, zh_model, tmp_path_factory) -> Path:
    from loraforge.vocab.merge import merge_vocab

    return merge_vocab(small_base_tokenizer, zh_model, tmp_path_factory.mktemp("ext") / "tok").out_dir


@pytest.fixture(scope="session")
def small_base_random(small_base_tokenizer, tmp_path_factory) -> Path:
    """A random tiny LLaMA on the small base tokenizer: enough for resize mechanics."""
    from loraforge.tiny import TinyShape, build_tiny_model

    return build_tiny_model(small_base_tokenizer, tmp_path_factory.mktemp("small_base_random"), TinyShape())


@pytest.fixture(scope="session")
def small_base_pretrained(tmp_path_factory) -> Path:
    """The small base after a short full pre-training on the corpus: its embeddings mean something."""
    from loraforge.vocab.small_base import build_base_model

    return build_base_model(tmp_path_factory.mktemp("small_base") / "model", steps=60, batch_size=8, block_size=64)
