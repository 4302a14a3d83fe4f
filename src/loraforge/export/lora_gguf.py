"""`loraforge export lora-gguf`: a peft LoRA adapter in llama.cpp's GGUF adapter format.

llama.cpp (src/llama-adapter.cpp) accepts a file with `general.type = adapter`,
`adapter.type = lora`, one float32 `adapter.lora.alpha` and a `general.architecture`
equal to the base GGUF's, and pairs `<base tensor>.lora_a` with `<base tensor>.lora_b`.
In torch order A is [rank, in] and B is [out, rank], exactly as peft stores them; the
graph adds `alpha/rank · B(Ax)` to the base matmul, rank read from each B
(src/llama-graph.cpp build_lora_mm, src/llama-adapter.h get_scale).

peft can scale each module differently: rsLoRA's alpha/√r, `alpha_pattern`,
`rank_pattern`. One alpha cannot say that, so we keep the adapter's own `lora_alpha`
and fold each module's ratio `peft scale / (alpha/rank)` into its B (1 for a plain
adapter, √r under rsLoRA). The `llama` architecture's q/k permutation reorders output
rows, which B alone owns; A is unchanged.

AdaLoRA's update B·(A ⊙ E)·alpha/(init_r + 1e-5) is a plain pair once E is folded into A,
its rank the ranks pruning kept. DoRA is refused: its per-row magnitudes rescale the
base weights themselves, which a llama.cpp adapter cannot express.

Full tensors (`modules_to_save`, e.g. embed_tokens / lm_head of an extended vocabulary)
have no place in this format: such an adapter is refused and pointed at `export gguf`,
which merges them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from loraforge.errors import LoraforgeError
from loraforge.export.arch import Arch, arch_of, gguf_name, to_gguf_layout
from loraforge.export.chain import check_chain
from loraforge.export.gguf_writer import gguf_file
from loraforge.export.vocab_meta import chat_template_of
from loraforge.export.weights import Adapter, merged_config, plan, read_adapter


def adapter_base(adapter_dir: Path, config: dict, base_dir: Path | None) -> Path:
    """The base model the adapter was trained on: --base, else a local base_model_name_or_path."""
    if base_dir is not None:
        return Path(base_dir)
    named = config.get("base_model_name_or_path") or ""
    if named and (Path(named) / "config.json").exists():
        return Path(named)
    raise LoraforgeError(f"{adapter_dir}/adapter_config.json: its base model {named or '(not recorded)'} is not a "
                         "local model directory — pass --base with the base model the adapter was trained on "
                         "(its config gives the architecture, tensor names and head counts)")


def refuse_non_lora_tensors(adapter: Adapter, base_hint: str) -> None:
    """llama.cpp adapters hold only low-rank A/B pairs; say which tensors do not fit and what to do."""
    if adapter.kind == "dora":
        # llama.cpp's adapter graph adds alpha/rank·B(Ax) to the base matmul and nothing else; DoRA's
        # per-row rescaling m/‖W + s·B@A‖ depends on the base weights, so it cannot be an adapter file
        raise LoraforgeError(
            f"{adapter.path} is a DoRA adapter (use_dora=true): llama.cpp's GGUF adapters are plain LoRA (B·A added "
            "to the base), with no place for DoRA's per-row magnitudes, which rescale the base weights too. Merge it "
            f"into the model instead: `loraforge export gguf --base {base_hint} --adapter {adapter.path} -o model.gguf`")
    embedding_lora = sorted(n for n in adapter.full if ".lora_embedding_" in n)
    if embedding_lora:
        raise LoraforgeError(
            f"{adapter.path}: LoRA on an embedding ({', '.join(embedding_lora)}) is not supported by loraforge "
            "yet — merge it with peft's merge_and_unload, save the merged model and export that with "
            "`loraforge export gguf --base MERGED`")
    lora_bias = sorted(n for n in adapter.full if ".lora_B." in n and n.endswith(".bias"))
    if lora_bias:
        raise LoraforgeError(
            f"{adapter.path}: the adapter trains LoRA biases (lora_bias=true: {', '.join(lora_bias[:3])}"
            f"{' …' if len(lora_bias) > 3 else ''}); a llama.cpp adapter has no place for them")
    if adapter.full:
        raise LoraforgeError(
            f"{adapter.path} carries whole tensors ({', '.join(sorted(adapter.full))}: modules_to_save, e.g. an "
            "extended vocabulary); a llama.cpp LoRA adapter can only hold low-rank A/B pairs. Merge it into "
            f"the model instead: `loraforge export gguf --base {base_hint} --adapter {adapter.path} -o model.gguf`")
    if not adapter.lora:
        raise LoraforgeError(f"{adapter.path}/adapter_model.safetensors has no lora_A/lora_B tensors")


def gguf_alpha(config: dict) -> float:
    """The one alpha written to the file: the adapter's own, so plain adapters keep B bit for bit."""
    alpha = config.get("lora_alpha")
    # llama.cpp reads alpha 0 as "no alpha/rank scaling at all" (get_scale), so never write 0
    return float(alpha) if alpha else float(config.get("r") or 8)


def llama_cpp_pair(adapter: Adapter, name: str, alpha: float, arch: Arch,
                   config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for base weight `name` such that llama.cpp's alpha/rank · B·A is peft's scale · B·A."""
    # AdaLoRA's B @ (A ⊙ E): E folded into A makes it a plain pair, its rank the ranks pruning kept
    lora_a, lora_b = adapter.lora_a(name), adapter.tensor(adapter.lora[name][1])
    rank = lora_a.shape[0]
    ratio = adapter.scale(name, rank) / (alpha / rank)
    if ratio != 1.0:
        lora_b = lora_b * ratio
    return lora_a, to_gguf_layout(name, lora_b, arch, config).contiguous()


def export_lora_gguf(adapter_dir: Path, out_path: Path, base_dir: Path | None = None, *,
                     force: bool = False) -> Path:
    """Write `out_path` (.gguf), the adapter as llama.cpp loads it with --lora on the base's GGUF;
    the chat template it was trained with goes into its metadata, for `loraforge serve`."""
    import gguf

    adapter = read_adapter(Path(adapter_dir))
    named_base = base_dir or adapter.config.get("base_model_name_or_path") or "BASE"
    refuse_non_lora_tensors(adapter, str(named_base))
    base = adapter_base(adapter.path, adapter.config, base_dir)
    planned = plan(base, [adapter])  # every LoRA shape checked against the base before writing
    check_chain(base, [adapter.path], [adapter], force=force)  # the base GGUF it goes on must be that model
    template = chat_template_of(adapter.path)
    config = merged_config(base, planned)
    arch = arch_of(config)
    alpha = gguf_alpha(adapter.config)
    # a module whose every AdaLoRA rank was pruned adds nothing (and llama.cpp takes no empty tensor)
    targets = [p.name for p in planned if p.name in adapter.lora and adapter.shapes[adapter.lora[p.name][0]][0]]  # the base's own tensor order

    out_path = Path(out_path)
    with gguf_file(out_path, arch.gguf_name) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(adapter.path.name)
        if template:
            writer.add_chat_template(template)
        for name in targets:
            lora_a, lora_b = llama_cpp_pair(adapter, name, alpha, arch, config)
            target = gguf_name(name)
            writer.add_tensor(f"{target}.lora_a", lora_a.numpy().astype(np.float32, copy=False))
            writer.add_tensor(f"{target}.lora_b", lora_b.numpy().astype(np.float32, copy=False))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return out_path
