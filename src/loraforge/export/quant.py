"""Quantize one fp32 tensor with ggml's own kernels, so the bytes are llama.cpp's.

`llama-quantize` hands row ranges of each tensor to `ggml_quantize_chunk` in libggml-base
on several threads. We call that same function, in the libggml that llama-cpp-python
ships, through ctypes: every type llama.cpp can write (K-quants and importance-matrix
types included) comes for free, and there is no second implementation to drift from it.
Block sizes and byte counts are asked of ggml too, never copied into this file.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import sys
from concurrent.futures import ThreadPoolExecutor
from enum import IntEnum
from pathlib import Path

import numpy as np

from loraforge.env import usable_cpus
from loraforge.errors import LoraforgeError


class GGMLType(IntEnum):
    """Tensor types ggml can produce from fp32, numbered as in ggml.h and GGUF files.

    The numbers are checked against ggml's own `ggml_type_name` when the library loads.
    Missing on purpose: Q8_1/Q8_K (dot-product scratch types) and I8…F64 (not quantized).
    """

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41
    Q2_0 = 42


# Types every libggml has, and that have no `quantize_<name>` kernel to look for.
_FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)

_to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    # `struct ggml_type_traits` in ggml.h (ggml-base, since the CPU traits were split out).
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", _to_float_t),
        ("from_float_ref", ctypes.c_void_p),
    ]


def ggml_name(t: GGMLType) -> str:
    """ggml's spelling of a type, as llama.cpp prints it: `q4_K`, `iq2_xxs`, `bf16`."""
    name = GGMLType(t).name.lower()
    return name[:-2] + "_K" if name.endswith("_k") else name


class _Ggml:
    """libggml-base with typed signatures, and the set of types this build can write."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        i64, size_t, ptr = ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p
        for fn, res, args in [
            ("ggml_type_name", ctypes.c_char_p, [ctypes.c_int]),
            ("ggml_blck_size", i64, [ctypes.c_int]),
            ("ggml_type_size", size_t, [ctypes.c_int]),
            ("ggml_row_size", size_t, [ctypes.c_int, i64]),
            ("ggml_quantize_requires_imatrix", ctypes.c_bool, [ctypes.c_int]),
            ("ggml_quantize_init", None, [ctypes.c_int]),
            ("ggml_quantize_chunk", size_t, [ctypes.c_int, ptr, ptr, i64, i64, i64, ptr]),
            ("ggml_get_type_traits", ctypes.POINTER(_TypeTraits), [ctypes.c_int]),
        ]:
            getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
        self.lib, self.path = lib, path
        # ggml_type_name does no bounds check, so a type newer than this libggml would read
        # past its table. A type is known iff its kernel `quantize_<name>` is exported.
        self.known = {t for t in GGMLType if t in _FLOAT_TYPES or hasattr(lib, f"quantize_{ggml_name(t)}")}
        for t in sorted(self.known):
            theirs = lib.ggml_type_name(t).decode()
            traits = lib.ggml_get_type_traits(t).contents
            if theirs != ggml_name(t) or (traits.blck_size, traits.type_size) != (
                lib.ggml_blck_size(t), lib.ggml_type_size(t)
            ):
                raise LoraforgeError(
                    f"{path} says ggml type {int(t)} is {theirs!r} with {traits.blck_size}-value "
                    f"blocks, but loraforge expects {ggml_name(t)!r} with "
                    f"{lib.ggml_blck_size(t)}: this llama-cpp-python's ggml lays out its type "
                    "table differently — install the llama-cpp-python version loraforge pins"
                )
        self.initialized: set[GGMLType] = set()

    def require(self, t: GGMLType) -> GGMLType:
        t = GGMLType(t)
        if t not in self.known:
            raise LoraforgeError(
                f"{t.name}: the libggml in this llama-cpp-python ({self.path}) is too old to "
                f"write it — upgrade with `pip install -U llama-cpp-python`, or pick another type"
            )
        return t


@functools.cache
def _ggml() -> _Ggml:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise LoraforgeError(
            "quantizing needs libggml from llama-cpp-python, which is not installed: "
            "`pip install llama-cpp-python` (a CPU build is enough)"
        )
    package = Path(spec.origin).parent
    stem = {"win32": "ggml-base.dll", "darwin": "libggml-base.dylib"}.get(sys.platform, "libggml-base.so")
    for folder in (package / "lib", package, package / "bin"):
        if (folder / stem).exists():
            return _Ggml(folder / stem)
    raise LoraforgeError(
        f"llama-cpp-python at {package} has no {stem} in lib/: it is older than the split of "
        "ggml into libggml-base — `pip install -U llama-cpp-python`"
    )


def block_size(t: GGMLType) -> int:
    """Values per block: a row's length must be a multiple of this."""
    return int(_ggml().lib.ggml_blck_size(_ggml().require(t)))


