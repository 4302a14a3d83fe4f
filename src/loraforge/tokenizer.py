"""The one loader of a model folder's tokenizer, the chain rule and the BOS rule.

Every command that turns text into ids — building training examples, the transformers
engine of `chat`/`generate`/`serve`, export's `--verify`, `vocab` — gets its tokenizer
here, so the ids a model is trained on are the ids it is later asked with.

For a SentencePiece vocabulary (a `tokenizer.model` proto: LLaMA-1/2, Mistral,
Chinese-LLaMA) the ids come from `sentencepiece` itself, which is the ground truth and
what llama.cpp reimplements. We do not trust a `tokenizer.json` there, ours or anyone's:
tokenizers' BPE takes merges in one strict rank order, while sentencepiece takes the
highest-*scoring* merge and breaks equal scores by position in the text. Chinese-LLaMA's
recipe gives 17,953 pieces the same score 0, and LLaMA-2 gives its 15 space-run pieces
the same −1e9; no rank list reproduces "leftmost first" among equals (and transformers 5's
own `LlamaTokenizer` pipeline cuts runs of spaces differently again). So
`SentencePieceTokenizer` is a transformers tokenizer whose text segments (between special
tokens, as llama.cpp splits them) are encoded by `sentencepiece`; everything else —
chat templates, special tokens, padding — is transformers' own.

A folder with only a `tokenizer.json` (byte-level BPE: Llama-3, Qwen2; or a LLaMA-style
one written by another tool) is loaded as written, with `PreTrainedTokenizerFast` —
`AutoTokenizer` would rebuild some from their class name and cut text otherwise. A
LLaMA-style `tokenizer.json` whose vocabulary is a SentencePiece model of the chain (the
base's `tokenizer.model`) is read through that model instead.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from loraforge.errors import LoraforgeError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


# ---------------------------------------------------------------- which folder, which model


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / name).exists() for name in ("tokenizer.json", "tokenizer.model"))


def chain_tokenizer_dir(base_dir: Path, adapter_dirs: Sequence[Path] = ()) -> Path:
    """The folder whose tokenizer (and chat template) applies to base + adapters: the last adapter
    that saved one — a later run may have grown the vocabulary or changed the template — else the base."""
    for adapter in reversed([Path(a) for a in adapter_dirs]):
        if has_tokenizer(adapter):
            return adapter
    return Path(base_dir)


def sentencepiece_file(folder: Path) -> Path | None:
    """`folder/tokenizer.model` if it is a SentencePiece proto (Llama-3's original release ships a
    tiktoken file under that name, which is not)."""
    path = Path(folder) / "tokenizer.model"
    if not path.exists():
        return None
    from loraforge.vocab.spm import load_proto

    try:
        load_proto(path)
    except LoraforgeError:
        return None
    return path


def _json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LoraforgeError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def is_llama_spm_pipeline(spec: dict) -> bool:
    """A tokenizer.json that runs LLaMA's SentencePiece pipeline: a BPE model over `▁`-for-space
    pieces with byte fallback. transformers and tokenizers write it three ways — a normalizer
    Sequence[Prepend('▁'), Replace(' ', '▁')] (tokenizers' own LLaMA conversion, and ours), a
    Metaspace pre-tokenizer (transformers 5's LlamaTokenizer / TokenizersBackend), or both halves
    split between normalizer and pre-tokenizer — all of which llama.cpp's `llama` vocabulary
    implements (`add_space_prefix`, `▁` for spaces)."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    if '"ByteLevel"' in text:
        return False
    return '"Metaspace"' in text or ('"Replace"' in text and "▁" in text)


def _vocab_of_tokenizer_json(spec: dict) -> dict[str, int]:
    return dict((spec.get("model") or {}).get("vocab") or {})


def _same_pieces(spec: dict, model_file: Path) -> bool:
    from loraforge.vocab.spm import load_proto

    vocab = _vocab_of_tokenizer_json(spec)
    pieces = load_proto(model_file).pieces
    return len(vocab) == len(pieces) and all(vocab.get(p.piece) == i for i, p in enumerate(pieces))


def find_sentencepiece(folder: Path, fallbacks: Sequence[Path] = ()) -> Path | None:
    """The SentencePiece model that is the ground truth for `folder`'s ids: its own tokenizer.model,
    or — for a tokenizer.json-only folder from another tool whose pipeline is LLaMA's and whose
    vocabulary is exactly a fallback folder's tokenizer.model (the base's) — that one."""
    own = sentencepiece_file(folder)
    if own is not None:
        return own
    spec = _json(Path(folder) / "tokenizer.json")
    if not spec or not is_llama_spm_pipeline(spec):
        return None
    for other in fallbacks:
        candidate = sentencepiece_file(other)
        if candidate is not None and _same_pieces(spec, candidate):
            return candidate
    return None


# ---------------------------------------------------------------- loading


def load_tokenizer(folder: Path, fallbacks: Sequence[Path] = (), trust_remote_code: bool = False):
    """The tokenizer saved in `folder` (a base, a run or an adapter dir), chat template included.

    `fallbacks`: folders whose tokenizer.model may stand in for a tokenizer.json-only `folder`
    with the same vocabulary (the chain's base). `trust_remote_code`: a folder with neither file
    but its own tokenizer code (asked for explicitly) goes through AutoTokenizer. Raises
    LoraforgeError naming the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoraforgeError(f"no such model directory: {folder} — pass a model, run or tokenizer directory")
    model_file = find_sentencepiece(folder, fallbacks)
    if model_file is not None:
        return sentencepiece_tokenizer(folder, model_file)
    if (folder / "tokenizer.json").exists():
        return _load_tokenizer_json(folder)
    if trust_remote_code:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        except (OSError, ValueError) as exc:
            raise LoraforgeError(f"cannot load a tokenizer from {folder} ({exc})") from None
    raise LoraforgeError(f"{folder}: no tokenizer.model or tokenizer.json — copy the base model's tokenizer "
                         "files into it (the tokenizer comes from the last adapter that has one, else the base)")


def load_chain_tokenizer(base_dir: Path, adapter_dirs: Sequence[Path] = ()):
    """The tokenizer of base + adapters (see `chain_tokenizer_dir`), the base's SentencePiece model
    standing in for an adapter's tokenizer.json with the same vocabulary."""
    folders = [Path(base_dir), *[Path(a) for a in adapter_dirs]]
    source = chain_tokenizer_dir(base_dir, adapter_dirs)
    return load_tokenizer(source, fallbacks=[f for f in reversed(folders) if f != source])


def load_tokenizer_json(folder: Path):
    """`folder/tokenizer.json` exactly as written: what plain transformers users of other tools get
    (`vocab merge` measures its agreement with sentencepiece through this)."""
    return _load_tokenizer_json(Path(folder))


def _special_kwargs(config: dict) -> dict:
    out = {}
    for key in _SPECIAL_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value:
            out[key] = value
    return out


def chat_template_in(folder: Path) -> str | None:
    """The chat template saved with a tokenizer: tokenizer_config.json's, or transformers 5's
    separate chat_template.jinja."""
    config = _json(Path(folder) / "tokenizer_config.json")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": …}, …]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template:
        return template
    jinja = Path(folder) / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.exists() else None


def _load_tokenizer_json(folder: Path):
    from transformers import PreTrainedTokenizerFast

    config = _json(folder / "tokenizer_config.json")
    try:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **_special_kwargs(config),
                                            clean_up_tokenization_spaces=False)
    except Exception as exc:  # tokenizers raises its own Exception type for a malformed file
        raise LoraforgeError(f"{folder}/tokenizer.json: cannot be loaded ({exc})") from None
    tokenizer.chat_template = chat_template_in(folder)
    if config.get("model_max_length"):
        tokenizer.model_max_length = int(config["model_max_length"])
    return tokenizer


def _added_after(folder: Path, n_pieces: int) -> dict[int, tuple[str, bool]]:
    """id → (content, special) of tokens a tokenizer adds after the SentencePiece pieces (a pad,
    chat markers), from tokenizer.json or tokenizer_config.json's added_tokens_decoder."""
    found: dict[int, tuple[str, bool]] = {}
    for token in _json(folder / "tokenizer.json").get("added_tokens", []):
        found[int(token["id"])] = (token["content"], bool(token.get("special", False)))
    for index, token in (_json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}).items():
        found.setdefault(int(index), (token["content"], bool(token.get("special", False))))
    return {i: found[i] for i in sorted(found) if i >= n_pieces}


