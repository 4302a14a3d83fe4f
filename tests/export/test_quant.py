"""Quantizing one tensor with ggml's kernels: sizes, bytes, round trips, threads, errors."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from loraforge.errors import LoraforgeError
from loraforge.export.quant import (
    GGMLType,
    block_size,
    dequantize,
    ggml_name,
    needs_imatrix,
    quantize,
    row_bytes,
    type_size,
)

T = GGMLType
TYPES = [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
         T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]

# (values per block, bytes per block) as the GGUF spec documents them: a GGUF file's size.
LAYOUT = {T.F16: (1, 2), T.BF16: (1, 2), T.Q8_0: (32, 34), T.Q4_0: (32, 18), T.Q4_1: (32, 20),
          T.Q5_0: (32, 22), T.Q5_1: (32, 24), T.Q2_K: (256, 84), T.Q3_K: (256, 110),
          T.Q4_K: (256, 144), T.Q5_K: (256, 176), T.Q6_K: (256, 210), T.IQ4_NL: (32, 18),
          T.IQ4_XS: (256, 136)}

# Relative RMS error of a round trip on Gaussian rows, with ~30-40 % headroom over what
# ggml achieves; a kernel bound to the wrong type or a mangled layout blows far past these.
MAX_REL_RMS = {T.F16: 0.001, T.BF16: 0.005, T.Q8_0: 0.008, T.Q4_0: 0.12, T.Q4_1: 0.11,
               T.Q5_0: 0.06, T.Q5_1: 0.055, T.Q2_K: 0.40, T.Q3_K: 0.20, T.Q4_K: 0.10,
               T.Q5_K: 0.05, T.Q6_K: 0.025, T.IQ4_NL: 0.10, T.IQ4_XS: 0.10}

IMATRIX_TYPES = [T.IQ2_XXS, T.IQ2_XS, T.IQ1_S]


def weights(rows: int = 12, n_per_row: int = 512, seed: int = 0) -> np.ndarray:
    """Gaussian rows with different scales per row, like a real weight matrix."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.005, 0.2, size=(rows, 1))
    return (rng.standard_normal((rows, n_per_row)) * scale).astype(np.float32)


def rel_rms(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x - y) ** 2) / np.mean(x**2)))


def q8_0_reference(x: np.ndarray) -> bytes:
    """Q8_0 as documented: per 32 values an fp16 scale d = max|x|/127, then round(x/d) as int8."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    scaled = (blocks * inv).astype(np.float64)
    q = (np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)).astype(np.int8)  # C roundf: half away from 0
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return out.tobytes()


def bf16_reference(x: np.ndarray) -> bytes:
    """fp32 → bf16 rounding to nearest even on the upper 16 bits."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


@pytest.mark.parametrize("t", list(GGMLType), ids=lambda t: t.name)
def test_every_type_has_ggmls_number(t):
    # Loading libggml checks each number against ggml_type_name; llama-cpp-python's own
    # constants are a second opinion where it has them.
    assert row_bytes(t, 256 * 4) > 0
    assert ggml_name(t).upper() == t.name
    if hasattr(llama_cpp, f"GGML_TYPE_{t.name}"):
        assert getattr(llama_cpp, f"GGML_TYPE_{t.name}") == t


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_block_layout_is_ggufs(t):
    assert (block_size(t), type_size(t)) == LAYOUT[t]
    assert row_bytes(t, 4096) == 4096 // LAYOUT[t][0] * LAYOUT[t][1]


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_output_is_rows_times_row_bytes(t):
    x = weights(rows=5, n_per_row=768)
    data = quantize(x, t)
    assert data.dtype == np.uint8 and data.shape == (5 * row_bytes(t, 768),)


def test_q8_0_bytes_equal_the_documented_layout():
    x = weights(rows=6, n_per_row=256)
    x[2] = 0.0  # all-zero blocks: d = 0 and no division by zero
    x[3, :32] = np.linspace(-1, 1, 32)  # exact extremes map to ±127
    assert quantize(x, T.Q8_0).tobytes() == q8_0_reference(x)


def test_float_types_bytes_equal_numpy():
    x = weights(rows=3, n_per_row=64)
    x[0, :4] = [65504.0, 1e-8, -0.0, 3.14159]  # fp16 max, fp16 subnormal, signed zero
    assert quantize(x, T.F32).tobytes() == x.tobytes()
    assert quantize(x, T.F16).tobytes() == x.astype(np.float16).tobytes()
    assert quantize(x, T.BF16).tobytes() == bf16_reference(x)


@pytest.mark.parametrize("t", [T.F32, *TYPES], ids=lambda t: t.name)
def test_round_trip_is_close(t):
    x = weights()
    back = dequantize(quantize(x, t), t, x.shape)
    assert back.shape == x.shape and back.dtype == np.float32
    assert rel_rms(x, back) <= MAX_REL_RMS.get(t, 0.0)