def type_size(t: GGMLType) -> int:
    """Bytes per block."""
    return int(_ggml().lib.ggml_type_size(_ggml().require(t)))


def needs_imatrix(t: GGMLType) -> bool:
    """Whether ggml refuses this type without an importance matrix (IQ2_XXS, IQ2_XS, IQ1_S)."""
    return bool(_ggml().lib.ggml_quantize_requires_imatrix(_ggml().require(t)))


def _check_row_length(t: GGMLType, n_per_row: int, name: str) -> None:
    # ggml aborts the whole process on this (GGML_ASSERT), so it must never get that far.
    block = block_size(t)
    if n_per_row <= 0 or n_per_row % block:
        raise LoraforgeError(
            f"{name}: rows of {n_per_row} values don't fit {t.name}, whose blocks hold {block} "
            f"values ({n_per_row} is not a multiple of {block}). llama.cpp falls back to "
            "another type for such tensors (a 32-value type such as Q8_0, Q5_0 or IQ4_NL, else "
            "F16) — choose one of those for this tensor"
        )


def row_bytes(t: GGMLType, n_per_row: int) -> int:
    """Bytes one row of `n_per_row` values takes in type `t` (ggml_row_size)."""
    t = _ggml().require(t)
    _check_row_length(t, n_per_row, "tensor")
    return int(_ggml().lib.ggml_row_size(t, n_per_row))


def _as_rows(weights: np.ndarray, name: str) -> np.ndarray:
    """The weights as C-contiguous float32 rows [n_rows, n_per_row], or a clear error."""
    weights = np.asarray(weights)
    if not np.issubdtype(weights.dtype, np.floating):
        raise LoraforgeError(
            f"{name}: weights are {weights.dtype}, but only floating-point weights can be "
            "quantized — pass the float tensor, not ids, masks or already-quantized bytes"
        )
    if weights.ndim not in (1, 2) or weights.shape[-1] == 0:
        raise LoraforgeError(
            f"{name}: weights have shape {weights.shape}; quantize one matrix [rows, n_per_row] "
            "or vector at a time (stacked experts: one expert at a time, each with its own imatrix)"
        )
    rows = np.ascontiguousarray(weights.reshape(-1, weights.shape[-1]), dtype=np.float32)
    # one cheap pass: NaN and ±inf make the sum non-finite; only then look for where
    if not np.isfinite(rows.sum(dtype=np.float64)) and not np.isfinite(rows).all():
        bad = ~np.isfinite(rows)
        r, c = np.argwhere(bad)[0]
        raise LoraforgeError(
            f"{name}: {int(bad.sum())} of {rows.size} weights are NaN or infinite (first at "
            f"row {r}, column {c}); llama.cpp rejects such blocks when it loads the file. The "
            "model or merge that produced them diverged — fix that before exporting"
        )
    return rows