def sentencepiece_tokenizer(folder: Path, model_file: Path):
    """A transformers tokenizer over `model_file` whose ids are sentencepiece's (module docstring),
    with the special tokens, added tokens and chat template saved in `folder`."""
    return _sentencepiece_class().from_folder(folder, model_file)


def is_sentencepiece(tokenizer) -> bool:
    """Whether ids come from sentencepiece itself (SentencePieceTokenizer)."""
    return getattr(tokenizer, "exact_sentencepiece", False)


@functools.cache
def _sentencepiece_class():
    # defined on first use: importing this module must not import transformers
    from tokenizers import AddedToken
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    from loraforge.vocab.spm import load_proto

    class SentencePieceTokenizer(SentencePieceBackend):
        exact_sentencepiece = True
        vocab_files_names = {"vocab_file": "tokenizer.model"}
        model_input_names = ["input_ids", "attention_mask"]

        def __init__(self, vocab_file: str, add_bos_token: bool = True, add_eos_token: bool = False,
                     source_dir: str | None = None, **kwargs):
            self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
            self.source_dir = source_dir
            kwargs.setdefault("clean_up_tokenization_spaces", False)
            super().__init__(vocab_file=vocab_file, legacy=True, **kwargs)
            # llama.cpp splits out control pieces (<s>, </s>, <unk>) found in text whatever the
            # tokenizer_config says; so do we, so that a rendered chat prompt gets the same ids
            for index in range(self.sp_model.get_piece_size()):
                if self.sp_model.is_control(index) or self.sp_model.is_unknown(index):
                    piece = self.sp_model.id_to_piece(index)
                    if piece not in self._added_tokens_encoder:
                        self._added_tokens_decoder[index] = AddedToken(piece, special=True, normalized=False)
                        self._added_tokens_encoder[piece] = index
            self._update_trie()

        @classmethod
        def from_folder(cls, folder: Path, model_file: Path):
            folder = Path(folder)
            config = _json(folder / "tokenizer_config.json")
            proto = load_proto(model_file)
            spec, n = proto.trainer_spec, len(proto.pieces)
            special = {}
            for key, index in (("bos_token", spec.bos_id), ("eos_token", spec.eos_id), ("unk_token", spec.unk_id),
                               ("pad_token", spec.pad_id)):
                if 0 <= index < n:
                    special[key] = proto.pieces[index].piece
            special.update(_special_kwargs(config))
            added = _added_after(folder, n)
            expected = n
            decoder = {}
            for index, (content, is_special) in added.items():
                if index != expected:
                    raise LoraforgeError(f"{folder}: added token {content!r} has id {index} but the "
                                         f"{n}-piece tokenizer.model and the tokens before it end at {expected - 1} "
                                         "— the ids have a gap; the tokenizer files do not belong together")
                decoder[index] = AddedToken(content, special=is_special, normalized=False, lstrip=False, rstrip=False)
                expected += 1
            tokenizer = cls(vocab_file=str(model_file), added_tokens_decoder=decoder,
                            add_bos_token=bool(config.get("add_bos_token", True)),
                            add_eos_token=bool(config.get("add_eos_token", False)), source_dir=str(folder),
                            **special)
            tokenizer.chat_template = chat_template_in(folder)
            if config.get("model_max_length"):
                tokenizer.model_max_length = int(config["model_max_length"])
            return tokenizer

        # --- encoding: segments between special tokens go to sentencepiece whole
        def _tokenize(self, text, **kwargs):
            # sentencepiece puts the dummy `▁` in front of every segment, as llama.cpp does at the
            # start and after each special token
            return self.sp_model.encode(text, out_type=str)

        def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
            bos = [self.bos_token_id] if self.add_bos_token and self.bos_token_id is not None else []
            eos = [self.eos_token_id] if self.add_eos_token and self.eos_token_id is not None else []
            out = bos + token_ids_0 + eos
            return out if token_ids_1 is None else out + bos + token_ids_1 + eos

        def num_special_tokens_to_add(self, pair: bool = False) -> int:
            return len(self.build_inputs_with_special_tokens([], [] if pair else None))

        # --- decoding: runs of pieces through sentencepiece, added tokens as their text
        def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
            # runs of pieces through sentencepiece's decoder (bytes joined, the dummy-prefix space
            # of a run's first piece dropped, as tokenizer.json's decoder does); added and control
            # tokens as their text, or nothing with skip_special_tokens
            ids = [int(token_ids)] if isinstance(token_ids, int) else [int(t) for t in token_ids]
            pieces, special = self.sp_model.get_piece_size(), set(self.all_special_ids)
            out, run = [], []
            for token in ids:
                if token < pieces and not (self.sp_model.is_control(token) or self.sp_model.is_unknown(token)):
                    run.append(token)
                    continue
                if run:
                    out.append(self.sp_model.decode(run))
                    run = []
                added = self._added_tokens_decoder.get(token)
                if added is None and token >= pieces:
                    continue  # a padding row past the tokenizer (the embedding may be larger): no text
                if not (skip_special_tokens and (token in special or token < pieces)):
                    out.append(added.content if added is not None else self.sp_model.id_to_piece(token))
            if run:
                out.append(self.sp_model.decode(run))
            return "".join(out)

        def save_pretrained(self, save_directory, *args, **kwargs):
            return save_tokenizer(self, Path(save_directory))

        @property
        def model_file(self) -> Path:
            return Path(self.vocab_file)

        def segment(self, text: str) -> list[tuple[str, str]]:
            """(piece, the text it covers) for each id of a plain text; every byte piece of a character
            covers that character (sentencepiece gives it to the last one)."""
            pieces = list(self.sp_model.encode(text, return_type="proto").pieces)
            out, covered = [], ""
            for piece in reversed(pieces):
                is_byte = self.sp_model.is_byte(self.sp_model.piece_to_id(piece.piece))
                covered = piece.surface or (covered if is_byte else "")
                out.append((piece.piece, covered))
            return out[::-1]

    return SentencePieceTokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything that decides a tokenizer's ids (the tokenized-data cache key)."""
    import hashlib

    digest = hashlib.sha256()
    if is_sentencepiece(tokenizer):
        digest.update(tokenizer.sp_model.serialized_model_proto())
    elif hasattr(tokenizer, "backend_tokenizer"):
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps(sorted((i, t.content, t.special) for i, t in tokenizer.added_tokens_decoder.items()))
                  .encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- saving