def test_fewer_bits_lose_more():
    x = weights()
    order = [T.Q8_0, T.Q6_K, T.Q5_K, T.Q4_K, T.Q3_K, T.Q2_K]
    errors = [rel_rms(x, dequantize(quantize(x, t), t, x.shape)) for t in order]
    assert errors == sorted(errors), dict(zip([t.name for t in order], errors))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_thread_count_does_not_change_bytes(t):
    x = weights(rows=7, n_per_row=512)  # 7 rows: uneven splits over 2 and 3 threads
    one = quantize(x, t, threads=1).tobytes()
    assert quantize(x, t, threads=2).tobytes() == one
    assert quantize(x, t, threads=3).tobytes() == one
    assert quantize(x, t, threads=16).tobytes() == one  # more threads than rows


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_same_input_same_bytes(t):
    x = weights(rows=4)
    before = x.copy()
    assert quantize(x, t).tobytes() == quantize(x, t).tobytes()
    assert np.array_equal(x, before)


def test_one_row_vector_is_one_row():
    x = weights(rows=1, n_per_row=256)
    assert quantize(x[0], T.Q4_K).tobytes() == quantize(x, T.Q4_K).tobytes()


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_dtypes_are_converted(dtype):
    x = weights(rows=2, n_per_row=256).astype(np.float16)
    assert quantize(x.astype(dtype), T.Q6_K).tobytes() == quantize(x.astype(np.float32), T.Q6_K).tobytes()


@pytest.mark.parametrize("t", [T.Q2_K, T.Q4_K, T.IQ4_XS], ids=lambda t: t.name)
def test_imatrix_protects_the_columns_it_weights(t):
    # Every 8th column is "important", so each block holds both kinds and the kernel must
    # trade one against the other — which it does only if the imatrix reaches it.
    x = weights(rows=16, n_per_row=256)
    importance = np.full(256, 0.01, np.float32)
    importance[::8] = 100.0
    plain = dequantize(quantize(x, t), t, x.shape)[:, ::8]
    guided = dequantize(quantize(x, t, imatrix=importance), t, x.shape)[:, ::8]
    assert rel_rms(x[:, ::8], guided) < 0.75 * rel_rms(x[:, ::8], plain)


@pytest.mark.parametrize("t", IMATRIX_TYPES, ids=lambda t: t.name)
def test_imatrix_types_refuse_without_one(t):
    assert needs_imatrix(t)
    with pytest.raises(LoraforgeError, match=rf"blk\.0\.ffn_up\.weight: {t.name} needs .*--imatrix FILE"):
        quantize(weights(rows=2, n_per_row=256), t, name="blk.0.ffn_up.weight")


# IQ1_S is left out: building its lattice (ggml_quantize_init) alone takes ~8 s.
@pytest.mark.parametrize("t", [T.IQ2_XXS, T.IQ2_XS], ids=lambda t: t.name)
def test_imatrix_types_work_with_uniform_imatrix(t):
    x = weights(rows=4, n_per_row=256)
    data = quantize(x, t, imatrix=np.ones(256, np.float32))
    assert data.shape == (4 * row_bytes(t, 256),)
    assert rel_rms(x, dequantize(data, t, x.shape)) < 0.6


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_needs_no_imatrix(t):
    assert not needs_imatrix(t)


@pytest.mark.parametrize(("t", "n_per_row"), [(T.Q4_K, 4096 + 32), (T.Q8_0, 48), (T.IQ4_XS, 128)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_row_length_not_a_multiple_of_the_block(t, n_per_row):
    block = block_size(t)
    with pytest.raises(LoraforgeError) as err:
        quantize(weights(rows=2, n_per_row=n_per_row), t, name="token_embd.weight")
    message = str(err.value)
    for part in ("token_embd.weight", t.name, f"rows of {n_per_row} values", f"hold {block} values",
                 "llama.cpp falls back to another type"):
        assert part in message


@pytest.mark.parametrize(
    ("x", "imatrix", "threads", "match"),
    [
        (np.arange(512, dtype=np.int32).reshape(2, 256), None, None, "int32.*floating-point"),
        (np.zeros((2, 2, 256), np.float32), None, None, r"shape \(2, 2, 256\).*one expert at a time"),
        (np.zeros((2, 256), np.float32), np.ones(128, np.float32), None,
         r"importance matrix has shape \(128,\) but rows hold 256"),
        (np.zeros((2, 256), np.float32), None, 0, "threads=0"),
    ],
    ids=["integers", "3-D", "imatrix-length", "zero-threads"],
)
def test_bad_input_is_explained(x, imatrix, threads, match):
    with pytest.raises(LoraforgeError, match=match):
        quantize(x, T.Q4_K, imatrix=imatrix, threads=threads, name="w")


def test_non_finite_weights_are_located():
    x = weights(rows=3, n_per_row=256)
    x[1, 7], x[2, 0] = np.nan, np.inf
    with pytest.raises(LoraforgeError, match=r"output\.weight: 2 of 768 .* row 1, column 7"):
        quantize(x, T.Q8_0, name="output.weight")


def test_dequantize_rejects_a_wrong_size():
    data = quantize(weights(rows=2, n_per_row=256), T.Q4_K)
    with pytest.raises(LoraforgeError, match=r"288 bytes can't be Q4_K of shape \(3, 256\)"):
        dequantize(data, T.Q4_K, (3, 256))
