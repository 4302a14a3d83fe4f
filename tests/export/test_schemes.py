"""Every quantization scheme gives each tensor llama-quantize's type AND bytes.

The reference is llama.cpp itself: our F32 export of the same merged weights, quantized
by `llama_cpp.llama_model_quantize` (the function behind `llama-quantize`). Models are
shaped so the rules have something to decide: 256-wide rows for K-quants, 8 or 16
layers for the "more bits" layers, grouped-query or not, tied or not, and 64-wide rows
that force every fallback.
"""

from __future__ import annotations

import ctypes
import struct
import subprocess
import sys

import numpy as np
import pytest

from loraforge.errors import LoraforgeError
from loraforge.export.gguf_writer import export_gguf
from loraforge.export.imatrix import load_imatrix
from loraforge.export.schemes import SCHEMES

from conftest import random_adapter

QUANTIZED = [name for name in SCHEMES if name not in ("f32", "f16", "bf16")]
WITH_IMATRIX = ["iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq1_s", "iq1_m", "q2_k_s", "q4_0", "iq4_xs",
                "q4_k_m"]


def build(spm_tokenizer, root, **shape):
    from loraforge.tiny import TinyShape, build_tiny_model

    return build_tiny_model(spm_tokenizer, root, TinyShape(**shape))


@pytest.fixture(scope="module")
def models(spm_tokenizer, tiny_llama, tmp_path_factory):
    """name → (base, [adapter]); each merged once to F32 as llama-quantize's input."""
    root = tmp_path_factory.mktemp("schemes")
    bases = {
        "gqa8": build(spm_tokenizer, root / "gqa8", hidden=256, layers=8, heads=8, kv_heads=2, ffn=512),
        "mha16-tied": build(spm_tokenizer, root / "mha16", hidden=256, layers=16, heads=4, kv_heads=4, ffn=256,
                            tie_embeddings=True),
        "narrow": tiny_llama,  # 64-wide rows: no K-quant fits, every fallback is taken
    }
    out = {}
    for name, base in bases.items():
        adapter = random_adapter(base, root / f"{name}-lora", 5, r=4, lora_alpha=8)
        f32 = export_gguf(base, [adapter], root / f"{name}-f32.gguf", "f32")
        out[name] = (base, [adapter], f32)
    return out


def tensors(path):
    import gguf

    reader = gguf.GGUFReader(path)
    file_type = int(reader.fields["general.file_type"].parts[-1][0])
    return file_type, {t.name: (gguf.GGMLQuantizationType(t.tensor_type).name, bytes(t.data)) for t in reader.tensors}


def llama_quantize(f32, out, file_type, imatrix=None):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = file_type, 2
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for entry, (name, values) in zip(entries, imatrix.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(values)
            entry.name, entry.size = name.encode(), values.size
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = entries
    failed = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params))
    return None if failed else out


def random_imatrix(f32, seed=0):
    """Positive importances for every matrix llama-imatrix would measure (all but the embedding)."""
    import gguf

    rng = np.random.default_rng(seed)
    reader = gguf.GGUFReader(f32)
    return {t.name: rng.gamma(2.0, 1.0, int(t.shape[0])).astype(np.float32)
            for t in reader.tensors if len(t.shape) == 2 and t.name != "token_embd.weight"}


