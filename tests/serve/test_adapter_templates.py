"""Each served name gets its own chat template: an adapter GGUF's own (written by `export
lora-gguf`, read back by our server — llama.cpp does not apply it), `--chat-template NAME|FILE`
for a model that has none, and a 400 naming --chat-template when there is no template at all.
Real `loraforge serve` processes on 127.0.0.1, asked with the official openai client."""

from __future__ import annotations

import openai
import pytest

from loraforge.data.records import Turn
from loraforge.data.templates import get_template, render_prompt

from .conftest import ServerProcess

QUESTION = "你好"


@pytest.fixture(scope="module")
def files(tiny_llama, root_conftest, tmp_path_factory):
    """base.gguf: no chat template at all; sft.gguf: a LoRA trained with llama2-zh, as an adapter GGUF."""
    from loraforge.export.gguf_writer import export_gguf
    from loraforge.export.lora_gguf import export_lora_gguf
    from loraforge.train.run import train

    out = tmp_path_factory.mktemp("adapter-templates")
    run = out / "sft"
    train(root_conftest.sft_config(tiny_llama, run, "train.max_steps=2", "data.max_samples=8",
                                   "data.template=llama2-zh", "lora.r=4"))
    return {"base": export_gguf(tiny_llama, [], out / "base.gguf", "f16"),
            "sft": export_lora_gguf(run, out / "sft.gguf")}


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _prompt_tokens(tiny_llama, name: str) -> int:
    """Tokens of the question rendered with template `name`, as llama.cpp cuts them (BOS included)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(tiny_llama), vocab_only=True, verbose=False)
    text = render_prompt(get_template(name), None, [Turn("user", QUESTION)], "</s>", bos_token="<s>")
    return len(llm.tokenize(text.encode(), add_bos=True, special=True))


def _ask(client, model: str):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                          temperature=0, max_tokens=4)


def test_the_adapter_uses_its_own_template_and_a_bare_base_gets_a_400(files):
    server = ServerProcess(str(files["base"]), "--adapter", f"sft={files['sft']}", "--parallel", "1",
                           "--ctx-size", "512")
    try:
        client = _client(server)
        with pytest.raises(openai.BadRequestError, match=r"no chat template.*--chat-template"):
            _ask(client, "base")
        reply = _ask(client, "sft")
        assert reply.usage.prompt_tokens == _prompt_tokens(files["base"], "llama2-zh")
    finally:
        server.stop()


def test_chat_template_serves_a_gguf_without_one(files):
    server = ServerProcess(str(files["base"]), "--adapter", f"sft={files['sft']}", "--chat-template",
                           "chinese-alpaca", "--parallel", "1", "--ctx-size", "512")
    try:
        client = _client(server)
        assert _ask(client, "base").usage.prompt_tokens == _prompt_tokens(files["base"], "chinese-alpaca")
        # the adapter's own template still wins for its name
        assert _ask(client, "sft").usage.prompt_tokens == _prompt_tokens(files["base"], "llama2-zh")
    finally:
        server.stop()


def test_an_unknown_chat_template_stops_the_server_with_the_names(files):
    with pytest.raises(RuntimeError, match=r"exited with 2.*neither a template name"):
        ServerProcess(str(files["base"]), "--chat-template", "no-such")
