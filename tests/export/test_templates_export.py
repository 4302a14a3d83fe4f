"""A chat template for every export: `export gguf --template NAME|FILE` embeds it (a base with
none included, replacing one the tokenizer brings), and `export lora-gguf` writes the template
the adapter was trained with into the adapter GGUF, where llama.cpp keeps it as metadata."""

from __future__ import annotations

import ctypes

import gguf
import pytest

from loraforge.cli import main
from loraforge.data.templates import get_template, jinja_template
from loraforge.errors import LoraforgeError
from loraforge.export.chat_template import CHAT_TEMPLATE_KEY, gguf_chat_template
from loraforge.export.gguf_writer import export_gguf
from loraforge.export.lora_gguf import export_lora_gguf
from loraforge.train.run import train

from conftest import sft_config


def _llama_cpp_template(path):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return llm.metadata.get(CHAT_TEMPLATE_KEY)


def _template_fields(path) -> int:
    return sum(1 for name in gguf.GGUFReader(str(path)).fields if name == CHAT_TEMPLATE_KEY)


@pytest.fixture(scope="module")
def sft_run(tiny_llama, tmp_path_factory):
    """A two-step LoRA SFT run on the template-less tiny base, trained with llama2-zh."""
    out = tmp_path_factory.mktemp("tpl") / "sft"
    train(sft_config(tiny_llama, out, "train.max_steps=2", "data.max_samples=8", "data.template=llama2-zh",
                     "lora.r=4"))
    return out


@pytest.mark.parametrize("name", ["chinese-alpaca", "llama2-zh", "chatml"])
def test_a_base_without_a_template_gets_the_named_one(tiny_llama, tmp_path, name):
    assert _llama_cpp_template(export_gguf(tiny_llama, [], tmp_path / "plain.gguf", "f16")) is None
    out = export_gguf(tiny_llama, [], tmp_path / "named.gguf", "f16", template=name)
    assert _llama_cpp_template(out) == jinja_template(get_template(name))  # what llama.cpp reads from the file


def test_a_jinja_file_replaces_the_runs_template(tiny_llama, sft_run, tmp_path):
    own = export_gguf(tiny_llama, [sft_run], tmp_path / "own.gguf", "f16")
    assert gguf_chat_template(own) == jinja_template(get_template("llama2-zh"))
    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:",
                     encoding="utf-8")
    out = export_gguf(tiny_llama, [sft_run], tmp_path / "mine.gguf", "f16", template=str(jinja))
    assert _llama_cpp_template(out) == jinja.read_text(encoding="utf-8")
    assert _template_fields(out) == 1


def test_an_unknown_template_is_refused_before_writing(tiny_llama, tmp_path, capsys):
    with pytest.raises(LoraforgeError, match=r"'no-such' is neither a template name \(.*chinese-alpaca.*\) nor a Jinja"):
        export_gguf(tiny_llama, [], tmp_path / "x.gguf", "f16", template="no-such")
    assert main(["export", "gguf", "--base", str(tiny_llama), "--template", "no-such", "-o",
                 str(tmp_path / "y.gguf")]) == 2
    assert list(tmp_path.iterdir()) == []


def test_the_adapter_gguf_carries_its_trained_template(tiny_llama, sft_run, tmp_path):
    import llama_cpp

    out = export_lora_gguf(sft_run, tmp_path / "sft.gguf")
    want = jinja_template(get_template("llama2-zh"))
    assert gguf_chat_template(out) == want
    # llama.cpp loads the adapter and keeps the key as metadata (it never renders with it)
    base = export_gguf(tiny_llama, [], tmp_path / "base.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(base), vocab_only=False, n_ctx=64, verbose=False)
    adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(out).encode())
    assert adapter
    buf = ctypes.create_string_buffer(len(want.encode()) + 16)
    n = llama_cpp.llama_adapter_meta_val_str(adapter, CHAT_TEMPLATE_KEY.encode(), buf, len(buf))
    assert buf.value.decode() == want and n == len(want.encode())
