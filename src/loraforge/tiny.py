"""Tiny LLaMA-family models built locally: the demo's base model and the tests' fixtures.

Nothing is downloaded. A SentencePiece tokenizer is trained on a corpus in about a
second, and a model with random weights is written in the standard HF layout
(config.json, model.safetensors, tokenizer files), so every command treats it exactly
like a real base model.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge.vocab.spm import save_hf_tokenizer, train_spm


@dataclass(frozen=True)
class TinyShape:
    """Model size; defaults give a ~0.3M-parameter model that trains in seconds on a CPU."""

    arch: str = "llama"  # llama | qwen2
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2  # grouped-query attention, as in LLaMA-2-70B / Mistral / Qwen2
    ffn: int = 128
    tie_embeddings: bool = False
    max_positions: int = 1024
    rope_theta: float = 10000.0


def build_spm_tokenizer(corpus: list[Path], out_dir: Path, vocab_size: int = 2000,
                        character_coverage: float = 0.98) -> Path:
    """Train a LLaMA-style SentencePiece BPE tokenizer and write it in HF layout.

    The low default coverage keeps tiny vocabularies possible on a corpus with thousands
    of distinct characters; the rarest characters fall back to bytes, as in LLaMA.
    """
    work = out_dir / "_spm"
    model_file = train_spm(corpus, work / "tok", vocab_size, model_type="bpe",
                           character_coverage=character_coverage)
    save_hf_tokenizer(model_file, out_dir)
    shutil.rmtree(work)
    return out_dir


# The pre-tokenizer split used by Llama-3 and (with single digits) Qwen2.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_STYLES = {
    # style: (special tokens, bos, eos, pad)
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|end_of_text|>", None),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>"),
}


def build_bpe_tokenizer(corpus: list[Path], out_dir: Path, style: str = "llama3", vocab_size: int = 1200) -> Path:
    """A byte-level BPE tokenizer in the style of Llama-3 or Qwen2, trained on a corpus."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, bos, eos, pad = BPE_STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(p) for p in corpus], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
        "add_bos_token": bos is not None, "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000,
    }, indent=2))
    return out_dir


def model_config(shape: TinyShape, vocab_size: int):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=shape.hidden, intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-5, tie_word_embeddings=shape.tie_embeddings,
        bos_token_id=1, eos_token_id=2, rope_theta=shape.rope_theta,
    )
    if shape.arch == "llama":
        return LlamaConfig(**common)
    if shape.arch == "qwen2":
        return Qwen2Config(**common)  # q/k/v projections carry biases
    raise ValueError(f"unknown tiny arch {shape.arch!r}")


def build_tiny_model(tokenizer_dir: Path, out_dir: Path, shape: TinyShape = TinyShape(), seed: int = 0) -> Path:
    """A randomly initialised model sized to the tokenizer, saved with it in HF layout."""
    from transformers import AutoModelForCausalLM

    from loraforge.tokenizer import load_tokenizer, save_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    config = model_config(shape, len(tokenizer))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir)
    return out_dir


def add_outlier_channels(model_dir: Path, out: Path, share: int = 25, factor: float = 8.0, seed: int = 0) -> Path:
    """The same function with a real LLM's activation profile: in every layer 1/`share` of each RMSNorm's
    channels × `factor` and the weight columns that read them ÷ `factor` (an exact reparameterization).

    A tiny model trained for seconds has no outlier activation channels; real ones do (LLM.int8(),
    Dettmers et al. 2022), and they are what an importance matrix exploits."""
    from transformers import AutoModelForCausalLM

    from loraforge.tokenizer import copy_tokenizer_files

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for norm, readers in ((layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
                                  (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])):
                scale = torch.ones(norm.weight.shape[0])
                scale[torch.randperm(len(scale), generator=generator)[:len(scale) // share]] = factor
                norm.weight.mul_(scale)
                for linear in readers:
                    linear.weight.div_(scale)
    model.save_pretrained(out)
    copy_tokenizer_files(model_dir, out)
    return out
