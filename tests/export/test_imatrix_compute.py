"""`loraforge export imatrix`: llama-imatrix's quantity, computed on the transformers model."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from loraforge.cli import main
from loraforge.export.arch import permute_qk
from loraforge.export.gguf_writer import export_gguf
from loraforge.export.imatrix import load_imatrix
from loraforge.export.imatrix_compute import compute_imatrix, text_chunks

from conftest import DATA_DIR

HELDOUT = DATA_DIR / "zh_heldout.txt"
CTX = 64


def direct_sums(model_dir, ids_chunks):
    """Σ x² per column of each matrix's input, from the hidden states and the layers' own math
    (only the attention output is captured, to rebuild the residual stream before the MLP)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    attn_out: dict[int, torch.Tensor] = {}

    def add(name, x):
        x = x.double().reshape(-1, x.shape[-1])
        sums[name] = sums.get(name, 0) + (x * x).sum(0)

    hooks = [layer.self_attn.register_forward_hook(lambda m, i, o, n=n: attn_out.__setitem__(n, o[0]))
             for n, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for chunk in ids_chunks:
            out = model(input_ids=torch.tensor([chunk]), output_hidden_states=True)
            for n, layer in enumerate(model.model.layers):
                h = out.hidden_states[n]
                x = layer.input_layernorm(h)
                for proj in ("q", "k", "v"):
                    add(f"blk.{n}.attn_{proj}.weight", x)
                mlp_in = layer.post_attention_layernorm(h + attn_out[n])
                add(f"blk.{n}.ffn_gate.weight", mlp_in)
                add(f"blk.{n}.ffn_up.weight", mlp_in)
                add(f"blk.{n}.ffn_down.weight", layer.mlp.act_fn(layer.mlp.gate_proj(mlp_in)) * layer.mlp.up_proj(mlp_in))
            add("output.weight", out.hidden_states[-1])  # transformers' last hidden state is after the final norm
    for h in hooks:
        h.remove()
    return {name: s.numpy() for name, s in sums.items()}


def test_imatrix_is_the_mean_squared_input_per_column(tiny_llama, tmp_path):
    import gguf

    from loraforge.tokenizer import load_tokenizer

    out = compute_imatrix(tiny_llama, HELDOUT, tmp_path / "imatrix.gguf", n_ctx=CTX, max_chunks=3,
                          process_output=True)
    assert (out.chunks, out.chunk_size, out.tokens) == (3, CTX, 3 * CTX)
    tokenizer = load_tokenizer(tiny_llama)
    ids = tokenizer.encode(HELDOUT.read_text(encoding="utf-8"))
    chunks = text_chunks(ids, CTX, tokenizer.bos_token_id, 3)
    assert all(c[0] == tokenizer.bos_token_id for c in chunks)  # llama.cpp puts BOS at every chunk's start
    expected = direct_sums(tiny_llama, chunks)

    ours = load_imatrix(out.path)
    layers = {f"blk.{n}.{t}.weight" for n in range(2)
              for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(ours) == layers | {"output.weight"}  # no token_embd: it is a lookup, not a matrix product
    for name, sums in expected.items():
        np.testing.assert_allclose(ours[name], sums / (3 * CTX), rtol=1e-5, err_msg=name)

    reader = gguf.GGUFReader(out.path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF")}
    assert fields["general.type"] == "imatrix"
    assert fields["imatrix.datasets"] == [str(HELDOUT)]
    assert (fields["imatrix.chunk_count"], fields["imatrix.chunk_size"]) == (3, CTX)
    counts = {t.name: float(t.data.reshape(-1)[0]) for t in reader.tensors if t.name.endswith(".counts")}
    assert set(counts.values()) == {3 * CTX}  # tokens, as llama-imatrix counts them
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert shapes["blk.0.ffn_down.weight.in_sum2"] == [128, 1] and shapes["blk.0.ffn_down.weight.counts"] == [1, 1]


def test_qk_permutation_moves_rows_not_columns():
    """The imatrix is per input column; export permutes attn_q/attn_k rows only, so it needs no permutation."""
    weight = torch.randn(64, 48)
    permuted = permute_qk(weight, 4)
    x = torch.randn(48)
    assert not torch.equal(permuted, weight)
    torch.testing.assert_close(sorted((permuted @ x).tolist()), sorted((weight @ x).tolist()))
    torch.testing.assert_close((permuted ** 2).sum(0), (weight ** 2).sum(0))


def llama_quantize(f32, out, file_type, imatrix):
    """llama.cpp's own quantizer with an importance matrix (as tests/export/test_schemes.py calls it)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = file_type, 2
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    keep = []
    for entry, (name, values) in zip(entries, imatrix.items()):
        values = np.ascontiguousarray(values, dtype=np.float32)
        keep.append(values)
        entry.name, entry.size = name.encode(), values.size
        entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    params.imatrix = entries
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


def test_our_imatrix_drives_export_and_llama_cpp_alike(tiny_llama, tmp_path, capsys):
    import gguf

    im = tmp_path / "im.gguf"
    assert main(["export", "imatrix", str(tiny_llama), "--text", str(HELDOUT), "--ctx", str(CTX), "--chunks", "2",
                 "-o", str(im)]) == 0
    assert "--imatrix" in capsys.readouterr().out
    imatrix = load_imatrix(im)
    assert main(["export", "gguf", "--base", str(tiny_llama), "--quant", "q4_0", "--imatrix", str(im),
                 "-o", str(tmp_path / "ours.gguf")]) == 0
    plain = export_gguf(tiny_llama, [], tmp_path / "plain.gguf", "q4_0")
    f32 = export_gguf(tiny_llama, [], tmp_path / "f32.gguf", "f32")
    theirs = llama_quantize(f32, tmp_path / "theirs.gguf", 2, imatrix)  # LLAMA_FTYPE_MOSTLY_Q4_0

    def data(path):
        return {t.name: bytes(t.data) for t in gguf.GGUFReader(path).tensors}

    ours, llama, without = data(tmp_path / "ours.gguf"), data(theirs), data(plain)
    assert ours["blk.0.attn_q.weight"] == llama["blk.0.attn_q.weight"]
    assert ours["blk.1.ffn_down.weight"] == llama["blk.1.ffn_down.weight"]
    assert ours["blk.0.attn_q.weight"] != without["blk.0.attn_q.weight"]  # the importance changed the rounding


@pytest.mark.parametrize("case", ["no model", "empty text", "short text", "gguf model"])
def test_bad_input_exits_2_and_writes_nothing(case, tiny_llama, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text({"empty text": "  \n", "short text": "春天"}.get(case, "春天来了。" * 200), encoding="utf-8")
    model = {"no model": tmp_path / "missing", "gguf model": tmp_path / "m.gguf"}.get(case, tiny_llama)
    if case == "gguf model":
        model.write_bytes(b"GGUF" + bytes(60))
    out = tmp_path / "out" / "im.gguf"
    assert main(["export", "imatrix", str(model), "--text", str(text), "--ctx", "64", "-o", str(out)]) == 2
    message = capsys.readouterr().err
    assert {"no model": "no such model directory", "empty text": "is empty", "short text": "shorter than one chunk",
            "gguf model": "not a .gguf"}[case] in message
    assert not out.parent.exists() or not any(out.parent.iterdir())
