"""Quantization schemes (`--quant`) and the type each tensor gets under one."""

from __future__ import annotations

from loraforge.export.quant import GGMLType

# scheme → (default tensor type, llama.cpp's general.file_type)
SCHEMES = {
    "f32": (GGMLType.F32, 0), "f16": (GGMLType.F16, 1), "bf16": (GGMLType.BF16, 32),
    "q8_0": (GGMLType.Q8_0, 7), "q4_0": (GGMLType.Q4_0, 2), "q4_1": (GGMLType.Q4_1, 3),
    "q5_0": (GGMLType.Q5_0, 8), "q5_1": (GGMLType.Q5_1, 9),
}
