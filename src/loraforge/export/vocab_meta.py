"""Tokenizer → GGUF metadata (`tokenizer.ggml.*`) and the chat template.

Two vocabulary kinds, as llama.cpp names them: a SentencePiece `tokenizer.model` is
`llama`; a byte-level BPE `tokenizer.json` (Llama-3, Qwen2) is `gpt2` (see
`add_bpe_tokenizer`, which picks the pre-tokenizer). A SentencePiece `tokenizer.model` becomes llama.cpp's `llama` vocabulary: every piece
with its score and type from the model proto, tokens added on top of it (a pad, new
special tokens) after them, then `[PAD{i}]` up to the embedding's row count, because
llama.cpp wants one token per embedding row. A tokenizer larger than the embedding
would index past it: refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from loraforge.errors import LoraforgeError
from loraforge.vocab.spm import load_proto

# sentencepiece piece types equal gguf's TokenType values (1 normal … 6 byte)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def chat_template_of(folder: Path) -> str | None:
    from loraforge.tokenizer import chat_template_in

    return chat_template_in(folder)


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


def add_tokenizer(writer, folder: Path, embed_rows: int, fallbacks: Sequence[Path] = ()) -> None:
    """The vocabulary the tokenizer module loads for `folder` (`fallbacks`: the chain's other folders,
    whose tokenizer.model stands in for a tokenizer.json-only adapter with the same vocabulary)."""
    from loraforge.tokenizer import find_sentencepiece, is_llama_spm_pipeline

    model_file = find_sentencepiece(folder, fallbacks)
    if model_file is None:
        if not (folder / "tokenizer.json").exists():
            raise LoraforgeError(f"{folder}: neither tokenizer.model (SentencePiece) nor tokenizer.json "
                                 "— copy the base model's tokenizer files into it")
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        if is_llama_spm_pipeline(spec):
            return _add_llama_vocab(writer, folder, embed_rows, *_pieces_of_tokenizer_json(folder, spec),
                                    add_space_prefix=True)
        return add_bpe_tokenizer(writer, folder, embed_rows)
    proto = load_proto(model_file)
    _add_llama_vocab(writer, folder, embed_rows, [p.piece for p in proto.pieces], [p.score for p in proto.pieces],
                     [p.type for p in proto.pieces], add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
                     pad_id=proto.trainer_spec.pad_id)


def _pieces_of_tokenizer_json(folder: Path, spec: dict) -> tuple[list[str], list[float], list[int]]:
    """A LLaMA-style tokenizer.json (no tokenizer.model, e.g. written by another tool under
    transformers 5) as SentencePiece pieces: llama.cpp merges by piece score, so each piece
    scores minus the rank of the first merge that makes it — the same order as the merge list."""
    model = spec["model"]
    vocab = model.get("vocab") or {}
    by_id = {i: piece for piece, i in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise LoraforgeError(f"{folder}/tokenizer.json: vocabulary ids are not 0…{len(by_id) - 1} without gaps")
    first_merge: dict[str, int] = {}
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        first_merge.setdefault(left + right, rank)
    unk = model.get("unk_token")
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    pieces, scores, types = [], [], []
    for index in range(len(by_id)):
        piece = by_id[index]
        pieces.append(piece)
        scores.append(-float(first_merge[piece]) if piece in first_merge else 0.0)
        if piece == unk:
            types.append(UNKNOWN)
        elif piece in special:
            types.append(CONTROL)
        elif _BYTE_PIECE.fullmatch(piece):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return pieces, scores, types


def _add_llama_vocab(writer, folder: Path, embed_rows: int, pieces: list[str], scores: list[float],
                     types: list[int], add_space_prefix: bool, pad_id: int = -1) -> None:
    tokens = [p.encode("utf-8") for p in pieces]
    scores, types = list(scores), list(types)
    for token_id, (content, special) in sorted(_added_tokens(folder).items()):
        if token_id < len(tokens):
            continue  # <unk>, <s>, </s>: already pieces of the model
        if token_id != len(tokens):
            raise LoraforgeError(f"{folder}/tokenizer.json: added token {content!r} has id {token_id} but the "
                                 f"vocabulary has {len(tokens)} entries before it — the ids have a gap")
        tokens.append(content.encode("utf-8"))
        scores.append(0.0)
        types.append(CONTROL if special else USER_DEFINED)
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
    vocab = {t: i for i, t in enumerate(tokens)}
    config = _tokenizer_config(folder)
    for key, setter in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                        ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        content = config.get(key)
        if isinstance(content, dict):
            content = content.get("content")
        if content and content.encode() in vocab:
            setter(vocab[content.encode()])
    if config.get("pad_token") is None and pad_id >= 0:
        writer.add_pad_token_id(pad_id)
    writer.add_add_bos_token(bool(config.get("add_bos_token", True)))
    writer.add_add_eos_token(bool(config.get("add_eos_token", False)))
    writer.add_add_space_prefix(add_space_prefix)
    template = chat_template_of(folder)
    if template:
        writer.add_chat_template(template)


# tokenizer.json split regex → llama.cpp's `tokenizer.ggml.pre` name. llama.cpp never reads
# the regex from the file: each name selects a pattern compiled into src/llama-vocab.cpp,
# so we may only write a name whose pattern is exactly the one the tokenizer was built with.
# (convert_hf_to_gguf.py instead hashes the ids of a test string, which only knows hub
# checkpoints, not a tokenizer trained here.)
BPE_PRE_TOKENIZERS = {
    # Llama-3 (tiktoken cl100k-style): numbers in runs of up to three digits
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    # Qwen2: the same, but every digit on its own
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def bpe_pre_tokenizer(folder: Path, spec: dict) -> str:
    """The llama.cpp pre-tokenizer name for tokenizer.json's `pre_tokenizer`: Split(regex) then
    ByteLevel without its own regex, as Llama-3 and Qwen2 ship it."""
    steps = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else [spec]
    splits = [s["pattern"].get("Regex") for s in steps if s and s.get("type") == "Split"]
    byte_level = [s for s in steps if s and s.get("type") == "ByteLevel"]
    supported = "; ".join(f"{name}: {regex}" for regex, name in BPE_PRE_TOKENIZERS.items())
    if len(splits) != 1 or splits[0] not in BPE_PRE_TOKENIZERS or len(byte_level) != 1 \
            or byte_level[0].get("use_regex", True):
        found = splits[0] if len(splits) == 1 else json.dumps(spec)
        raise LoraforgeError(f"{folder}/tokenizer.json: pre-tokenizer {found!r} is not one llama.cpp reimplements "
                             f"that loraforge knows — supported (Split regex + ByteLevel(use_regex=false)): "
                             f"{supported}. Train the tokenizer with one of these split patterns")
    return BPE_PRE_TOKENIZERS[splits[0]]


def _special_ids(folder: Path) -> tuple[int | None, int | None]:
    """(bos id, eos id) that the tokenizer's post-processor adds around a text, or None each:
    the truth of what `encode(text)` does, whatever tokenizer_config.json claims."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    plain, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a").ids
    starts = [k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain]
    if not starts or starts[0] > 1 or len(full) - starts[0] - len(plain) > 1:
        raise LoraforgeError(f"{folder}/tokenizer.json: the post-processor does more than add one bos/eos token "
                             f"({plain} → {full}); llama.cpp cannot reproduce it")
    bos = full[0] if starts[0] == 1 else None
    eos = full[-1] if len(full) > starts[0] + len(plain) else None
    return bos, eos


