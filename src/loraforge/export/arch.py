"""Per-architecture facts for GGUF: tensor names, the q/k permutation, hyper-parameters.

HF LLaMA checkpoints store q/k rows in the "rotate half" order; llama.cpp's `llama`
architecture expects Meta's interleaved order, so q and k are permuted on the way in
(with `n_head_kv` for k under grouped-query attention). Qwen2 uses the NEOX rope layout
in llama.cpp and is written unpermuted, with its q/k/v biases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from loraforge.errors import LoraforgeError
from loraforge.export.rope import llama3_rope_factors, rope_of
from loraforge.models import reward_model_error

# HF name (with {i} for the layer) → GGUF name
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
SKIPPED = re.compile(r"rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Arch:
    gguf_name: str  # llama.cpp's general.architecture
    permute_qk: bool
    family: str = "llama"  # which config table applies (export/config_table.py)


ARCHES = {"LlamaForCausalLM": Arch("llama", True, "llama"), "MistralForCausalLM": Arch("llama", True, "mistral"),
          "Qwen2ForCausalLM": Arch("qwen2", False, "qwen2")}


def arch_of(config: dict) -> Arch:
    names = config.get("architectures") or []
    if any(name.endswith("ForSequenceClassification") for name in names):
        raise reward_model_error(f"this model ({', '.join(names)})")
    for name in names:
        if name in ARCHES:
            return ARCHES[name]
    by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    if not names and config.get("model_type") in by_type:  # a config written without `architectures`
        return ARCHES[by_type[config["model_type"]]]
    raise LoraforgeError(f"architecture {', '.join(names) or config.get('model_type')} is not supported for GGUF "
                         f"export; supported: {', '.join(sorted(ARCHES))} (LLaMA 1/2/3, Chinese-LLaMA, Mistral, Qwen2)")


def gguf_name(hf_name: str) -> str | None:
    """The GGUF tensor name, or None for tensors llama.cpp does not take."""
    if SKIPPED.search(hf_name):
        return None
    match = _LAYER.match(hf_name)
    if match:
        layer, module, kind = match.groups()
        if module in LAYER_NAMES:
            return f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"
    else:
        module, _, kind = hf_name.rpartition(".")
        if module in GLOBAL_NAMES:
            return f"{GLOBAL_NAMES[module]}.{kind}"
    raise LoraforgeError(f"tensor {hf_name} has no GGUF name in loraforge's map — is this a LLaMA/Qwen2 model?")


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order → Meta's interleaved order, per head (llama.cpp `llama`)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def to_gguf_layout(hf_name: str, tensor: torch.Tensor, arch: Arch, config: dict) -> torch.Tensor:
    if arch.permute_qk:
        if ".self_attn.q_proj." in hf_name:
            return permute_qk(tensor, config["num_attention_heads"])
        if ".self_attn.k_proj." in hf_name:
            return permute_qk(tensor, config.get("num_key_value_heads") or config["num_attention_heads"])
    return tensor


def rope_theta(config: dict) -> float:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs at the top level."""
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def head_dim_of(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def hyperparameters(writer, config: dict) -> None:
    """Write the architecture keys llama.cpp reads (`{arch}.context_length`, …); `check_config`
    has refused what they cannot say."""
    import gguf

    heads = config["num_attention_heads"]
    head_dim = head_dim_of(config)
    rope = rope_of(config)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    if head_dim != config["hidden_size"] // heads:  # Mistral-Nemo, Qwen3: llama.cpp defaults to hidden/heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope.theta)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    if rope.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope.params["factor"]))
    elif rope.kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope.params["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope.params["original_max_position_embeddings"])


def extra_tensors(config: dict) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that no checkpoint holds: Llama-3.1/3.2's `rope_freqs`."""
    rope = rope_of(config)
    if rope.kind == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(rope, head_dim_of(config))}
    return {}
