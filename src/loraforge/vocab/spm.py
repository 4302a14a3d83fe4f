"""SentencePiece models: train them so llama.cpp agrees, and build the HF tokenizer.

Two rules come from users who got bitten:
- llama.cpp applies no SentencePiece normalizer, so we train with `identity`
  normalization (`nmt_nfkc` would turn `，` into `,` in Python only) and keep every
  space (`remove_extra_whitespaces=false`).
- transformers 5 builds its tokenizer from `tokenizer.json`; one it derives from a bare
  `tokenizer.model` can cut text differently from sentencepiece (the leading `▁`,
  repeated spaces). We write `tokenizer.json` ourselves from the model proto and check
  its ids against sentencepiece, the ground truth.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from loraforge.errors import LoraforgeError

# SentencePiece piece types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

LLAMA_SAFE_SETTINGS = dict(
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    byte_fallback=True,
    split_digits=True,
    character_coverage=0.9995,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    allow_whitespace_only_pieces=True,
)


def train_spm(
    corpus: Sequence[Path], out_prefix: Path, vocab_size: int, model_type: str = "bpe", **extra
) -> Path:
    """Train a SentencePiece model with llama.cpp-safe settings; returns the .model path."""
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    settings = {**LLAMA_SAFE_SETTINGS, **extra}
    spm.SentencePieceTrainer.train(
        input=[str(p) for p in corpus],
        model_prefix=str(out_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        minloglevel=2,
        **settings,
    )
    return out_prefix.with_suffix(".model")


def load_proto(model_file: Path) -> sp_pb2.ModelProto:
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(model_file).read_bytes())
    except Exception as exc:  # protobuf raises its own DecodeError type
        raise LoraforgeError(f"{model_file}: not a SentencePiece model ({exc})") from None
    if not proto.pieces:
        raise LoraforgeError(f"{model_file}: SentencePiece model has no pieces")
    return proto


def _bpe_merges(vocab: dict[str, int], pieces: Iterable) -> list[tuple[str, str]]:
    """Merges that rebuild every multi-character piece, ranked as sentencepiece would take them.

    SentencePiece BPE merges the adjacent pair whose joined piece has the highest *score*, equal
    scores leftmost first. So: score order, not id order (LLaMA-2 scores its space runs −1e9 but
    gives them ids 259, 268 …; by id they would merge before `▁t`). Among equal scores a rank
    list cannot say "leftmost"; ranking the longer left half first reproduces it for runs of one
    character — `▁`×n builds up from the left, 16 at a time, as in sentencepiece — and is only a
    best effort elsewhere (score-0 pieces of Chinese-LLaMA's recipe), which is why loraforge
    itself encodes SentencePiece vocabularies with sentencepiece (`loraforge.tokenizer`).
    """
    merges = []
    for rank, piece in enumerate(pieces):
        if piece.type != NORMAL and piece.type != USER_DEFINED:
            continue
        text = piece.piece
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                merges.append((-piece.score, -len(left), rank, vocab[left], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def hf_tokenizer_from_spm(model_file: Path) -> Tokenizer:
    """A `tokenizers` object that cuts text exactly like the SentencePiece model."""
    proto = load_proto(model_file)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if norm.name not in ("identity", "") and norm.precompiled_charsmap:
        raise LoraforgeError(
            f"{model_file}: trained with the '{norm.name}' normalizer, which llama.cpp does not apply "
            "(Python and llama.cpp would cut text differently) — retrain with identity normalization"
        )
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = proto.pieces[spec.unk_id].piece if spec.unk_id >= 0 else None
    if spec.model_type == sp_pb2.TrainerSpec.BPE:
        model = models.BPE(
            vocab=vocab, merges=_bpe_merges(vocab, proto.pieces), unk_token=unk,
            fuse_unk=True, byte_fallback=spec.byte_fallback,
        )
    elif spec.model_type == sp_pb2.TrainerSpec.UNIGRAM:
        scored = [(p.piece, p.score) for p in proto.pieces]
        model = models.Unigram(scored, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    else:
        raise LoraforgeError(f"{model_file}: SentencePiece model type {spec.model_type} is not supported (use bpe or unigram)")
    tok = Tokenizer(model)
    # sentencepiece prepends the dummy `▁` even when the text already starts with a space;
    # tokenizers' Metaspace(prepend_scheme="first") does not. A Prepend normalizer does, and
    # like llama.cpp it also prefixes the text that follows a special token.
    steps = [normalizers.Replace(" ", "▁")]
    if norm.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    # control pieces (<s>, </s>, <unk>, a pad) are matched as whole tokens in text, as in llama.cpp
    specials = [p.piece for p in proto.pieces if p.type in (CONTROL, UNKNOWN)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = _piece(proto, spec.bos_id)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, spec.bos_id)]
        )
    return tok


def _piece(proto: sp_pb2.ModelProto, index: int) -> str | None:
    return proto.pieces[index].piece if 0 <= index < len(proto.pieces) else None


def save_hf_tokenizer(model_file: Path, out_dir: Path, pad_token: str | None = None,
                      extra_config: dict | None = None, added_tokens: Sequence[tuple[int, str, bool]] = (),
                      special: dict | None = None) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) for `model_file`
    into out_dir, and tokenizer.model unless it is already there.

    `added_tokens` (id, content, special) follow the pieces (a pad, chat markers); a pad token that
    is not a piece is added after them (id = number of pieces), as Chinese-Alpaca's `[PAD]` is;
    `special` overrides the bos/eos/unk/pad strings; `extra_config` keys (a chat_template,
    model_max_length…) are kept in tokenizer_config.json.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    proto = load_proto(model_file)
    spec = proto.trainer_spec
    tok = hf_tokenizer_from_spm(model_file)
    pieces = {p.piece for p in proto.pieces}
    for index, content, is_special in sorted(added_tokens):
        if index != tok.get_vocab_size(with_added_tokens=True):
            raise LoraforgeError(f"added token {content!r} has id {index}, expected "
                                 f"{tok.get_vocab_size(with_added_tokens=True)}: the ids have a gap")
        token = AddedToken(content, special=is_special, normalized=False)
        if is_special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    if pad_token and pad_token not in pieces and tok.token_to_id(pad_token) is None:
        tok.add_special_tokens([AddedToken(pad_token, special=True, normalized=False)])
    target = out_dir / "tokenizer.model"
    if not target.exists() or target.resolve() != Path(model_file).resolve():
        target.write_bytes(Path(model_file).read_bytes())
    tok.save(str(out_dir / "tokenizer.json"))
    names = {"bos_token": _piece(proto, spec.bos_id), "eos_token": _piece(proto, spec.eos_id),
             "unk_token": _piece(proto, spec.unk_id), "pad_token": pad_token, **(special or {})}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # loads tokenizer.json as written; LlamaTokenizer rebuilds its own pipeline
        **names,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 1_000_000_000,
        **(extra_config or {}),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {k: v for k, v in config.items() if k.endswith("_token") and v and not k.startswith("add")}, indent=2))


def id_mismatches(model_file: Path, tokenizer, texts: Iterable[str]) -> list[tuple[str, list[int], list[int]]]:
    """Texts on which the HF tokenizer and sentencepiece disagree: (text, sp_ids, hf_ids)."""
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    bad = []
    for text in texts:
        want = sp.encode(text)
        got = tokenizer.encode(text, add_special_tokens=False)
        if want != got:
            bad.append((text, want, got))
    return bad
