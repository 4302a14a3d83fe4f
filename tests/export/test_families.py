"""Model families from their published config.json: the GGUF must compute what transformers does.

family_configs/ holds copies of the published config.json of each family, with only sizes
shrunk (hidden, layers, heads, intermediate, and for llama3 rope the original context, so
that a few hundred tokens reach the scaled low-frequency rotary dimensions); the vocabulary
size and special-token ids are set from the test tokenizer when the model is built. Weights
are random, with q/k (and v/o) multiplied up so that attention, and so every logit, depends
on position: a rope mapped wrong changes the answers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from loraforge.errors import LoraforgeError
from loraforge.export.config_table import TABLES, check_config
from loraforge.export.gguf_writer import export_gguf
from loraforge.export.rope import llama3_rope_factors, rope_of

from conftest import CORPUS, random_adapter

CONFIGS = Path(__file__).parent / "family_configs"
FAMILIES = sorted(p.stem for p in CONFIGS.glob("*.json"))
# settings real checkpoints of these families carry, on top of a published config
VARIANTS = {
    "mistral-nemo-head-dim": ("mistral-7b-v0.3", {"head_dim": 32}),  # head_dim ≠ hidden/heads
    "llama-biases": ("llama-3.1-8b", {"attention_bias": True, "mlp_bias": True}),
    "chinese-llama-2-16k-linear": ("chinese-llama-2-7b", {"rope_scaling": {"type": "linear", "factor": 4.0}}),
    "qwen2.5-yarn": ("qwen2.5-0.5b", {"rope_scaling": {"type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 256}}),
}
MODELS = FAMILIES + sorted(VARIANTS)
LLAMA3 = [f for f in FAMILIES if (json.loads((CONFIGS / f"{f}.json").read_text()).get("rope_scaling") or {})
          .get("rope_type") == "llama3"]
QK_SCALE, VO_SCALE, EMBED_SCALE = 6.0, 4.0, 4.0
PROMPT_TOKENS = 400


def published(name: str) -> dict:
    family, extra = VARIANTS.get(name, (name, {}))
    return json.loads((CONFIGS / f"{family}.json").read_text()) | extra


def build_family_model(name: str, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """A random model whose config.json is the published one (sizes shrunk), saved in HF layout."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    config = published(name) | {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                                "eos_token_id": tokenizer.eos_token_id}
    if "pad_token_id" in config:
        config["pad_token_id"] = tokenizer.unk_token_id
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if ".q_proj." in param_name or ".k_proj." in param_name:
                param.mul_(QK_SCALE)
            elif ".v_proj." in param_name or ".o_proj." in param_name:
                param.mul_(VO_SCALE)
            elif "embed_tokens" in param_name or "lm_head" in param_name:
                param.mul_(EMBED_SCALE)
            if param_name.endswith(".bias"):
                param.normal_(0, 0.5)  # biases start at zero: give them something to carry
    model.save_pretrained(out)
    (out / "config.json").write_text(json.dumps(config, indent=2))  # the published form, not transformers 5's
    for file in tokenizer_dir.iterdir():
        if file.is_file():
            shutil.copy(file, out / file.name)
    return out


@pytest.fixture(scope="module")
def family(spm_tokenizer, tmp_path_factory):
    """name → (base dir, LoRA adapter dir), built once per module."""
    built: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            base = build_family_model(name, spm_tokenizer, root / "base")
            built[name] = base, random_adapter(base, root / "lora", 1, r=4, lora_alpha=8)
        return built[name]

    return get


@pytest.fixture(scope="module")
def prompts(spm_tokenizer) -> list[list[int]]:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(spm_tokenizer)
    text = CORPUS.read_text(encoding="utf-8")
    return [tokenizer.encode(text[start:start + 4 * PROMPT_TOKENS])[:PROMPT_TOKENS] for start in (0, 6000)]


