"""`loraforge vocab resize`: grow embed_tokens and lm_head to an extended tokenizer.

Each new row starts as the mean of the base rows of the pieces the *base* tokenizer cuts
that token into (`中国` → the rows of `中` and `国`, or of its UTF-8 byte pieces), the
same for lm_head; a token the base cannot cut (a special token) and any padding row get
the mean of all base rows. Chinese-LLaMA resized with random rows; LLaMA-Factory's
`resize_vocab` the mean of all rows plus noise (Hewitt 2021); the mean of the pieces is
FVT's (Gee et al. 2022). Measured on the tests' tiny model
(tests/vocab/test_init.py): the new tokens start better predicted than with random rows,
but the old ones worse — output rows that resemble their pieces take probability from
those pieces — so the whole-text loss at the start is not lower there.

The new tokenizer must extend the model's own: its first ids must be the base's pieces,
or every trained row would be read as another token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge.errors import LoraforgeError
from loraforge.models import check_model_dir
from loraforge.outputs import check_new_dir, new_dir
from loraforge.tokenizer import copy_tokenizer_files, load_tokenizer


@dataclass
class Resized:
    old_rows: int
    new_rows: int
    tokenizer_size: int
    from_pieces: int  # new rows initialised from the base pieces of their token
    from_mean: int  # special tokens and padding rows: the mean of all base rows
    tied: bool

    def describe(self) -> str:
        pad = self.new_rows - self.tokenizer_size
        return (f"embeddings {self.old_rows} → {self.new_rows} rows ({self.tokenizer_size} tokens"
                f"{f' + {pad} padding rows' if pad else ''}): {self.from_pieces} new rows start as the mean of "
                f"their base pieces, {self.from_mean} as the mean of all rows"
                f"{'; lm_head is tied to them' if self.tied else ', the same for lm_head'}")


def padded_rows(tokens: int, pad_to: int | None) -> int:
    return math.ceil(tokens / pad_to) * pad_to if pad_to else tokens


def _base_cutter(base_dir: Path, base_tokenizer):
    """text → base ids, without the dummy `▁` a whole text gets (a new piece is part of a text)."""
    model_file = Path(base_dir) / "tokenizer.model"
    if model_file.exists():
        import sentencepiece as spm

        from loraforge.vocab.spm import load_proto

        proto = load_proto(model_file)
        proto.normalizer_spec.add_dummy_prefix = False
        processor = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        return lambda piece: processor.encode(piece.replace("▁", " "))
    return lambda piece: base_tokenizer.encode(base_tokenizer.convert_tokens_to_string([piece]),
                                                add_special_tokens=False)


def check_extends(base_tokenizer, new_tokenizer, base_name: str, new_name: str) -> None:
    """The new tokenizer keeps every base id: else trained rows would be read as other tokens."""
    base_vocab, new_vocab = base_tokenizer.get_vocab(), new_tokenizer.get_vocab()
    for piece, index in sorted(base_vocab.items(), key=lambda item: item[1]):
        if new_vocab.get(piece) != index:
            other = new_tokenizer.convert_ids_to_tokens(index) if index < len(new_tokenizer) else None
            raise LoraforgeError(
                f"the tokenizer in {new_name} does not extend the model's ({base_name}): id {index} is {piece!r} "
                f"there but {other!r} here — resizing would give trained rows to other tokens; build the "
                "tokenizer with vocab merge --base on the model's own tokenizer")


def grow_embeddings(model, base_dir: Path, new_tokenizer, pad_to: int | None = None,
                    new_name: str = "the new tokenizer") -> Resized:
    """Resize `model` in place to `new_tokenizer` (rows padded to a multiple of `pad_to`)."""
    embed = model.get_input_embeddings()
    old_rows = embed.weight.shape[0]
    try:
        base_tokenizer = load_tokenizer(base_dir)
    except LoraforgeError:
        base_tokenizer = None  # a model without its tokenizer: every new row gets the mean
    if base_tokenizer is not None and len(base_tokenizer) > old_rows:
        base_tokenizer = None  # the dir already holds the larger tokenizer: the model's own is unknown
    base_size = len(base_tokenizer) if base_tokenizer is not None else old_rows
    if base_tokenizer is not None:
        check_extends(base_tokenizer, new_tokenizer, str(base_dir), new_name)
    new_size = len(new_tokenizer)
    rows = max(padded_rows(new_size, pad_to), old_rows)
    if rows == old_rows and new_size <= base_size:
        raise LoraforgeError(f"the model already has {old_rows} embedding rows for {new_size} tokens: nothing to resize")
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embed.weight.data_ptr()
    # only the rows of real base tokens: padding rows of a padded base carry nothing
    old_in = embed.weight.detach()[:base_size].float().clone()
    old_out = output.weight.detach()[:base_size].float().clone() if output is not None and not tied else None

    model.resize_token_embeddings(rows, mean_resizing=False)
    embed = model.get_input_embeddings()
    output = model.get_output_embeddings()
    cut = _base_cutter(base_dir, base_tokenizer) if base_tokenizer is not None else None
    special = set(new_tokenizer.all_special_ids) | {
        i for i, t in new_tokenizer.added_tokens_decoder.items() if t.special}
    from_pieces = from_mean = 0
    with torch.no_grad():
        for index in range(base_size, rows):
            parts = []
            if cut is not None and index < new_size and index not in special:
                parts = [i for i in cut(new_tokenizer.convert_ids_to_tokens(index)) if i < base_size]
            if parts:
                from_pieces += 1
                embed.weight[index] = old_in[parts].mean(0).to(embed.weight.dtype)
                if old_out is not None:
                    output.weight[index] = old_out[parts].mean(0).to(output.weight.dtype)
            else:
                from_mean += 1
                embed.weight[index] = old_in.mean(0).to(embed.weight.dtype)
                if old_out is not None:
                    output.weight[index] = old_out.mean(0).to(output.weight.dtype)
    return Resized(old_rows, rows, new_size, from_pieces, from_mean, tied)


def load_new_tokenizer(tokenizer_dir: Path):
    try:
        return load_tokenizer(tokenizer_dir)
    except LoraforgeError as exc:
        raise LoraforgeError(f"--tokenizer {tokenizer_dir}: cannot load a tokenizer there ({exc})") from None


def resize_model(model_dir: Path, tokenizer_dir: Path, out_dir: Path, pad_to: int | None = None) -> Resized:
    """Write `out_dir`: the model with grown embeddings, and the new tokenizer in place of its own."""
    from transformers import AutoModelForCausalLM

    model_dir, tokenizer_dir, out_dir = Path(model_dir), Path(tokenizer_dir), Path(out_dir)
    if pad_to is not None and pad_to <= 0:
        raise LoraforgeError(f"--pad-to {pad_to}: a positive multiple such as 64")
    check_new_dir(out_dir)
    check_model_dir(model_dir, "--model")
    if not (model_dir / "config.json").exists():
        raise LoraforgeError(f"--model {model_dir}: no config.json — pass a HF model directory")
    new_tokenizer = load_new_tokenizer(tokenizer_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    except OSError as exc:
        raise LoraforgeError(f"--model {model_dir}: cannot load a model there ({exc})") from None
    result = grow_embeddings(model, model_dir, new_tokenizer, pad_to, str(tokenizer_dir))
    with new_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer_files(tokenizer_dir, tmp)
        config = json.loads((tmp / "config.json").read_text())
        assert config["vocab_size"] == result.new_rows, config["vocab_size"]
    return result