def save_tokenizer(tokenizer, out_dir: Path, chat_template: str | None = None) -> None:
    """Write the tokenizer into a run or model dir so that loraforge, plain transformers and llama.cpp
    read the same one: a SentencePiece tokenizer as tokenizer.model + the tokenizer.json loraforge
    derives from it + tokenizer_config.json (`PreTrainedTokenizerFast`, which every transformers
    version loads as written); a tokenizer.json one as its files, with the class name any version
    knows (transformers 5 writes `TokenizersBackend`, which 4.x cannot load)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    template = chat_template if chat_template is not None else tokenizer.chat_template
    if is_sentencepiece(tokenizer):
        from loraforge.vocab.spm import save_hf_tokenizer

        source = Path(tokenizer.source_dir) if tokenizer.source_dir else None
        extra = {k: v for k, v in _json(source / "tokenizer_config.json").items()
                 if k in ("model_max_length", "padding_side")} if source else {}
        extra.update(add_bos_token=tokenizer.add_bos_token, add_eos_token=tokenizer.add_eos_token)
        if template:
            extra["chat_template"] = template
        added = [(i, t.content, t.special) for i, t in sorted(tokenizer.added_tokens_decoder.items())
                 if i >= tokenizer.sp_model.get_piece_size()]
        model_file = tokenizer.model_file
        if model_file.resolve() != (out_dir / "tokenizer.model").resolve():
            shutil.copyfile(model_file, out_dir / "tokenizer.model")
        save_hf_tokenizer(out_dir / "tokenizer.model", out_dir, added_tokens=added,
                          special={k: getattr(tokenizer, k) for k in _SPECIAL_KEYS}, extra_config=extra)
        return
    tokenizer.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = _json(config_path)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if template:
        config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)  # one home for the template: the config


def copy_tokenizer_files(source: Path, out_dir: Path) -> None:
    """Copy a folder's tokenizer files as they are (merge/export of a model dir)."""
    for name in TOKENIZER_FILES:
        if (Path(source) / name).exists():
            shutil.copyfile(Path(source) / name, Path(out_dir) / name)


# ---------------------------------------------------------------- the BOS rule


def starts_with_bos(tokenizer, text: str) -> bool:
    """A template that writes BOS itself (Llama-3's): the tokenizer must not add a second one."""
    return bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A rendered prompt's ids, with exactly one BOS where the tokenizer adds one."""
    return tokenizer.encode(text, add_special_tokens=not starts_with_bos(tokenizer, text))
