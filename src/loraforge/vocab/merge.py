"""`loraforge vocab merge`: append a new SentencePiece model's pieces to a base model's.

What Chinese-LLaMA's `merge_tokenizers.py` does — every piece of the added model that
the base lacks is appended to the base's model proto, in the added model's order, with
no duplicates, so every base id keeps its piece — with one difference that keeps three
tokenizers agreeing. That script gives every new piece score 0, above every base piece:
sentencepiece and llama.cpp then merge the new pieces first and break the many ties by
position in the text, which a `tokenizer.json` merge list (one strict rank per merge)
cannot express. We give the new pieces strictly decreasing scores below the base's
lowest, so a piece's id is its merge rank everywhere: base segmentation comes first,
the new pieces join what it left.

Byte-level BPE bases (Llama-3, Qwen2) are refused: their vocabulary is byte sequences
joined by a ranked merge list, and SentencePiece pieces (characters, `▁` for a space)
have no place in it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.errors import LoraforgeError
from loraforge.outputs import check_new_dir, new_dir
from loraforge.vocab.spm import NORMAL, USER_DEFINED, id_mismatches, load_proto, save_hf_tokenizer

# tokenizer_config.json keys of the base that describe how the model is used, not the vocabulary
KEPT_CONFIG_KEYS = ("chat_template", "model_max_length", "add_bos_token", "add_eos_token", "padding_side")
# texts whose ids sentencepiece and the written tokenizer.json must agree on (plus every new piece)
CHECK_TEXTS = ["春天来了，公园里的花都开了。", "混合 English 和中文 2024年 GPU", "全角标点：，。！？“引号”（括号）",
               "数字 1234567890 和  两个空格", "第一行\n第二行", "表情 🙂🚀 龘 饕餮 耄耋", " leading and trailing  "]


@dataclass
class MergedVocab:
    out_dir: Path
    base_pieces: int
    added: int
    already_in_base: int
    tokens: int  # len(tokenizer): pieces plus an added pad token
    pad_token: str | None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        pad = f" + pad token {self.pad_token!r} (id {self.tokens - 1})" if self.pad_token and self.tokens > \
            self.base_pieces + self.added else ""
        lines = [f"base {self.base_pieces} pieces + {self.added} new = {self.base_pieces + self.added} pieces{pad}; "
                 f"{self.already_in_base} pieces of the added model were already in the base",
                 f"wrote {self.out_dir}/tokenizer.model, tokenizer.json, tokenizer_config.json ({self.tokens} tokens)"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def base_model_file(base: Path) -> Path:
    """The base's tokenizer.model, or a clear reason why there is none to extend."""
    base = Path(base)
    if base.is_file():
        return base
    model_file = base / "tokenizer.model"
    if model_file.exists():
        return model_file
    tokenizer_json = base / "tokenizer.json"
    if tokenizer_json.exists():
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        if spec.get("model", {}).get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
            raise LoraforgeError(
                f"{base}: a byte-level BPE tokenizer (Llama-3, Qwen2 style), not SentencePiece — its vocabulary is "
                "byte strings joined by a ranked merge list, and SentencePiece pieces cannot be appended to it. "
                "Such bases already cover Chinese through bytes and merges (Llama-3: ~1.5 tokens per character); "
                "to extend one anyway, train a tokenizers BPE on your corpus and add its merges, or add whole words "
                "as added tokens — vocab merge supports SentencePiece bases (LLaMA-1/2, Mistral, Chinese-LLaMA)")
        raise LoraforgeError(f"{base}: tokenizer.json without a tokenizer.model — vocab merge needs the base's "
                             "SentencePiece model (copy tokenizer.model from the original release)")
    raise LoraforgeError(f"{base}: no tokenizer.model — pass the base model's directory (or its tokenizer.model)")


def _tokens_after_pieces(base: Path, n_pieces: int) -> list[tuple[int, str]]:
    """Tokens the base's tokenizer.json adds after its SentencePiece pieces (a pad, chat tokens)."""
    path = Path(base) / "tokenizer.json" if Path(base).is_dir() else None
    if path is None or not path.exists():
        return []
    added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])
    return sorted((t["id"], t["content"]) for t in added if t["id"] >= n_pieces)