def add_bpe_tokenizer(writer, folder: Path, embed_rows: int) -> None:
    """Byte-level BPE `tokenizer.json` → llama.cpp's `gpt2` vocabulary with its merges."""
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise LoraforgeError(f"{folder}/tokenizer.json: model type {model.get('type')} is not BPE — GGUF export "
                             "handles SentencePiece tokenizer.model and byte-level BPE tokenizer.json")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):  # Qwen2 ships NFC, which leaves already-composed text alone
        raise LoraforgeError(f"{folder}/tokenizer.json: normalizer {normalizer} has no llama.cpp counterpart; "
                             "a tokenizer for GGUF must not normalize (or use NFC)")
    pre = bpe_pre_tokenizer(folder, spec.get("pre_tokenizer"))

    by_id = {i: (t, NORMAL) for t, i in model["vocab"].items()}
    for token_id, (content, special) in _added_tokens(folder).items():
        # non-special added tokens are matched as raw text by llama.cpp, so they stay unencoded
        by_id[token_id] = (content, CONTROL if special else USER_DEFINED)
    if len(by_id) > embed_rows:
        raise LoraforgeError(f"the tokenizer in {folder} has {len(by_id)} tokens but the embedding has {embed_rows} "
                             "rows: ids past the embedding would crash llama.cpp — resize the model to the tokenizer")
    missing = [i for i in range(len(by_id)) if i not in by_id]
    if missing:
        raise LoraforgeError(f"{folder}/tokenizer.json: token ids have a gap at {missing[:5]} — "
                             "the vocabulary and added_tokens must number 0…n-1 without holes")
    tokens = [by_id[i][0].encode("utf-8") for i in range(len(by_id))]
    types = [by_id[i][1] for i in range(len(by_id))]
    tokens += [f"[PAD{i}]".encode() for i in range(len(tokens), embed_rows)]
    types += [UNUSED] * (embed_rows - len(types))
    # tokenizers ≥ 0.20 saves merges as [left, right] pairs, older ones as "left right"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    bos, eos = _special_ids(folder)
    vocab = {t: i for i, t in enumerate(tokens)}
    config = _tokenizer_config(folder)
    for key, setter in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                        ("pad_token", writer.add_pad_token_id)):
        content = config.get(key)
        if isinstance(content, dict):
            content = content.get("content")
        if key == "bos_token" and bos is not None:
            setter(bos)
        elif content and content.encode() in vocab:
            setter(vocab[content.encode()])
    writer.add_add_bos_token(bos is not None)
    writer.add_add_eos_token(eos is not None)
    template = chat_template_of(folder)
    if template:
        writer.add_chat_template(template)