def llama_cpp_model(path: Path):
    import llama_cpp

    # an F32 KV cache: llama.cpp's default F16 cache rounds K and V, which is not the file's doing
    return llama_cpp.Llama(model_path=str(path), n_ctx=PROMPT_TOKENS + 64, logits_all=True, verbose=False,
                           n_threads=2, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def agreement(gguf_path: Path, base: Path, adapters: list[Path], prompts: list[list[int]]) -> dict:
    """Top-1 agreement over every position of the prompts, and greedy continuations, llama.cpp vs transformers."""
    from loraforge.eval.parity import reference_model

    llm, model = llama_cpp_model(gguf_path), reference_model(base, adapters)
    agree, greedy = [], []
    try:
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            ours = np.array(llm.scores[: len(ids)])
            with torch.no_grad():
                theirs = model(input_ids=torch.tensor([ids])).logits[0].numpy()
            agree.append(ours.argmax(-1) == theirs.argmax(-1))
            start = ids[:PROMPT_TOKENS // 2]
            with torch.no_grad():
                hf = model.generate(input_ids=torch.tensor([start]), attention_mask=torch.ones(1, len(start), dtype=torch.long),
                                    max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(start):]
            llm.reset()
            llm.eval(start)
            got = []
            while len(got) < 16:
                got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval(got[-1:])
            greedy.append(hf.tolist() == got)
    finally:
        llm.close()
    return {"top1": float(np.concatenate(agree).mean()), "greedy_equal": sum(greedy), "greedy": len(greedy)}


@pytest.mark.slow
@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("name", MODELS)
def test_family_answers_like_transformers(family, prompts, tmp_path, name, with_lora):
    base, lora = family(name)
    adapters = [lora] if with_lora else []
    f32 = agreement(export_gguf(base, adapters, tmp_path / "f32.gguf", "f32"), base, adapters, prompts)
    assert f32["top1"] >= 0.999 and f32["greedy_equal"] == f32["greedy"], (name, f32)
    f16 = agreement(export_gguf(base, adapters, tmp_path / "f16.gguf", "f16"), base, adapters, prompts)
    assert f16["top1"] >= 0.99, (name, f16)
    print(f"agreement {name} {'lora' if with_lora else 'base'}: f32 {f32} f16 {f16}")


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("name", FAMILIES)
def test_verify_passes_for_every_family(family, tmp_path, name, quant):
    from loraforge.eval.parity import verify_export

    base, lora = family(name)
    out = export_gguf(base, [lora], tmp_path / f"{quant}.gguf", quant)
    report = verify_export(out, base, [lora], tmp_path / "parity.json")
    assert report["verdict"] == "PASS", report["problems"]


@pytest.mark.slow
@pytest.mark.parametrize("name", LLAMA3)
def test_without_rope_freqs_llama3_families_answer_otherwise(family, prompts, tmp_path, monkeypatch, name):
    """The check above has teeth: the same export without the rope mapping disagrees."""
    import loraforge.export.gguf_writer as writer

    base, _ = family(name)
    monkeypatch.setattr(writer, "extra_tensors", lambda config: {})
    got = agreement(export_gguf(base, [], tmp_path / "f32.gguf", "f32"), base, [], prompts)
    assert got["top1"] < 0.9, got
    print(f"without rope_freqs {name}: {got}")


def test_rope_freqs_in_the_file_are_llama_cpps_factors(family, tmp_path):
    base, _ = family("llama-3.1-8b")
    reader = gguf.GGUFReader(export_gguf(base, [], tmp_path / "m.gguf", "q8_0"))
    stored = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert stored.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(np.array(stored.data), llama3_rope_factors(rope_of(published("llama-3.1-8b")), 16))


@pytest.mark.parametrize("name", LLAMA3)
def test_llama3_factors_equal_transformers_frequencies(name):
    """At the published sizes (head_dim 128 or 64, 8192 original context): default / factor = transformers' llama3."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = published(name) | {"hidden_size": 2048 if "3.2" in name else 4096, "num_attention_heads": 32,
                                "head_dim": 64 if "3.2" in name else 128}
    config["rope_scaling"] = config["rope_scaling"] | {"original_max_position_embeddings": 8192}
    hf = LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    plain = 1.0 / (hf.rope_parameters["rope_theta"] ** (torch.arange(0, config["head_dim"], 2).float() / config["head_dim"]))
    factors = llama3_rope_factors(rope_of(config), config["head_dim"])
    np.testing.assert_allclose(plain.numpy() / factors, scaled.numpy(), rtol=1e-6)
    assert factors[0] == 1.0 and factors[-1] == config["rope_scaling"]["factor"]


@pytest.mark.parametrize("name", MODELS)
def test_legacy_and_transformers5_configs_read_alike(name):
    """transformers 5 rewrites rope_theta + rope_scaling as rope_parameters; both forms are one rope."""
    legacy = published(name)
    fields = {k: v for k, v in legacy.items() if k != "model_type"}
    modern = AutoConfig.for_model(legacy["model_type"], **fields).to_diff_dict()
    assert "rope_parameters" in modern
    check_config(legacy)
    check_config(modern)
    assert rope_of(legacy) == rope_of(modern)


def test_every_key_transformers_takes_is_in_the_table():
    """A key transformers' config class accepts but no table lists would stop every export."""
    import inspect

    from transformers import MistralConfig, Qwen2Config

    for family_name, cls in {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}.items():
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        assert accepted <= set(TABLES[family_name]), (family_name, accepted - set(TABLES[family_name]))


REFUSED = [
    ("llama-2-7b", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope_scaling\.rope_type='dynamic'.*no such mode"),
    ("llama-3.1-8b", {"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, r"rope_type='longrope'"),
    ("llama-2-7b", {"rope_scaling": {"type": "ntk-by-parts", "factor": 2.0}}, r"rope_type='ntk-by-parts' is unknown"),
    ("llama-3.1-8b", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                       "beta": 2}}, r"rope_scaling key beta=2 is not a llama3 rope setting"),
    ("llama-3.1-8b", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"llama3' lacks high_freq_factor"),
    ("qwen2.5-0.5b", {"rope_scaling": {"type": "yarn", "factor": 4.0, "beta_fast": 64}}, r"beta_fast=64"),
    ("qwen2.5-0.5b", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     r"rope_freqs \(llama3 rope\) only for the llama architecture"),
    ("llama-2-7b", {"hidden_act": "gelu"}, r"hidden_act='gelu' cannot be exported to GGUF: .*SiLU-gated"),
    ("llama-2-7b", {"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0\.5"),
    ("mistral-7b-v0.3", {"sliding_window": 4096}, r"sliding_window=4096 .*last 4096 tokens"),
    ("qwen2.5-0.5b", {"use_sliding_window": True}, r"use_sliding_window=True"),
    ("qwen2.5-0.5b", {"use_mrope": True}, r"use_mrope=True"),
    ("qwen2.5-0.5b", {"head_dim": 32}, r"head_dim=32 .*qwen2 takes head_dim = hidden_size/num_attention_heads \(16\)"),
    ("llama-2-7b", {"quantization_config": {"quant_method": "gptq"}}, r"key quantization_config=.*not in loraforge's "
                                                                      r"llama table"),
    ("tinyllama-1.1b", {"attn_logit_softcapping": 50.0}, r"key attn_logit_softcapping=50\.0 .*delete it"),
]


@pytest.mark.parametrize("name, change, message", REFUSED, ids=[m[:28] for _, _, m in REFUSED])
def test_configs_that_cannot_be_exported_are_refused_by_key(name, change, message):
    with pytest.raises(LoraforgeError, match=message):
        check_config(published(name) | change, "base/config.json")


def test_mistral_without_sliding_window_key_gets_transformers_4096_window():
    config = published("mistral-7b-v0.3")
    del config["sliding_window"]
    with pytest.raises(LoraforgeError, match="sliding_window=4096"):
        check_config(config)


def test_refused_before_a_byte_is_written(family, tmp_path):
    base, _ = family("llama-2-7b")
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"rope_scaling": {"type": "dynamic", "factor": 2.0}}))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LoraforgeError, match=rf"{bad}/config.json: rope_scaling.rope_type='dynamic'"):
        export_gguf(bad, [], out / "m.gguf", "f16")
    assert list(out.iterdir()) == []
