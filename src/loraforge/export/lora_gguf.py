"""`loraforge export lora-gguf`: a peft LoRA adapter in llama.cpp's GGUF adapter format.

llama.cpp (src/llama-adapter.cpp) reads `general.type = adapter`, `adapter.type = lora`
and one `adapter.lora.alpha`, and pairs `<tensor>.lora_a` [rank, in] with
`<tensor>.lora_b` [out, rank] (torch order), adding `alpha/rank · B(Ax)` to the base
tensor's output. peft can scale each module differently (rsLoRA's alpha/√r,
`alpha_pattern`, `rank_pattern`); one alpha cannot say that, so a module whose scale
differs from `alpha/rank` gets the ratio folded into its B. The `llama` architecture's
q/k permutation acts on output rows, so it is applied to B; A is unchanged.

Full tensors (`modules_to_save` embed_tokens / lm_head of an extended vocabulary) have
no place in this format: such an adapter is refused and pointed at `export gguf`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loraforge.errors import LoraforgeError
from loraforge.export.arch import arch_of, gguf_name, to_gguf_layout
from loraforge.export.gguf_writer import gguf_file
from loraforge.export.weights import merged_config, plan, read_adapter


def adapter_base(adapter_dir: Path, config: dict, base_dir: Path | None) -> Path:
    """The base model the adapter was trained on: --base, else a local base_model_name_or_path."""
    if base_dir is not None:
        return Path(base_dir)
    named = config.get("base_model_name_or_path") or ""
    if named and (Path(named) / "config.json").exists():
        return Path(named)
    raise LoraforgeError(f"{adapter_dir}: its base model {named or '(not recorded)'} is not a local directory — "
                         "pass --base with the base model the adapter was trained on (its config gives the "
                         "architecture and head counts)")


def export_lora_gguf(adapter_dir: Path, out_path: Path, base_dir: Path | None = None) -> Path:
    import gguf

    adapter = read_adapter(Path(adapter_dir))
    if adapter.full:
        names = ", ".join(sorted(adapter.full))
        raise LoraforgeError(
            f"{adapter_dir} carries whole tensors ({names}: modules_to_save, e.g. an extended vocabulary); a "
            "llama.cpp LoRA adapter can only hold low-rank pairs. Merge it instead: "
            f"`loraforge export gguf --base BASE --adapter {adapter_dir} -o model.gguf`")
    if not adapter.lora:
        raise LoraforgeError(f"{adapter_dir}: the adapter has no LoRA tensors")
    base = adapter_base(adapter.path, adapter.config, base_dir)
    planned = plan(base, [adapter])  # checks every LoRA shape against the base
    config = merged_config(base, planned)
    arch = arch_of(config)
    alpha = float(adapter.config.get("lora_alpha") or adapter.config.get("r") or 8)

    out_path = Path(out_path)
    with gguf_file(out_path, arch.gguf_name) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(adapter.path.name)
        for name, (a_key, b_key) in sorted(adapter.lora.items()):
            lora_a, lora_b = adapter.tensor(a_key), adapter.tensor(b_key)
            rank = lora_a.shape[0]
            # llama.cpp multiplies by alpha/rank; peft by its own per-module scale
            lora_b = lora_b * (adapter.scale(name, rank) / (alpha / rank))
            lora_b = to_gguf_layout(name, lora_b, arch, config)
            target = gguf_name(name).removesuffix(".weight")
            writer.add_tensor(f"{target}.weight.lora_a", lora_a.numpy().astype(np.float32))
            writer.add_tensor(f"{target}.weight.lora_b", lora_b.contiguous().numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return out_path
