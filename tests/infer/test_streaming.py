"""The prompt and streaming rules every engine shares (no model needed)."""

from __future__ import annotations

import pytest

from loraforge.data.templates import get_template, jinja_template
from loraforge.errors import LoraforgeError
from loraforge.infer.engine import (
    ByteText,
    GenerationConfig,
    StopFilter,
    prompt_text,
    render_chat,
    stream_tokens,
    template_stop_strings,
)

CHATML_JINJA = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_stream(pieces: list[bytes], stops=(), stop_ids=(), max_new=100):
    """stream_tokens over token ids 0..n whose pieces are `pieces` (what llama.cpp's pieces look like)."""
    text = ByteText()
    return list(stream_tokens(iter(range(len(pieces))), lambda t: text(pieces[t]), text.flush, set(stop_ids),
                              stops, max_new))


def test_a_character_split_across_tokens_is_held_back_until_complete():
    emoji, han = "🙂".encode(), "龘".encode()  # 4 and 3 UTF-8 bytes: byte-fallback tokens
    chunks = byte_stream([b"ok ", emoji[:1], emoji[1:3], emoji[3:], han[:2], han[2:], b"!"])
    assert [c.text for c in chunks] == ["ok ", "", "", "🙂", "", "龘", "!", ""]
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])


def test_stop_string_split_across_tokens_is_never_shown():
    pieces = [s.encode() for s in ["答案是", "四", "。\n#", "## Ins", "truction:", "下一个"]]
    chunks = byte_stream(pieces, stops=("### Instruction:",))
    assert "".join(c.text for c in chunks) == "答案是四。\n"
    assert not any("#" in c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop" and len(chunks) == 5  # nothing generated after the stop


def test_held_back_prefix_that_is_no_stop_is_released():
    chunks = byte_stream([b"a #", b"# b", b"c"], stops=("###",))
    assert [c.text for c in chunks] == ["a ", "## b", "c", ""]  # "#" held until "## b" rules "###" out


def test_stop_id_ends_without_its_text_and_max_new_tokens_ends_with_length():
    chunks = byte_stream([b"x", b"y", b"</s>"], stop_ids={2})
    assert "".join(c.text for c in chunks) == "xy" and (chunks[-1].token_id, chunks[-1].finish_reason) == (2, "stop")
    chunks = byte_stream([b"x", b"y", b"z"], max_new=2)
    assert "".join(c.text for c in chunks) == "xy" and chunks[-1].finish_reason == "length" and len(chunks) == 2


def test_stop_filter_cuts_at_the_earliest_of_several_stops():
    f = StopFilter(["<|im_end|>", "。"])
    assert f.push("你好<|im") == ("你好", False)
    assert f.push("_end|>。") == ("", True)
    assert StopFilter(["B", "A"]).push("xAyB") == ("x", True)


@pytest.mark.parametrize("name", ["chinese-alpaca", "llama2-zh", "chatml", "llama3"])
def test_loraforge_templates_render_as_in_training(name):
    from loraforge.data.records import Turn
    from loraforge.data.templates import render_prompt

    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "长城在哪里？"}]
    expected = render_prompt(get_template(name), "你是助手。",
                             [Turn("user", "你好"), Turn("assistant", "你好！"), Turn("user", "长城在哪里？")],
                             "</s>", bos_token="<s>")
    assert prompt_text(render_chat(jinja_template(get_template(name)), messages, "<s>", "</s>")) == expected
    assert template_stop_strings(jinja_template(get_template(name))) == get_template(name).stop_strings


