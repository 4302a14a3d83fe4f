"""Tokenizer → GGUF metadata (`tokenizer.ggml.*`) and the chat template.

A SentencePiece `tokenizer.model` becomes llama.cpp's `llama` vocabulary: every piece
with its score and type from the model proto, tokens added on top of it (a pad, new
special tokens) after them, then `[PAD{i}]` up to the embedding's row count, because
llama.cpp wants one token per embedding row. A tokenizer larger than the embedding
would index past it: refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.errors import LoraforgeError
from loraforge.vocab.spm import load_proto

# sentencepiece piece types equal gguf's TokenType values (1 normal … 6 byte)
USER_DEFINED, UNUSED = 4, 5


def chat_template_of(folder: Path) -> str | None:
    config = _tokenizer_config(folder)
    if config.get("chat_template"):
        return config["chat_template"]
    jinja = folder / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.exists() else None


def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _added_tokens(folder: Path) -> dict[int, tuple[str, bool]]:
    """id → (content, special) for tokens added on top of the base vocabulary (tokenizer.json)."""
    path = folder / "tokenizer.json"
    if not path.exists():
        return {}
    added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])
    return {t["id"]: (t["content"], t.get("special", False)) for t in added}


def add_tokenizer(writer, folder: Path, embed_rows: int) -> None:
    model_file = folder / "tokenizer.model"
    if not model_file.exists():
        raise LoraforgeError(f"{folder}: no tokenizer.model — GGUF export handles SentencePiece vocabularies in "
                             "this version; byte-level BPE (Llama-3, Qwen2) tokenizer.json export is coming next")
    proto = load_proto(model_file)
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    for token_id, (content, special) in sorted(_added_tokens(folder).items()):
        if token_id < len(tokens):
            continue  # <unk>, <s>, </s>: already pieces of the model
        if token_id != len(tokens):
            raise LoraforgeError(f"{folder}/tokenizer.json: added token {content!r} has id {token_id} but the "
                                 f"vocabulary has {len(tokens)} entries before it — the ids have a gap")
        tokens.append(content.encode("utf-8"))
        scores.append(0.0)
        types.append(3 if special else USER_DEFINED)  # 3 = control
    if len(tokens) > embed_rows:
        raise LoraforgeError(f"the tokenizer in {folder} has {len(tokens)} tokens but the embedding has {embed_rows} "
                             "rows: ids past the embedding would crash llama.cpp — resize the model to the tokenizer")
    for index in range(len(tokens), embed_rows):
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(UNUSED)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    spec = proto.trainer_spec
    vocab = {t: i for i, t in enumerate(tokens)}
    config = _tokenizer_config(folder)
    for key, setter in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                        ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        content = config.get(key)
        if isinstance(content, dict):
            content = content.get("content")
        if content and content.encode() in vocab:
            setter(vocab[content.encode()])
    if config.get("pad_token") is None and spec.pad_id >= 0:
        writer.add_pad_token_id(spec.pad_id)
    writer.add_add_bos_token(bool(config.get("add_bos_token", True)))
    writer.add_add_eos_token(bool(config.get("add_eos_token", False)))
    writer.add_add_space_prefix(bool(proto.normalizer_spec.add_dummy_prefix))
    template = chat_template_of(folder)
    if template:
        writer.add_chat_template(template)
