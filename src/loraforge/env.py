"""`loraforge env`: the versions that matter when reporting a problem."""

from __future__ import annotations

import os
import platform
from importlib import metadata

from loraforge import __version__

PACKAGES = ("torch", "transformers", "peft", "accelerate", "tokenizers", "sentencepiece",
            "safetensors", "llama-cpp-python", "bitsandbytes", "deepspeed")


def usable_cpus() -> int:
    # A container or `taskset` may allow fewer CPUs than the machine has.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, str]:
    """loraforge, Python, key packages, and the accelerator torch sees."""
    import torch

    info = {"loraforge": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        info[name] = package_version(name) or "not installed"
    if torch.cuda.is_available():
        info["cuda"] = f"{torch.version.cuda} · {torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}"
        info["bf16"] = str(torch.cuda.is_bf16_supported())
    else:
        info["cuda"] = "no (CPU only: lora/full train in fp32; qlora needs CUDA)"
    info["cpu threads"] = str(torch.get_num_threads())
    return info
