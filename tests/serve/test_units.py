"""The server's pure parts: streamed text around stop strings and UTF-8, request schemas."""

from __future__ import annotations

import pytest

from loraforge.errors import LoraforgeError
from loraforge.serve.sampling import TextStream
from loraforge.serve.schema import ChatCompletionRequest, CompletionRequest, parse_body


def feed(stream: TextStream, pieces: list[bytes]) -> list[str]:
    return [stream.push(p) for p in pieces] + [stream.finish()]


def test_a_chinese_character_split_over_tokens_is_sent_whole():
    data = "春天".encode()
    out = feed(TextStream(()), [data[:1], data[1:2], data[2:4], data[4:]])
    assert out == ["", "", "春", "天", ""]


@pytest.mark.parametrize("pieces, stop, sent, text", [
    (["你好", "###", " Ins", "truction:", "再见"], "### Instruction:", ["你好", "", "", ""], "你好"),
    (["ab", "c##", "#d"], "###", ["ab", "c", ""], "abc"),  # stop split across tokens
    (["a#", "#b"], "###", ["a", "##b"], "a##b"),  # a false start is released
    (["x", "STOP"], "STOP", ["x", ""], "x"),
])
def test_stop_strings_are_never_sent(pieces, stop, sent, text):
    stream = TextStream((stop,))
    got = []
    for piece in pieces:
        got.append(stream.push(piece.encode()))
        if stream.stopped:
            break
    got.append(stream.finish())
    assert "".join(got) == text
    assert got[:len(sent)] == sent


def test_unknown_fields_are_ignored_and_known_ones_checked_strictly():
    body = parse_body(ChatCompletionRequest, b'{"model": "m", "messages": [{"role": "user", "content": "hi"}],'
                                             b' "user": "u", "whatever": {"a": 1}, "temperature": 0}')
    assert body.temperature == 0.0 and body.message_dicts() == [{"role": "user", "content": "hi"}]
    with pytest.raises(LoraforgeError, match=r"messages\.0\.content"):
        parse_body(ChatCompletionRequest, b'{"model": "m", "messages": [{"role": "user", "content": 5}]}')
    with pytest.raises(LoraforgeError, match="seed"):
        parse_body(CompletionRequest, b'{"model": "m", "prompt": "p", "seed": "1"}')


def test_text_parts_content_and_defaults():
    body = parse_body(ChatCompletionRequest, b'{"model": "m", "messages": [{"role": "user", "content":'
                                             b' [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}')
    assert body.message_dicts()[0]["content"] == "ab"
    completion = parse_body(CompletionRequest, b'{"model": "m", "prompt": ["only one"]}')
    assert completion.prompt_text() == "only one" and completion.max_tokens == 16  # OpenAI's default
    params = completion.sampling(completion.max_tokens, ("###",))
    assert params.stop == ("###",) and params.temperature == 1.0