def _as_imatrix(imatrix: np.ndarray | None, t: GGMLType, n_per_row: int, name: str) -> np.ndarray | None:
    if imatrix is None:
        if needs_imatrix(t):
            raise LoraforgeError(
                f"{name}: {t.name} needs an importance matrix, and llama.cpp refuses it without "
                "one too: compute one with llama.cpp's `llama-imatrix` and pass `--imatrix FILE`, "
                "or pick a type that works without (IQ4_XS, Q4_K, …)"
            )
        return None
    imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
    if imatrix.shape != (n_per_row,) or not np.isfinite(imatrix).all():
        raise LoraforgeError(
            f"{name}: the importance matrix has shape {imatrix.shape} but rows hold {n_per_row} "
            "values: it needs one finite weight per column — was the imatrix computed for "
            "another model?"
        )
    return imatrix


def _row_ranges(n_rows: int, threads: int) -> list[tuple[int, int]]:
    """`threads` contiguous, near-equal row ranges covering [0, n_rows)."""
    n = max(1, min(threads, n_rows))
    bounds = [n_rows * i // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def quantize(
    weights: np.ndarray,
    t: GGMLType,
    *,
    imatrix: np.ndarray | None = None,
    threads: int | None = None,
    name: str = "tensor",
) -> np.ndarray:
    """Quantize rows of fp32 weights to type `t`; returns the bytes as llama.cpp writes them.

    `weights` is [rows, n_per_row] (or one row); other float dtypes are converted to float32.
    `imatrix` holds one importance per column (llama.cpp's imatrix for this tensor).
    Rows are split into `threads` contiguous ranges (default: every CPU this process may
    use), quantized at once — ctypes lets go of the GIL. `name` appears in errors.
    """
    ggml = _ggml()
    t = ggml.require(t)
    rows = _as_rows(weights, name)
    n_rows, n_per_row = rows.shape
    _check_row_length(t, n_per_row, name)
    imatrix = _as_imatrix(imatrix, t, n_per_row, name)
    if threads is not None and threads < 1:
        raise LoraforgeError(f"{name}: threads={threads}; use 1 or more")
    threads = threads or usable_cpus()
    size = row_bytes(t, n_per_row)
    out = np.empty(n_rows * size, dtype=np.uint8)
    if t not in ggml.initialized:
        ggml.lib.ggml_quantize_init(t)  # builds IQ lattices once, before threads race to it
        ggml.initialized.add(t)
    src, dst = rows.ctypes.data, out.ctypes.data
    imat = None if imatrix is None else imatrix.ctypes.data

    def quantize_range(r: tuple[int, int]) -> None:
        # ggml offsets both src and dst by `start` (in values) itself.
        written = ggml.lib.ggml_quantize_chunk(t, src, dst, r[0] * n_per_row, r[1] - r[0], n_per_row, imat)
        assert written == (r[1] - r[0]) * size, f"ggml wrote {written} bytes for rows {r}"

    ranges = _row_ranges(n_rows, threads)
    if len(ranges) == 1:
        quantize_range(ranges[0])
    else:
        with ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="ggml-quantize") as pool:
            list(pool.map(quantize_range, ranges))
    return out


def dequantize(data: np.ndarray | bytes, t: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    """Back to float32 of `shape` with ggml's own `to_float`: what llama.cpp computes with."""
    ggml = _ggml()
    t = ggml.require(t)
    data = np.ascontiguousarray(np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data)
    data = data.view(np.uint8).reshape(-1)
    shape = tuple(int(n) for n in shape)
    if not shape:
        raise LoraforgeError(f"dequantize needs the tensor's shape, e.g. (rows, {block_size(t)}); got ()")
    n_per_row = shape[-1]
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    expected = n_rows * row_bytes(t, n_per_row)
    if data.size != expected:
        raise LoraforgeError(
            f"{data.size} bytes can't be {t.name} of shape {tuple(shape)}, which takes {expected} "
            "bytes: the type or shape read from the file doesn't match the data"
        )
    if t == GGMLType.F32:  # ggml has no to_float for f32: it is already float
        return data.view(np.float32).reshape(shape).copy()
    out = np.empty(shape, dtype=np.float32)
    to_float = ggml.lib.ggml_get_type_traits(t).contents.to_float
    to_float(data.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size)
    return out
