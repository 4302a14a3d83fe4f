"""The optional vLLM engine: argument mapping, tested without vLLM installed."""

from __future__ import annotations

import pytest

from loraforge.errors import LoraforgeError
from loraforge.infer.engine import GenerationConfig
from loraforge.infer.vllm import openai_request_params, sampling_params_kwargs, vllm_serve_command
from loraforge.models import resolve_model

from .test_models import adapter_dir, hf_dir


def test_sampling_params_carry_every_parameter():
    config = GenerationConfig(max_new_tokens=7, temperature=0.3, top_k=0, top_p=0.9, min_p=0.1,
                              repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=-0.5,
                              stop=("。",), seed=11)
    kwargs = sampling_params_kwargs(config, stop_strings=("### Instruction:",), stop_token_ids=[2])
    assert kwargs == {"n": 1, "max_tokens": 7, "temperature": 0.3, "top_k": -1, "top_p": 0.9, "min_p": 0.1,
                      "repetition_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": -0.5,
                      "stop": ["### Instruction:", "。"], "stop_token_ids": [2], "seed": 11,
                      "skip_special_tokens": True}
    body = openai_request_params(config)
    assert body["extra_body"] == {"top_k": -1, "min_p": 0.1, "repetition_penalty": 1.2}
    assert (body["max_tokens"], body["stop"], body["seed"]) == (7, ["。"], 11)


@pytest.mark.parametrize("field, value, message", [("typical_p", 0.5, "typical_p"), ("num_beams", 4, "beam search"),
                                                   ("no_repeat_ngram_size", 3, "no_repeat_ngram_size")])
def test_parameters_vllm_lacks_are_refused_not_dropped(field, value, message):
    with pytest.raises(LoraforgeError, match=message):
        sampling_params_kwargs(GenerationConfig(**{field: value}))


def test_serve_command_with_the_adapter_and_more_lora_modules(tmp_path):
    base = hf_dir(tmp_path / "base")
    sft = adapter_dir(tmp_path / "sft", base)
    other = adapter_dir(tmp_path / "other", base)
    (other / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 48}')
    args = vllm_serve_command(resolve_model(sft), {"other": other}, port=9000, n_ctx=2048)
    assert args[:3] == ["vllm", "serve", str(base)]
    assert args[args.index("--tokenizer") + 1] == str(sft)  # the trained chat template lives there
    assert args[args.index("--max-model-len") + 1] == "2048" and args[args.index("--port") + 1] == "9000"
    assert "--enable-lora" in args and args[args.index("--max-lora-rank") + 1] == "64"  # 48 → vLLM's next slot
    assert args[args.index("--lora-modules") + 1:] == [f"sft={sft}", f"other={other}"]


def test_serve_command_refusals(tmp_path):
    base = hf_dir(tmp_path / "base")
    chain = adapter_dir(tmp_path / "sft", adapter_dir(tmp_path / "pt", base))
    with pytest.raises(LoraforgeError, match="merge the earlier ones into the base first"):
        vllm_serve_command(resolve_model(chain))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(LoraforgeError, match="--engine llamacpp"):
        vllm_serve_command(resolve_model(tmp_path / "m.gguf"))
    assert vllm_serve_command(resolve_model(base))[-2:] == ["--tokenizer", str(base)]


def test_engine_without_vllm_installed_says_how_to_install(tmp_path):
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed")
    except ImportError:
        pass
    from loraforge.infer.engine import open_engine

    with pytest.raises(LoraforgeError, match=r"pip install 'loraforge\[vllm\]'"):
        open_engine(hf_dir(tmp_path / "base"), engine="vllm")
