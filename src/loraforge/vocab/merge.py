"""`loraforge vocab merge`: append a new SentencePiece model's pieces to a base model's.

Every piece of the added model that the base lacks is appended to the base's model proto,
in the added model's order, with no duplicates, so every base id keeps its piece. Two ways
to score the new pieces (`scheme`):

- `chinese-llama` (the default): what Chinese-LLaMA's `merge_tokenizers.py` does — every
  new piece gets score 0, above every base piece, so sentencepiece and llama.cpp merge the
  new (Chinese) pieces first and break the many ties by position in the text. That is the
  released 49,953-piece tokenizer exactly (`llama2.model` + `chinese_sp.model`), and it
  cuts Chinese into fewer tokens (README, "Tokenizers").
- `ranked`: strictly decreasing scores below the base's lowest, so a piece's id is its
  merge rank and base segmentation comes first; the new pieces join what it left. Its
  `tokenizer.json` agrees with sentencepiece on every text.

A ranked `tokenizer.json` merge list cannot express score ties, so for the default the
`tokenizer.json` written for other tools is a best effort (its agreement is reported);
loraforge itself encodes SentencePiece vocabularies with sentencepiece
(`loraforge.tokenizer`), and so does llama.cpp from the GGUF.

An added unigram model (Chinese-LLaMA's `chinese_sp.model` is one) goes into a bpe base
by string: its log-probabilities are not bpe scores, so the scheme scores its pieces, the
base's merge rule decides how text is cut, and its normalizer (`nmt_nfkc`) is not applied.

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
    scheme: str = "chinese-llama"

    def describe(self) -> str:
        pad = f" + pad token {self.pad_token!r} (id {self.tokens - 1})" if self.pad_token and self.tokens > \
            self.base_pieces + self.added else ""
        lines = [f"base {self.base_pieces} pieces + {self.added} new ({self.scheme} scores) = "
                 f"{self.base_pieces + self.added} pieces{pad}; "
                 f"{self.already_in_base} pieces of the added model were already in the base",
                 f"wrote {self.out_dir}/tokenizer.model, tokenizer.json, tokenizer_config.json ({self.tokens} tokens)"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def base_model_file(base: Path) -> Path:
    """The base's tokenizer.model, or a clear reason why there is none to extend."""
    base = Path(base)
    if base.is_file():
        return base
    if not base.exists():
        raise LoraforgeError(f"no such model directory: {base} (--base) — pass the base model's directory "
                             "(or its tokenizer.model)")
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


SCHEMES = ("chinese-llama", "ranked")
KINDS = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
# LLaMA-2 scores its space runs −1e9 ("merge last"): a sentinel, not the bottom of the ranking
SENTINEL_SCORE = -1e8


def _ranked_start(base) -> float:
    """The first score below the base's lowest real piece score, where float32 still counts in ones."""
    import numpy as np

    normal = [p.score for p in base.pieces if p.type == NORMAL and p.score > SENTINEL_SCORE]
    return float(np.float32(min(normal, default=0.0) - 1.0))


def merged_proto(base_file: Path, add_file: Path, scheme: str = "chinese-llama"):
    """The base proto with the added model's missing pieces appended; returns (proto, added, duplicates, notes)."""
    if scheme not in SCHEMES:
        raise LoraforgeError(f"--scheme {scheme}: choose one of {', '.join(SCHEMES)}")
    base, add = load_proto(base_file), load_proto(add_file)
    base_kind, add_kind = (KINDS.get(m.trainer_spec.model_type) for m in (base, add))
    notes = []
    if base_kind != add_kind:
        if base_kind != "bpe" or add_kind != "unigram":
            raise LoraforgeError(
                f"{add_file} is a {add_kind} model but the base {base_file} is {base_kind}: its scores cannot be "
                f"placed in the base's — retrain it with vocab train --model-type {base_kind}")
        notes.append(f"{add_file} is a unigram model and the base bpe (as in Chinese-LLaMA): its pieces are added "
                     "by string, the base's bpe merge rule decides how text is cut, and the scores are the "
                     f"{scheme} scheme's, not its log-probabilities")
    if add.normalizer_spec.name not in ("identity", "") and base.normalizer_spec.name in ("identity", ""):
        notes.append(f"{add_file} was trained with {add.normalizer_spec.name!r} normalization, which is not applied: "
                     "the merged model keeps the base's identity normalizer (llama.cpp applies none), so pieces that "
                     "only exist after normalization (e.g. ',' for '，') stay unused")
    known = {p.piece for p in base.pieces}
    bpe = base_kind == "bpe"
    next_score = _ranked_start(base)
    added = duplicates = 0
    for piece in add.pieces:
        recipe = scheme == "chinese-llama" and bpe
        if not recipe and piece.type not in (NORMAL, USER_DEFINED):
            continue  # <unk>, <s>, </s> and byte pieces: the base has its own
        if piece.piece in known:
            duplicates += piece.type in (NORMAL, USER_DEFINED)
            continue
        new = base.pieces.add()
        # the recipe appends a fresh piece (type NORMAL, score 0) for every string the base lacks
        new.piece, new.type = piece.piece, NORMAL if recipe else piece.type
        if not bpe:
            new.score = piece.score  # unigram into unigram: the piece's own log-probability
        elif recipe:
            new.score = 0.0
        else:
            new.score = next_score
            next_score -= 1.0
            if new.score != next_score + 1.0:  # float32 ran out of integers
                raise LoraforgeError(f"too many pieces for the ranked scheme below score {new.score}: use "
                                     "--scheme chinese-llama")
        known.add(piece.piece)
        added += 1
    return base, added, duplicates, notes


def merge_vocab(base: Path, add_model: Path, out_dir: Path, pad_token: str | None = None,
                scheme: str = "chinese-llama") -> MergedVocab:
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
    proto, added, duplicates, notes = merged_proto(base_file, add_model, scheme)
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
        tokens, agreement = _check_ids(model_file, tmp, proto, exact=scheme == "ranked")
    if agreement < 1.0:
        notes.append(f"tokenizer.json (for other tools) gives sentencepiece's ids on {agreement:.1%} of the check "
                     "texts: a ranked merge list cannot break the new pieces' score ties by position; loraforge and "
                     "llama.cpp use tokenizer.model itself (--scheme ranked writes an exact tokenizer.json)")
    return MergedVocab(out_dir, base_pieces, added, duplicates, tokens, pad_token, notes, scheme)


def _check_ids(model_file: Path, folder: Path, proto, exact: bool) -> tuple[int, float]:
    """How far the tokenizer.json we wrote cuts text as sentencepiece does the merged model; it must
    be exact where a rank list can express the scores. Returns (its size, agreement)."""
    from loraforge.tokenizer import load_tokenizer_json

    tokenizer = load_tokenizer_json(folder)
    texts = CHECK_TEXTS + [p.piece.replace("▁", " ") for p in proto.pieces if p.type == NORMAL][-2000:]
    bad = id_mismatches(model_file, tokenizer, texts)
    if bad and exact:
        text, want, got = bad[0]
        raise LoraforgeError(f"internal check failed: {len(bad)} text(s) get different ids from sentencepiece and "
                             f"the written tokenizer.json, e.g. {text!r}: {want} vs {got} — please report this")
    return len(tokenizer), 1 - len(bad) / len(texts)
