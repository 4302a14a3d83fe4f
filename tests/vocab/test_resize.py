"""`vocab resize`: embed_tokens and lm_head grown, new rows from the base pieces of each token."""

from __future__ import annotations

import json
import math

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraforge.cli import main
from loraforge.errors import LoraforgeError
from loraforge.vocab.resize import resize_model


def _weights(folder):
    tensors = load_file(folder / "model.safetensors")
    return tensors["model.embed_tokens.weight"], tensors["lm_head.weight"]


@pytest.mark.parametrize("pad_to", [None, 64])
def test_new_rows_are_the_mean_of_their_base_pieces(small_base_random, extended_tokenizer, tmp_path, pad_to):
    out = tmp_path / "resized"
    result = resize_model(small_base_random, extended_tokenizer, out, pad_to)
    tokenizer = AutoTokenizer.from_pretrained(out)
    base_tok = AutoTokenizer.from_pretrained(small_base_random)
    n_base, n_new = len(base_tok), len(tokenizer)
    rows = math.ceil(n_new / 64) * 64 if pad_to else n_new
    assert (result.old_rows, result.new_rows, result.tokenizer_size) == (n_base, rows, n_new)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    old_embed, old_head = _weights(small_base_random)
    embed, head = _weights(out)
    assert embed.shape == head.shape == (rows, old_embed.shape[1])
    assert torch.equal(embed[:n_base], old_embed) and torch.equal(head[:n_base], old_head)

    # a multi-character piece: its row is the mean of the rows of the pieces the base cuts it into
    sp = spm.SentencePieceProcessor(model_file=str(small_base_random / "tokenizer.model"))
    piece_id = next(i for i in range(n_base, n_new) if len(tokenizer.convert_ids_to_tokens(i).strip("▁")) >= 2)
    piece = tokenizer.convert_ids_to_tokens(piece_id)
    parts = sp.encode(piece.replace("▁", " ").lstrip()) if not piece.startswith("▁") else sp.encode(piece[1:])
    if not piece.startswith("▁") and parts and sp.id_to_piece(parts[0]) == "▁":
        parts = parts[1:]  # the dummy prefix a whole text gets; the piece sits inside a text
    assert torch.allclose(embed[piece_id], old_embed[parts].mean(0), atol=1e-6), (piece, sp.id_to_piece(parts))
    assert torch.allclose(head[piece_id], old_head[parts].mean(0), atol=1e-6)
    if pad_to:
        assert torch.allclose(embed[-1], old_embed.mean(0), atol=1e-6)  # padding rows: mean of all rows
    assert result.from_pieces + result.from_mean == rows - n_base
    assert (out / "tokenizer.model").read_bytes() == (extended_tokenizer / "tokenizer.model").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == rows


def test_command_and_refusals(small_base_random, extended_tokenizer, tiny_llama, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["vocab", "resize", "--model", str(small_base_random), "--tokenizer", str(extended_tokenizer),
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "embeddings 1500 → " in printed and "mean of their base pieces" in printed
    # tiny_llama's tokenizer is another vocabulary altogether: its ids mean other pieces
    with pytest.raises(LoraforgeError, match=r"does not extend the model's .* id \d+ is"):
        resize_model(tiny_llama, extended_tokenizer, tmp_path / "x")
    with pytest.raises(LoraforgeError, match="nothing to resize"):
        resize_model(out, extended_tokenizer, tmp_path / "y")
    with pytest.raises(LoraforgeError, match="exists and is not empty"):
        resize_model(small_base_random, extended_tokenizer, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]


def test_tied_embeddings_stay_tied(tiny_tied, zh_model, tmp_path):
    from loraforge.vocab.merge import merge_vocab

    tokenizer = merge_vocab(tiny_tied, zh_model, tmp_path / "tok").out_dir
    result = resize_model(tiny_tied, tokenizer, tmp_path / "out", pad_to=128)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert result.tied and embed.shape[0] == head.shape[0] == result.new_rows and result.new_rows % 128 == 0
    assert embed.data_ptr() == head.data_ptr()
    old = AutoModelForCausalLM.from_pretrained(tiny_tied).get_input_embeddings().weight
    assert torch.equal(embed[: old.shape[0]], old)
    assert "lm_head is tied" in result.describe()
