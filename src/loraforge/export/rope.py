"""RoPE settings of a config.json, in the form llama.cpp takes them.

transformers 5 keeps every rope setting in `rope_parameters` (`rope_type`, `rope_theta`
and the scaling keys); configs written before keep `rope_theta` at the top level and
the scaling in `rope_scaling` (`type` in the oldest, `rope_type` later). Both are read.

What llama.cpp can express, and how:

- `default`: `rope.freq_base` only.
- `linear`: `rope.scaling.type=linear` + `rope.scaling.factor` (positions divided by it).
- `llama3` (Llama-3.1/3.2): a `rope_freqs.weight` tensor of one factor per rotary pair;
  llama.cpp divides each pair's frequency by it (`LLM_TENSOR_ROPE_FREQS`, read by the
  `llama` architecture only). The factors are computed as llama.cpp's own converter does
  (`convert_hf_to_gguf.py`, LlamaModel): 1 for short wavelengths, `factor` for long
  ones, and between them 1 / ((1 − s) / factor + s).
- `yarn` (Qwen2.5's long-context setting): `rope.scaling.type=yarn`, the factor and
  `rope.scaling.original_context_length`; llama.cpp's defaults (β_fast 32, β_slow 1,
  attention factor 0.1·ln(factor) + 1) are transformers' defaults, so other values are refused.
- `dynamic` (NTK scaling recomputed per sequence length) and `longrope` have no llama.cpp
  form for these architectures and are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from loraforge.errors import LoraforgeError

# scaling keys each rope type takes (besides rope_type / type / rope_theta)
ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
             "mscale", "mscale_all_dim", "truncate"},
}
REFUSED = {
    "dynamic": "dynamic NTK scaling recomputes the frequencies for each sequence length past "
               "max_position_embeddings; llama.cpp has no such mode",
    "longrope": "llama.cpp reads LongRoPE factors only for Phi-3-style architectures, not llama/qwen2",
}
# values of yarn's optional keys that equal what llama.cpp does (None: absent)
YARN_DEFAULTS = {"beta_fast": (None, 32, 32.0), "beta_slow": (None, 1, 1.0), "mscale": (None, 1, 1.0),
                 "mscale_all_dim": (None, 0, 0.0), "truncate": (None, True)}


@dataclass(frozen=True)
class Rope:
    kind: str  # default | linear | llama3 | yarn
    theta: float
    params: dict  # the scaling keys of `kind`


def rope_of(config: dict, where: str = "config.json") -> Rope:
    """The config's rope, checked: an unknown type or key is an error naming it."""
    new = config.get("rope_parameters")
    legacy = config.get("rope_scaling")
    if new and any(isinstance(v, dict) for v in new.values()):
        raise LoraforgeError(f"{where}: rope_parameters holds one rope per layer type ({', '.join(new)}); "
                             "llama.cpp's llama/qwen2 architectures take one rope for all layers")
    settings = dict(new or legacy or {})
    theta = float(settings.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = settings.get("rope_type") or settings.get("type") or "default"
    source = "rope_parameters" if new else "rope_scaling"
    if kind in REFUSED:
        raise LoraforgeError(f"{where}: {source}.rope_type={kind!r} cannot be exported to GGUF: {REFUSED[kind]}. "
                             "Supported rope types: default, linear, llama3, yarn")
    if kind not in ROPE_KEYS:
        raise LoraforgeError(f"{where}: {source}.rope_type={kind!r} is unknown to loraforge; supported rope types: "
                             f"{', '.join(ROPE_KEYS)} (dynamic and longrope are refused)")
    params = {k: v for k, v in settings.items() if k not in ("rope_type", "type", "rope_theta")}
    if "partial_rotary_factor" in params:  # transformers 5 may keep it here; checked with the top-level key
        if float(params.pop("partial_rotary_factor")) != 1.0:
            raise LoraforgeError(f"{where}: {source}.partial_rotary_factor={settings['partial_rotary_factor']!r}: "
                                 "llama.cpp's llama/qwen2 rotate the whole head; only 1.0 can be exported")
    unknown = sorted(set(params) - ROPE_KEYS[kind])
    if unknown:
        raise LoraforgeError(f"{where}: {source} key {unknown[0]}={params[unknown[0]]!r} is not a {kind} rope setting "
                             f"loraforge knows (expected {', '.join(sorted(ROPE_KEYS[kind])) or 'none'}); "
                             "the export stops rather than drop a setting that may change the model")
    if kind == "linear" and not params.get("factor"):
        raise LoraforgeError(f"{where}: {source} rope_type='linear' has no factor")
    if kind == "llama3":
        missing = sorted(ROPE_KEYS["llama3"] - set(params))
        if missing:
            raise LoraforgeError(f"{where}: {source} rope_type='llama3' lacks {', '.join(missing)}")
    if kind == "yarn":
        params = _yarn(params, config, where, source)
    return Rope(kind, theta, params)


def _yarn(params: dict, config: dict, where: str, source: str) -> dict:
    original = params.get("original_max_position_embeddings") or config.get("max_position_embeddings")
    if not original:
        raise LoraforgeError(f"{where}: {source} rope_type='yarn' needs original_max_position_embeddings")
    factor = params.get("factor") or config["max_position_embeddings"] / original  # as transformers does
    for key, allowed in YARN_DEFAULTS.items():
        if params.get(key) not in allowed:
            raise LoraforgeError(f"{where}: {source}.{key}={params[key]!r}: llama.cpp's yarn uses "
                                 f"{allowed[-1]!r} and takes no other value for llama/qwen2")
    default_attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    if params.get("attention_factor") is not None and not math.isclose(params["attention_factor"], default_attention):
        raise LoraforgeError(f"{where}: {source}.attention_factor={params['attention_factor']!r}: llama.cpp's yarn "
                             f"scales attention by 0.1·ln(factor)+1 = {default_attention:.4f} and takes no other value")
    return {"factor": float(factor), "original_max_position_embeddings": int(original)}


def llama3_rope_factors(rope: Rope, head_dim: int) -> np.ndarray:
    """One divisor per rotary pair, float32, exactly as llama.cpp's converter writes `rope_freqs`."""
    p = rope.params
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_context = float(p["original_max_position_embeddings"])
    if high <= low:
        raise LoraforgeError(f"rope llama3: high_freq_factor={high} must exceed low_freq_factor={low}")
    freqs = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = torch.where(wavelen < old_context / high, torch.ones_like(freqs),
                          torch.where(wavelen > old_context / low, torch.full_like(freqs, factor),
                                      1 / ((1 - smooth) / factor + smooth)))
    return factors.numpy().astype(np.float32)
