"""Quantization schemes (`--quant`) and the type each tensor gets under one.

A scheme is one of llama-quantize's file types. "Pure" schemes (Q8_0, Q4_0, …) give
every matrix the same type; mixed ones (Q4_K_M, Q3_K_S, IQ4_XS, …) give some tensors
more bits than others: the output matrix, attn_v and ffn_down in chosen layers. The
rules below are llama.cpp's (`llama_tensor_get_type` in src/llama-quant.cpp of the
llama.cpp that llama-cpp-python ships), restated for the two architectures we write;
a test quantizes our F32 GGUF with `llama_model_quantize` and compares every tensor's
type and bytes, so a drift in either direction shows up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loraforge.errors import LoraforgeError
from loraforge.export.quant import GGMLType, block_size

T = GGMLType


@dataclass(frozen=True)
class Scheme:
    name: str
    file_type: int  # llama.cpp's llama_ftype, written as general.file_type
    default: GGMLType  # the type of every matrix no rule singles out
    about: str


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in [
        Scheme("f32", 0, T.F32, "32-bit float, no loss"),
        Scheme("f16", 1, T.F16, "16-bit float"),
        Scheme("bf16", 32, T.BF16, "bfloat16"),
        Scheme("q8_0", 7, T.Q8_0, "8.5 bits per weight, near lossless"),
        Scheme("q4_0", 2, T.Q4_0, "4.5 bpw, legacy"),
        Scheme("q4_1", 3, T.Q4_1, "5.0 bpw, legacy"),
        Scheme("q5_0", 8, T.Q5_0, "5.5 bpw, legacy"),
        Scheme("q5_1", 9, T.Q5_1, "6.0 bpw, legacy"),
        Scheme("q2_k", 10, T.Q2_K, "K-quant mix around 2.6 bpw"),
        Scheme("q2_k_s", 21, T.Q2_K, "K-quant mix around 2.5 bpw; needs --imatrix"),
        Scheme("q3_k_s", 11, T.Q3_K, "K-quant, 3.4 bpw"),
        Scheme("q3_k_m", 12, T.Q3_K, "K-quant mix around 3.9 bpw"),
        Scheme("q3_k_l", 13, T.Q3_K, "K-quant mix around 4.3 bpw"),
        Scheme("q4_k_s", 14, T.Q4_K, "K-quant mix around 4.6 bpw"),
        Scheme("q4_k_m", 15, T.Q4_K, "K-quant mix around 4.9 bpw (the usual choice)"),
        Scheme("q5_k_s", 16, T.Q5_K, "K-quant, 5.5 bpw"),
        Scheme("q5_k_m", 17, T.Q5_K, "K-quant mix around 5.7 bpw"),
        Scheme("q6_k", 18, T.Q6_K, "K-quant, 6.6 bpw"),
        Scheme("iq4_nl", 25, T.IQ4_NL, "non-linear 4.5 bpw, 32-value blocks"),
        Scheme("iq4_xs", 30, T.IQ4_XS, "non-linear 4.25 bpw"),
        Scheme("iq3_m", 27, T.IQ3_S, "i-quant mix around 3.7 bpw"),
        Scheme("iq3_s", 26, T.IQ3_S, "i-quant, 3.4 bpw"),
        Scheme("iq3_xs", 22, T.IQ3_S, "i-quant mix around 3.3 bpw"),
        Scheme("iq3_xxs", 23, T.IQ3_XXS, "i-quant, 3.1 bpw; needs --imatrix"),
        Scheme("iq2_m", 29, T.IQ2_S, "i-quant, 2.7 bpw; needs --imatrix"),
        Scheme("iq2_s", 28, T.IQ2_XS, "i-quant, 2.5 bpw; needs --imatrix"),
        Scheme("iq2_xs", 20, T.IQ2_XS, "i-quant, 2.3 bpw; needs --imatrix"),
        Scheme("iq2_xxs", 19, T.IQ2_XXS, "i-quant, 2.1 bpw; needs --imatrix"),
        Scheme("iq1_m", 31, T.IQ1_M, "i-quant, 1.75 bpw; needs --imatrix"),
        Scheme("iq1_s", 24, T.IQ1_S, "i-quant, 1.56 bpw; needs --imatrix"),
        Scheme("tq1_0", 36, T.TQ1_0, "ternary, 1.69 bpw (for ternary-trained models only)"),
        Scheme("tq2_0", 37, T.TQ2_0, "ternary, 2.06 bpw (for ternary-trained models only)"),
    ]
}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)

# i-quant schemes whose mixes share one branch of llama.cpp's rules
_IQ2_FAMILY = {"iq2_xxs", "iq2_xs", "iq1_s", "iq2_s", "iq2_m", "iq1_m"}
_IQ2_BIG = {"iq2_s", "iq2_m"}  # the two that step up to IQ3_S rather than Q2_K

# a row that does not divide into the type's blocks takes this type instead (then F16)
_FALLBACK = {
    T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
    T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}
# types that ggml only produces from an importance matrix (llama.cpp refuses without)
_IMATRIX_ONLY = {T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S}


def scheme_of(name: str) -> Scheme:
    key = name.lower()
    if key not in SCHEMES:
        raise LoraforgeError(f"--quant {name} is not a llama.cpp quantization; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[key]


@dataclass(frozen=True)
class ModelFacts:
    """What the rules need to know about the whole model."""

    n_layer: int
    n_gqa: int  # attention heads per key/value head
    tied: bool  # no output.weight: token_embd doubles as the output matrix
    is_70b: bool  # llama.cpp gives attn_v of 70B models more bits
    has_imatrix: bool

    @classmethod
    def of(cls, config: dict, arch_name: str, tensor_names: set[str], has_imatrix: bool) -> ModelFacts:
        n_layer, heads = config["num_hidden_layers"], config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        is_70b = n_layer == 80 and (arch_name == "qwen2" or kv_heads != heads)
        return cls(n_layer, heads // kv_heads, "output.weight" not in tensor_names, is_70b, has_imatrix)


def quantizable(name: str, shape: list[int]) -> bool:
    """Matrices are quantized; norms, biases and other vectors stay F32."""
    return len(shape) >= 2 and name.endswith("weight") and not name.endswith("_norm.weight")


def _more_bits(i: int, n: int) -> bool:
    # the first and last eighth of the layers, and every third layer in between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _role(name: str) -> tuple[str, int]:
    """(role, layer index) of a GGUF tensor name: ('attn_v', 3) for blk.3.attn_v.weight."""
    if name == "output.weight":
        return "output", -1
    if name == "token_embd.weight":
        return "token_embd", -1
    match = re.match(r"blk\.(\d+)\.(attn_[a-z]+|ffn_[a-z]+)\.", name)
    return (match[2], int(match[1])) if match else ("other", -1)


def _mixed(scheme: Scheme, role: str, i: int, shape: list[int], m: ModelFacts) -> GGMLType:
    """The type a mixed scheme gives one matrix, before the row-length fallback."""
    q, n, t = scheme.name, m.n_layer, scheme.default
    if role == "output" or (role == "token_embd" and m.tied):
        if shape[-1] % block_size(t):
            return T.Q8_0
        if q in _IQ2_FAMILY or q == "iq3_xxs":
            return T.Q5_K
        return t if t == T.Q8_0 else T.Q6_K
    if role == "token_embd":
        if q in {"iq2_xxs", "iq2_xs", "iq1_s", "iq1_m"}:
            return T.Q2_K
        if q in _IQ2_BIG or q == "iq3_xxs":
            return T.IQ3_S
        return T.Q4_K if q in {"tq1_0", "tq2_0"} else t
    if q in _IQ2_FAMILY:
        low = T.IQ3_S if q in _IQ2_BIG else T.Q2_K
        if role == "attn_v":
            return T.Q4_K if m.n_gqa >= 4 else low
        if role == "ffn_down":
            return low if i < n // 8 else t
        if role == "attn_output":
            return T.IQ2_XXS if q in {"iq1_s", "iq1_m"} else T.IQ3_S if q in _IQ2_BIG else t
        return t
    if role == "attn_v":
        t = _attn_v(q, i, n, m, t)
        return T.Q5_K if m.is_70b and t in (T.Q3_K, T.Q4_K) else t
    if role in ("attn_k", "attn_q"):
        return {"iq3_xs": T.IQ3_XXS, "iq3_xxs": T.IQ2_S}.get(q, t)
    if role == "ffn_down":
        return _ffn_down(q, i, n, m, t)
    if role == "attn_output":
        return {"q2_k": T.Q3_K, "iq3_xxs": T.IQ3_S, "q3_k_m": T.Q4_K, "q3_k_l": T.Q5_K, "iq3_m": T.Q4_K}.get(q, t)
    if role in ("ffn_gate", "ffn_up") and q == "iq3_xs" and n // 8 <= i < 7 * n // 8:
        return T.IQ3_XXS
    return t


def _attn_v(q: str, i: int, n: int, m: ModelFacts, t: GGMLType) -> GGMLType:
    gqa4 = m.n_gqa >= 4
    if q == "q2_k":
        return T.Q4_K if gqa4 else T.Q3_K
    if q == "iq3_xxs":
        return T.Q4_K if gqa4 else T.IQ3_XXS if m.has_imatrix else T.IQ3_S
    if (q in ("q2_k_s", "iq3_xs", "iq3_s") and gqa4) or q == "iq3_m":
        return T.Q4_K
    if q == "q3_k_m":
        return T.Q5_K if i < 2 else T.Q4_K
    if q == "q3_k_l" or (q in ("iq4_nl", "iq4_xs") and gqa4):
        return T.Q5_K
    if q in ("q4_k_m", "q5_k_m") and _more_bits(i, n):
        return T.Q6_K
    if q == "q4_k_s" and i < 4:
        return T.Q5_K
    return t


def _ffn_down(q: str, i: int, n: int, m: ModelFacts, t: GGMLType) -> GGMLType:
    first_eighth = i < n // 8
    if q == "q2_k":
        return T.Q3_K
    if q == "q2_k_s":
        return T.Q4_K if first_eighth else t
    if q == "iq3_xxs" and not m.has_imatrix:
        return T.Q4_K if first_eighth else T.Q3_K
    if q == "q3_k_m":
        return T.Q5_K if i < n // 16 else T.Q4_K
    if q == "iq3_m" and first_eighth:
        return T.Q4_K
    if q == "q3_k_l":
        return T.Q5_K
    if q in ("q4_k_m", "q5_k_m") and _more_bits(i, n):
        return T.Q6_K
    if q in ("iq4_nl", "iq4_xs") and first_eighth and not m.has_imatrix:
        return T.Q5_K
    if q == "q4_k_s" and first_eighth:
        return T.Q5_K
    if q in ("q4_0", "q5_0") and m.has_imatrix and first_eighth:
        return T.Q4_1 if q == "q4_0" else T.Q5_1
    return t


def fit_rows(t: GGMLType, n_per_row: int) -> GGMLType:
    """A type whose blocks divide the row: `t`, else llama.cpp's fallback, else F16."""
    if n_per_row % block_size(t) == 0:
        return t
    t = _FALLBACK.get(t, t)
    return t if n_per_row % block_size(t) == 0 else T.F16


def tensor_type(name: str, shape: list[int], scheme: Scheme, model: ModelFacts) -> GGMLType:
    """The type llama-quantize would give GGUF tensor `name` of `shape` (rows last) under `scheme`."""
    if not quantizable(name, shape):
        return T.F32
    if scheme.default in FLOAT_TYPES:
        return scheme.default
    role, layer = _role(name)
    return fit_rows(_mixed(scheme, role, layer, shape, model), shape[-1])


def needs_imatrix(name: str, t: GGMLType, scheme: Scheme) -> bool:
    """Whether llama.cpp refuses to write `name` as `t` without an importance matrix."""
    if name in ("token_embd.weight", "output.weight"):
        return False
    return t in _IMATRIX_ONLY or (t == T.Q2_K and scheme.name == "q2_k_s")
