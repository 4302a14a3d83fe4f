"""Every config.json key, per architecture: mapped into the GGUF, or refused before a byte is written.

A key changes the model's outputs or it does not. One that does is written as the GGUF
key llama.cpp reads for it, or the export stops with the key, its value and what to do;
one that does not (ids, dtype, dropout, init) is listed as inert, with why. A key in no
table stops the export too: dropping a setting nobody checked is how Llama-3.1 was once
exported with the wrong rope and exit 0. README "Supported model families" is this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loraforge.errors import LoraforgeError
from loraforge.export.arch import arch_of, head_dim_of
from loraforge.export.rope import rope_of

# (config, value) → why this value cannot be exported, or None
Check = Callable[[dict, Any], "str | None"]


@dataclass(frozen=True)
class Key:
    becomes: str  # the GGUF key or tensor it maps to, or why it changes nothing
    check: Check | None = None


def _only(allowed: tuple, why: str) -> Check:
    return lambda config, value: None if value in allowed else why


def _llama3_only_on_llama(config: dict, value: Any) -> str | None:
    if arch_of(config).gguf_name != "llama" and rope_of(config).kind == "llama3":
        return "llama.cpp reads rope_freqs (llama3 rope) only for the llama architecture"
    return None


def _head_dim_qwen2(config: dict, value: Any) -> str | None:
    if value and value != config["hidden_size"] // config["num_attention_heads"]:
        return (f"llama.cpp's qwen2 takes head_dim = hidden_size/num_attention_heads "
                f"({config['hidden_size'] // config['num_attention_heads']}) only")
    return None


def _mistral_window(config: dict, value: Any) -> str | None:
    if value is not None and value < config.get("max_position_embeddings", 0):
        return (f"attention is limited to the last {value} tokens within a context of "
                f"{config.get('max_position_embeddings')}, and llama.cpp's llama architecture has no sliding window "
                "(set \"sliding_window\": null in config.json to export with full attention, as llama.cpp's own "
                "converter does, accepting different answers past that many tokens)")
    return None


def _qwen2_window(config: dict, value: Any) -> str | None:
    if value:
        return ("sliding-window layers are not implemented by llama.cpp's qwen2 architecture; "
                "set \"use_sliding_window\": false if the model was trained with full attention")
    return None


def _qwen2_layer_types(config: dict, value: Any) -> str | None:
    if value and any(t != "full_attention" for t in value):
        return "llama.cpp's qwen2 has only full-attention layers"
    return None


def _partial_rotary(config: dict, value: Any) -> str | None:
    return None if value in (None, 1, 1.0) else "llama.cpp's llama/qwen2 rotate the whole head; only 1.0 is exported"


def _positive(config: dict, value: Any) -> str | None:
    return None if isinstance(value, int) and value > 0 else "must be a positive integer"


def _pruned(config: dict, value: Any) -> str | None:
    return None if not value else "pruned heads change the attention shapes per layer; llama.cpp takes one shape"


INERT = "inert: changes no output"
SILU = _only(("silu", "swish"), "llama.cpp's llama/qwen2 feed-forward is SiLU-gated only")

COMMON = {
    "architectures": Key("general.architecture (LlamaForCausalLM, MistralForCausalLM → llama; Qwen2ForCausalLM → qwen2)"),
    "model_type": Key("general.architecture, when architectures is absent"),
    "vocab_size": Key("{arch}.vocab_size (the embedding rows, extended vocabularies included)"),
    "hidden_size": Key("{arch}.embedding_length", _positive),
    "num_hidden_layers": Key("{arch}.block_count", _positive),
    "intermediate_size": Key("{arch}.feed_forward_length", _positive),
    "num_attention_heads": Key("{arch}.attention.head_count", _positive),
    "num_key_value_heads": Key("{arch}.attention.head_count_kv (null: = num_attention_heads)"),
    "head_dim": Key("{arch}.attention.key_length / value_length and {arch}.rope.dimension_count"),
    "max_position_embeddings": Key("{arch}.context_length"),
    "rms_norm_eps": Key("{arch}.attention.layer_norm_rms_epsilon (absent: 1e-6, transformers' default)"),
    "rope_theta": Key("{arch}.rope.freq_base (absent: 10000)"),
    "rope_scaling": Key("default → nothing; linear → {arch}.rope.scaling.type/factor; llama3 → rope_freqs.weight; "
                        "yarn → {arch}.rope.scaling.type/factor/original_context_length; dynamic, longrope → refused",
                        _llama3_only_on_llama),
    "rope_parameters": Key("transformers 5's form of rope_theta + rope_scaling: mapped the same way",
                           _llama3_only_on_llama),
    "partial_rotary_factor": Key("1.0 only (llama.cpp rotates the whole head)", _partial_rotary),
    "hidden_act": Key("silu only (llama.cpp's SiLU-gated feed-forward)", SILU),
    "tie_word_embeddings": Key("true: no output.weight, llama.cpp reuses token_embd.weight"),
    "pruned_heads": Key("empty only", _pruned),
    # these change nothing a GGUF computes
    "bos_token_id": Key(f"{INERT} (tokenizer.ggml.* come from the tokenizer files)"),
    "eos_token_id": Key(f"{INERT} (tokenizer.ggml.* come from the tokenizer files)"),
    "pad_token_id": Key(f"{INERT} (tokenizer.ggml.* come from the tokenizer files)"),
    "torch_dtype": Key(f"{INERT} (the stream merges in fp32; --quant sets the GGUF types)"),
    "dtype": Key(f"{INERT} (the stream merges in fp32; --quant sets the GGUF types)"),
    "transformers_version": Key(INERT),
    "_name_or_path": Key(INERT),
    "use_cache": Key(f"{INERT} (a speed switch)"),
    "initializer_range": Key(f"{INERT} (random init only)"),
    "attention_dropout": Key(f"{INERT} (dropout is off at inference)"),
    "pretraining_tp": Key(f"{INERT} (Meta's tensor-parallel split of the same matmuls)"),
    "output_hidden_states": Key(INERT), "output_attentions": Key(INERT), "return_dict": Key(INERT),
    "torchscript": Key(INERT), "chunk_size_feed_forward": Key(f"{INERT} (the same FFN in chunks)"),
    "is_encoder_decoder": Key("false only", _only((False,), "an encoder-decoder is not a llama.cpp decoder model")),
    "is_decoder": Key(INERT), "id2label": Key(INERT), "label2id": Key(INERT), "problem_type": Key(INERT),
    "tokenizer_class": Key(f"{INERT} (the tokenizer files are read)"), "finetuning_task": Key(INERT),
}
# generation defaults older transformers wrote into config.json: sampling, not the model
GENERATION = ["max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature", "top_k",
              "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
              "num_return_sequences", "bad_words_ids", "forced_bos_token_id", "forced_eos_token_id"]
COMMON |= {name: Key(f"{INERT} (a generation default; chat/serve take their own)") for name in GENERATION}

TABLES: dict[str, dict[str, Key]] = {
    "llama": COMMON | {
        "attention_bias": Key("true: blk.N.attn_{q,k,v,output}.bias (llama.cpp's llama loads them)"),
        "mlp_bias": Key("true: blk.N.ffn_{gate,up,down}.bias (llama.cpp's llama loads them)"),
    },
    "mistral": COMMON | {
        "sliding_window": Key("null or ≥ max_position_embeddings only: llama.cpp's llama has no sliding window",
                              _mistral_window),
    },
    "qwen2": COMMON | {
        "head_dim": Key("= hidden_size/num_attention_heads only (llama.cpp's qwen2)", _head_dim_qwen2),
        "use_sliding_window": Key("false only: llama.cpp's qwen2 has no sliding window", _qwen2_window),
        "sliding_window": Key("inert while use_sliding_window is false (transformers ignores it then)"),
        "max_window_layers": Key("inert while use_sliding_window is false"),
        "layer_types": Key("full_attention only", _qwen2_layer_types),
        "use_mrope": Key("false only (multimodal rope is Qwen2-VL's)",
                         _only((False, None), "multimodal rope (Qwen2-VL) is not the qwen2 text architecture")),
    },
}


def check_config(config: dict, where: str = "config.json", tensor_names: set[str] | None = None) -> None:
    """Refuse, naming the key and value, anything in `config` the GGUF could not reproduce."""
    arch = arch_of(config)
    table = TABLES[arch.family]
    rope_of(config, where)  # rope type and keys first, with the file named
    present = dict(config)
    if arch.family == "mistral":  # transformers' MistralConfig applies a 4096-token window when the key is absent
        present.setdefault("sliding_window", 4096)
    for key, value in present.items():
        rule = table.get(key)
        if rule is None:
            raise LoraforgeError(
                f"{where}: key {key}={value!r} is not in loraforge's {arch.family} table, so whether it changes "
                "the computation is unknown — the export stops rather than drop it. If it changes no output, "
                "delete it from config.json; the keys loraforge maps or refuses are listed in README "
                "\"Supported model families\"")
        why = rule.check(config, value) if rule.check else None
        if why:
            raise LoraforgeError(f"{where}: {key}={value!r} cannot be exported to GGUF: {why}")
    if head_dim_of(config) % 2:
        raise LoraforgeError(f"{where}: head_dim={head_dim_of(config)} is odd; rope rotates pairs of dimensions")
    if tensor_names is not None:
        _check_tensors(config, where, tensor_names)


def _check_tensors(config: dict, where: str, names: set[str]) -> None:
    tied = config.get("tie_word_embeddings", False)
    has_head = "lm_head.weight" in names
    if tied and has_head:
        raise LoraforgeError(f"{where}: tie_word_embeddings=true, yet the weights carry lm_head.weight: transformers "
                             "replaces it by the embedding, llama.cpp would use it — set tie_word_embeddings to "
                             "false if the output layer was trained apart, or drop lm_head.weight")
    if not tied and not has_head:
        raise LoraforgeError(f"{where}: tie_word_embeddings=false but the weights have no lm_head.weight: "
                             "transformers would start a random output layer — set tie_word_embeddings to true "
                             "if the model shares its embedding")
    biases = {n.rsplit(".", 2)[-2] for n in names if n.endswith("_proj.bias")}
    if arch_of(config).family == "llama":
        declared = ({"q_proj", "k_proj", "v_proj", "o_proj"} if config.get("attention_bias") else set()) | (
            {"gate_proj", "up_proj", "down_proj"} if config.get("mlp_bias") else set())
        if biases - declared:
            raise LoraforgeError(f"{where}: the weights carry {', '.join(sorted(biases - declared))} biases that "
                                 "attention_bias/mlp_bias do not declare: transformers would ignore them")