def write_gguf_imatrix(path, imatrix, calls=7):
    """The current llama-imatrix format: <name>.in_sum2 and <name>.counts per tensor."""
    import gguf

    writer = gguf.GGUFWriter(path, arch="imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", ["test.txt"])
    writer.add_uint32("imatrix.chunk_count", calls)
    writer.add_uint32("imatrix.chunk_size", 512)
    for name, values in imatrix.items():
        writer.add_tensor(f"{name}.in_sum2", (values * calls).astype(np.float32))
        writer.add_tensor(f"{name}.counts", np.array([calls], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_legacy_imatrix(path, imatrix, calls=3):
    """The legacy imatrix.dat: values stored as mean × ncall."""
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(imatrix)))
        for name, values in imatrix.items():
            f.write(struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", calls, values.size))
            f.write((values * calls).astype("<f4").tobytes())
        f.write(struct.pack("<i", 10) + struct.pack("<i", 8) + b"test.txt")
    return path


def assert_same_as_llama_quantize(ours, reference):
    our_type, our_tensors = tensors(ours)
    their_type, their_tensors = tensors(reference)
    assert our_type == their_type
    assert our_tensors.keys() == their_tensors.keys()
    types = {name: (ours_[0], their_tensors[name][0]) for name, ours_ in our_tensors.items()}
    assert {n: t for n, t in types.items() if t[0] != t[1]} == {}
    differ = [name for name, (_, data) in our_tensors.items() if data != their_tensors[name][1]]
    assert differ == []
    return {t for t, _ in our_tensors.values()}


@pytest.mark.parametrize("model", ["gqa8", "mha16-tied", "narrow"])
@pytest.mark.parametrize("quant", QUANTIZED)
def test_types_and_bytes_equal_llama_quantize(models, tmp_path, model, quant):
    """Without an imatrix: the same file as llama-quantize, or the same refusal."""
    base, adapters, f32 = models[model]
    reference = llama_quantize(f32, tmp_path / "ref.gguf", SCHEMES[quant].file_type)
    if reference is None:  # llama.cpp: "this quantization requires an imatrix!"
        with pytest.raises(LoraforgeError, match="needs an importance matrix"):
            export_gguf(base, adapters, tmp_path / "ours.gguf", quant)
        return
    ours = export_gguf(base, adapters, tmp_path / "ours.gguf", quant)
    assert_same_as_llama_quantize(ours, reference)


@pytest.mark.parametrize("quant", WITH_IMATRIX)
def test_importance_matrix_schemes_equal_llama_quantize(models, tmp_path, quant):
    base, adapters, f32 = models["gqa8"]
    imatrix = write_gguf_imatrix(tmp_path / "imatrix.gguf", random_imatrix(f32))
    # llama-quantize hands llama.cpp in_sum2 / counts, computed in float32 as load_imatrix does
    reference = llama_quantize(f32, tmp_path / "ref.gguf", SCHEMES[quant].file_type, load_imatrix(imatrix))
    assert reference is not None
    ours = export_gguf(base, adapters, tmp_path / "ours.gguf", quant, imatrix=imatrix)
    assert_same_as_llama_quantize(ours, reference)


def test_q4_k_m_mixes_types_like_llama_cpp(models, tmp_path):
    """What a user sees in `llama-quantize`'s log: more bits for output, some attn_v and ffn_down."""
    base, adapters, _ = models["gqa8"]
    _, found = tensors(export_gguf(base, adapters, tmp_path / "m.gguf", "q4_k_m"))
    kinds = {name: kind for name, (kind, _) in found.items()}
    assert kinds["output.weight"] == "Q6_K" and kinds["token_embd.weight"] == "Q4_K"
    # 8 layers: layer 0 and 7 are the first/last eighth, layers 3 and 6 are every third in between
    assert [kinds[f"blk.{i}.attn_v.weight"] for i in range(8)] == ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K",
                                                                    "Q6_K", "Q6_K"]
    assert kinds["blk.1.ffn_down.weight"] == "Q4_K" and kinds["blk.3.ffn_down.weight"] == "Q6_K"
    assert kinds["blk.1.attn_norm.weight"] == "F32"


def test_legacy_and_gguf_imatrix_files_read_the_same(models, tmp_path):
    _, _, f32 = models["gqa8"]
    imatrix = random_imatrix(f32)
    from_gguf = load_imatrix(write_gguf_imatrix(tmp_path / "i.gguf", imatrix))
    from_dat = load_imatrix(write_legacy_imatrix(tmp_path / "i.dat", imatrix))
    assert from_gguf.keys() == from_dat.keys() == imatrix.keys()
    for name, values in imatrix.items():
        np.testing.assert_allclose(from_gguf[name], values, rtol=1e-6)
        np.testing.assert_allclose(from_dat[name], values, rtol=1e-6)


def test_imatrix_schemes_refuse_without_one_and_write_nothing(models, tmp_path):
    base, adapters, _ = models["gqa8"]
    with pytest.raises(LoraforgeError, match=r"--quant iq2_xxs writes blk\.0\.\w+\.weight as IQ2_XXS, which needs an "
                                             r"importance matrix, and no --imatrix was given: .*--imatrix FILE"):
        export_gguf(base, adapters, tmp_path / "x.gguf", "iq2_xxs")
    assert list(tmp_path.iterdir()) == []


def test_imatrix_for_another_model_is_named(models, tmp_path):
    base, adapters, _ = models["gqa8"]
    _, _, narrow_f32 = models["narrow"]
    wrong = write_gguf_imatrix(tmp_path / "other.gguf", random_imatrix(narrow_f32))
    with pytest.raises(LoraforgeError, match=r"importance matrix for output\.weight has 64 values but its "
                                             r"rows hold 256 — it was computed for another model"):
        export_gguf(base, adapters, tmp_path / "x.gguf", "iq4_xs", imatrix=wrong)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("content, match", [
    (b"hi", "ends after 0 bytes .* neither a GGUF imatrix nor a complete legacy imatrix.dat"),
    (struct.pack("<i", -3), "not an importance matrix"),
    (struct.pack("<i", 2) + struct.pack("<i", 4) + b"abcd" + struct.pack("<ii", 1, 8), "ends after 20 bytes"),
])
def test_damaged_imatrix_files_are_explained(tmp_path, content, match):
    path = tmp_path / "bad.dat"
    path.write_bytes(content)
    with pytest.raises(LoraforgeError, match=match):
        load_imatrix(path)


def test_unknown_scheme_lists_the_choices(tiny_llama, tmp_path):
    with pytest.raises(LoraforgeError, match="--quant q9_z is not a llama.cpp quantization; choose one of f32, f16"):
        export_gguf(tiny_llama, [], tmp_path / "x.gguf", "q9_z")


def test_cli_takes_an_imatrix(models, tmp_path):
    base, adapters, f32 = models["gqa8"]
    imatrix = write_legacy_imatrix(tmp_path / "imatrix.dat", random_imatrix(f32))
    out = tmp_path / "cli.gguf"
    done = subprocess.run([sys.executable, "-m", "loraforge", "export", "gguf", "--base", str(base), "--adapter",
                           str(adapters[0]), "--quant", "IQ2_XS", "--imatrix", str(imatrix), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert tensors(out)[0] == SCHEMES["iq2_xs"].file_type
