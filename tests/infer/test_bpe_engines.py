"""Byte-level BPE models with foreign (non-loraforge) Jinja templates, in both engines:
Llama-3 style (the template writes BOS, <|eot_id|> ends a turn) and Qwen2/ChatML style."""

from __future__ import annotations

import json
import shutil

import pytest

from loraforge.infer.engine import GenerationConfig, open_engine

TEMPLATES = {
    "llama3": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
               "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}", "<|eot_id|>"),
    "qwen2": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "<|im_end|>"),
}
MESSAGES = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "春天来了，公园里的花都开了吗？🙂"}]


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def bpe_pair(request, bpe_tokenizers, tmp_path_factory):
    from loraforge.export.gguf_writer import export_gguf
    from loraforge.tiny import TinyShape, build_tiny_model

    style = request.param
    work = tmp_path_factory.mktemp(f"bpe-{style}")
    shutil.copytree(bpe_tokenizers[style], work / "tok")
    config = json.loads((work / "tok" / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = TEMPLATES[style][0]
    (work / "tok" / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    model = build_tiny_model(work / "tok", work / "model", TinyShape(arch="llama" if style == "llama3" else "qwen2"))
    gguf = export_gguf(model, [], work / "m-f32.gguf", "f32")
    hf, cpp = open_engine(model), open_engine(gguf, n_ctx=256)
    yield style, hf, cpp
    hf.close()
    cpp.close()


def test_foreign_template_prompt_and_stops_are_the_same_in_both_engines(bpe_pair):
    style, hf, cpp = bpe_pair
    prompt = hf.render(MESSAGES)
    assert prompt == cpp.render(MESSAGES)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system") == (style == "llama3")
    ids = hf.tokenize(prompt)
    assert ids == cpp.tokenize(prompt)
    assert ids.count(hf.tokenizer.convert_tokens_to_ids("<|begin_of_text|>")) == (style == "llama3")  # one BOS
    marker = TEMPLATES[style][1]
    assert hf.stop_strings == cpp.stop_strings == (marker,)
    assert hf.tokenizer.convert_tokens_to_ids(marker) in hf.stop_ids
    assert hf.stop_ids == cpp.stop_ids  # llama.cpp's end-of-generation tokens (Qwen2: <|endoftext|> too)


@pytest.mark.parametrize("request_", [MESSAGES, "混合 English 和中文 2024年"])
def test_greedy_ids_and_text_are_the_same_in_both_engines(bpe_pair, request_):
    _, hf, cpp = bpe_pair
    config = GenerationConfig(temperature=0, max_new_tokens=24)
    a, b = hf.complete(request_, config), cpp.complete(request_, config)
    assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
    assert len(a.token_ids) > 3