def merged_proto(base_file: Path, add_file: Path):
    """The base proto with the added model's missing pieces appended; returns (proto, added, duplicates, notes)."""
    base, add = load_proto(base_file), load_proto(add_file)
    notes = []
    if base.trainer_spec.model_type != add.trainer_spec.model_type:
        kinds = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
        raise LoraforgeError(
            f"{add_file} is a {kinds.get(add.trainer_spec.model_type)} model but the base {base_file} is "
            f"{kinds.get(base.trainer_spec.model_type)}: their piece scores mean different things — "
            f"retrain it with vocab train --model-type {kinds.get(base.trainer_spec.model_type)}")
    if add.normalizer_spec.name not in ("identity", "") and base.normalizer_spec.name in ("identity", ""):
        notes.append(f"{add_file} was trained with {add.normalizer_spec.name!r} normalization; the merged model keeps "
                     "the base's identity normalizer, so pieces that only exist after normalization (e.g. ',' for "
                     "'，') stay unused — vocab train uses identity")
    known = {p.piece for p in base.pieces}
    normal = [p.score for p in base.pieces if p.type == NORMAL]
    is_bpe = base.trainer_spec.model_type == 2
    next_score = (min(normal) if normal else 0.0) - 1.0
    added = duplicates = 0
    for piece in add.pieces:
        if piece.type not in (NORMAL, USER_DEFINED):
            continue  # <unk>, <s>, </s> and byte pieces: the base has its own
        if piece.piece in known:
            duplicates += 1
            continue
        new = base.pieces.add()
        new.piece, new.type = piece.piece, piece.type
        # bpe: a strict rank below every base merge; unigram: the piece's own log-probability
        new.score = next_score if is_bpe else piece.score
        next_score -= 1.0
        known.add(piece.piece)
        added += 1
    return base, added, duplicates, notes


def merge_vocab(base: Path, add_model: Path, out_dir: Path, pad_token: str | None = None) -> MergedVocab:
    """Write `out_dir` with the merged tokenizer.model, tokenizer.json and tokenizer_config.json."""
    base, add_model, out_dir = Path(base), Path(add_model), Path(out_dir)
    base_file = base_model_file(base)
    if not add_model.is_file():
        raise LoraforgeError(f"--add {add_model}: no such SentencePiece model (make one with vocab train)")
    check_new_dir(out_dir)
    base_pieces = len(load_proto(base_file).pieces)
    after = _tokens_after_pieces(base, base_pieces)
    if after:
        listed = ", ".join(f"{content!r} (id {i})" for i, content in after[:3])
        raise LoraforgeError(
            f"{base}/tokenizer.json adds {len(after)} token(s) after the {base_pieces} SentencePiece pieces: {listed}. "
            "Appending pieces would give their ids to new pieces and move them — merge into the plain base "
            "tokenizer (the original LLaMA one) and add a pad token with --pad-token")
    proto, added, duplicates, notes = merged_proto(base_file, add_model)
    if added == 0:
        raise LoraforgeError(f"--add {add_model}: every one of its pieces is already in {base_file} — nothing to add")
    if pad_token and pad_token in {p.piece for p in proto.pieces}:
        notes.append(f"pad token {pad_token!r} is already a piece (id "
                     f"{next(i for i, p in enumerate(proto.pieces) if p.piece == pad_token)}); no token added")

    base_config = {}
    if base.is_dir() and (base / "tokenizer_config.json").exists():
        base_config = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    kept = {k: base_config[k] for k in KEPT_CONFIG_KEYS if k in base_config}
    with new_dir(out_dir) as tmp:
        model_file = tmp / "tokenizer.model"
        model_file.write_bytes(proto.SerializeToString())
        save_hf_tokenizer(model_file, tmp, pad_token=pad_token, extra_config=kept)
        tokens = _check_ids(model_file, tmp, proto)
    return MergedVocab(out_dir, base_pieces, added, duplicates, tokens, pad_token, notes)


def _check_ids(model_file: Path, folder: Path, proto) -> int:
    """The tokenizer.json we wrote must cut text exactly as sentencepiece does the merged model; returns its size."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    texts = CHECK_TEXTS + [p.piece.replace("▁", " ") for p in proto.pieces if p.type == NORMAL][-2000:]
    bad = id_mismatches(model_file, tokenizer, texts)
    if bad:
        text, want, got = bad[0]
        raise LoraforgeError(f"internal check failed: {len(bad)} text(s) get different ids from sentencepiece and "
                             f"the written tokenizer.json, e.g. {text!r}: {want} vs {got} — please report this")
    return len(tokenizer)