def test_foreign_template_renders_with_sandboxed_jinja_and_stops_at_its_end_marker():
    messages = [{"role": "user", "content": [{"type": "text", "text": "你好"}]}]
    assert render_chat(CHATML_JINJA, messages, "", "") == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    assert template_stop_strings(CHATML_JINJA) == ("<|im_end|>",)
    with pytest.raises(LoraforgeError, match="chat template failed"):
        render_chat("{{ raise_exception('only user turns') }}", messages, "", "")
    with pytest.raises(LoraforgeError, match="chat template failed"):  # the sandbox refuses attribute tricks
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", messages, "", "")


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system message may only be the first"),
    ([{"role": "tool", "content": "a"}], "tool result .* follows no tool call"),
    ([{"role": "robot", "content": "a"}], "role must be"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "content must be text"),
])
def test_bad_messages(messages, message):
    with pytest.raises(LoraforgeError, match=message):
        render_chat(jinja_template(get_template("chatml")), messages, "", "")


def test_no_template_says_to_pass_one():
    with pytest.raises(LoraforgeError, match="pass --template NAME"):
        render_chat(None, [{"role": "user", "content": "x"}], "", "")


def test_generation_config_checks_its_values_and_round_trips():
    with pytest.raises(LoraforgeError, match=r"top_p=1.5 must be in \(0, 1\]"):
        GenerationConfig(top_p=1.5)
    config = GenerationConfig(seed=3, stop=["。"])
    assert GenerationConfig.from_dict(config.to_dict()) == config
    with pytest.raises(LoraforgeError, match="unknown generation parameter 'top_q'"):
        GenerationConfig.from_dict({"top_q": 1})


@pytest.mark.parametrize("kind", ["spm", "llama3", "qwen2"])
def test_token_bytes_spell_the_text_as_llama_cpp_pieces_do(kind, spm_tokenizer, bpe_tokenizers):
    """The transformers engine streams token bytes, as llama.cpp does, for SentencePiece and byte-level BPE."""
    from transformers import PreTrainedTokenizerFast

    from loraforge.infer.hf import token_bytes

    tokenizer = PreTrainedTokenizerFast.from_pretrained(spm_tokenizer if kind == "spm" else bpe_tokenizers[kind])
    to_bytes = token_bytes(tokenizer)
    text = "春天来了，公园里的花都开了。 Hello 🙂 龘\n第二行"
    ids = tokenizer.encode(text, add_special_tokens=False)
    spelled = b"".join(to_bytes(i) for i in ids).decode("utf-8")
    assert spelled.removeprefix(" ") == text  # SentencePiece writes the leading space it added


@pytest.mark.parametrize("name", ["llama2", "chinese-llama"])
def test_a_length_cut_inside_a_character_with_the_real_vocabularies(real_tokenizers, name):
    """Meta's LLaMA-2 and Chinese-LLaMA's vocabularies: the ids are sentencepiece's own encoding,
    where 🙂 is four byte tokens and a rare character three; a cut anywhere ends before the
    character, never in U+FFFD, and the whole stream is the text."""
    import sentencepiece as spm

    from loraforge.infer.engine import ByteText
    from loraforge.infer.hf import _TextDelta, token_bytes
    from loraforge.tokenizer import load_tokenizer

    text = "表情🙂，龘字"
    sp = spm.SentencePieceProcessor(model_file=str(real_tokenizers[name] / "tokenizer.model"))
    ids = sp.encode(text)
    assert sum(sp.id_to_piece(i).startswith("<0x") for i in ids) >= 4  # byte fallback is really exercised
    tokenizer = load_tokenizer(real_tokenizers[name])
    to_bytes = token_bytes(tokenizer)
    for decoder in ("token bytes", "window decode"):
        for k in range(1, len(ids) + 1):
            if decoder == "token bytes":
                text_of = ByteText()
                to_text, flush = (lambda t, text_of=text_of: text_of(to_bytes(t))), text_of.flush
            else:
                delta = _TextDelta(tokenizer, [])
                to_text, flush = delta, delta.flush
            out = "".join(c.text for c in stream_tokens(iter(ids), to_text, flush, set(), (), k)).lstrip()
            assert "\ufffd" not in out and text.startswith(out), (decoder, k, out)
        assert out == text
