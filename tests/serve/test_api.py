"""The OpenAI API of `loraforge serve`, through the official openai client, against
llama.cpp itself on the same GGUF: the server must not change what the model says."""

from __future__ import annotations

import pytest

from loraforge.data.templates import get_template
from loraforge.infer.llamacpp import greedy_answer_gguf

from .conftest import http

TEMPLATE = get_template("chinese-alpaca")  # what learned_run trained with, embedded in the GGUF


def chat(client, question: str, **kw):
    return client.chat.completions.create(model="learned", messages=[{"role": "user", "content": question}], **kw)


def test_models_lists_the_base_and_each_adapter(client, server):
    assert [m.id for m in client.models.list().data] == ["learned", "random"]
    status, health = http(server.url + "/health")
    assert status == 200 and health["status"] == "ok" and health["models"] == ["learned", "random"]


def test_greedy_chat_answers_are_llama_cpp_s_and_the_trained_ones(client, direct_llama, learned_questions):
    trained = same = 0
    for question, answer in learned_questions[:4]:
        reply = chat(client, question, temperature=0, max_tokens=64)
        expected = greedy_answer_gguf(direct_llama, TEMPLATE, question, max_new_tokens=64)
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].message.role == "assistant"
        same += 1
        trained += expected.strip() == answer.strip()
        # usage: the prompt as llama.cpp tokenizes it, the answer's tokens without the EOS
        from loraforge.data.records import Turn
        from loraforge.data.templates import render_prompt

        prompt = render_prompt(TEMPLATE, None, [Turn("user", question)], "</s>", bos_token="<s>")
        prompt_ids = direct_llama.tokenize(prompt.encode(), add_bos=True, special=True)
        assert reply.usage.prompt_tokens == len(prompt_ids)
        answer_ids = direct_llama.tokenize(expected.encode(), add_bos=False, special=False)
        assert abs(reply.usage.completion_tokens - len(answer_ids)) <= 1  # re-tokenizing may merge one piece
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        assert reply.choices[0].finish_reason == "stop"
    assert trained >= 2, "the learned model should reproduce some trained answers word for word"


def test_streamed_chat_is_the_same_text_in_pieces(client, learned_questions):
    question = learned_questions[0][0]
    whole = chat(client, question, temperature=0, max_tokens=64)
    chunks = list(chat(client, question, temperature=0, max_tokens=64, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 3  # really streamed, not one blob
    assert "".join(pieces) == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stream_ends_with_done(server):
    import urllib.request

    body = b'{"model": "learned", "prompt": "\xe6\x98\xa5\xe5\xa4\xa9", "max_tokens": 3, "stream": true}'
    request = urllib.request.Request(server.url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def greedy_tokens(llm, prompt: str, n: int) -> list[int]:
    """llama.cpp's own greedy continuation, token by token, up to n tokens or the end of generation."""
    out = []
    for token in llm.generate(llm.tokenize(prompt.encode(), special=True), temp=0.0, top_k=1):
        if llm.token_eos() == token or len(out) == n:
            break
        out.append(token)
    llm.reset()
    return out


def test_completions_continue_the_prompt_like_llama_cpp(client, direct_llama):
    """Token for token llama.cpp's greedy continuation. This prompt's continuation holds a
    stray byte-fallback token (b'\xe8' before '。'): it is shown as U+FFFD, not dropped, and
    max_tokens is exact (llama-cpp-python drops the byte and runs past max_tokens)."""
    prompt = "春天来了，公园里"
    tokens = greedy_tokens(direct_llama, prompt, 16)
    expected = b"".join(direct_llama.detokenize([t]) for t in tokens).decode("utf-8", errors="replace")
    assert "\ufffd" in expected
    reply = client.completions.create(model="learned", prompt=prompt, max_tokens=16, temperature=0)
    assert reply.choices[0].text == expected
    assert reply.choices[0].finish_reason == ("length" if len(tokens) == 16 else "stop")
    assert reply.usage.completion_tokens == len(tokens)
    streamed = client.completions.create(model="learned", prompt=prompt, max_tokens=16, temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_max_tokens_ends_with_length(client, learned_questions):
    reply = chat(client, learned_questions[0][0], temperature=0, max_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3
    whole = chat(client, learned_questions[0][0], temperature=0, max_tokens=64).choices[0].message.content
    assert whole.startswith(reply.choices[0].message.content) and len(reply.choices[0].message.content) < len(whole)
    exact = client.completions.create(model="learned", prompt="春天", max_tokens=5, extra_body={"ignore_eos": True})
    assert exact.usage.completion_tokens == 5 and exact.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_answer_before_it(client, learned_questions, stream):
    question = learned_questions[1][0]
    whole = chat(client, question, temperature=0, max_tokens=64).choices[0].message.content
    stop = whole[3:5]  # two characters from the middle: usually spread over tokens
    cut = whole[:whole.index(stop)]
    if stream:
        chunks = list(chat(client, question, temperature=0, max_tokens=64, stop=[stop, "never-seen"], stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    else:
        reply = chat(client, question, temperature=0, max_tokens=64, stop=stop)
        text, reason = reply.choices[0].message.content, [reply.choices[0].finish_reason]
    assert text == cut and stop not in text
    assert reason == ["stop"]


def test_a_seed_makes_sampling_reproducible(client):
    def sample(seed):
        return client.completions.create(model="learned", prompt="春天来了", max_tokens=24, temperature=1.0,
                                         seed=seed).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert len({first, *(sample(s) for s in (1, 2, 3))}) > 1  # the seed matters


def test_an_adapter_by_name_is_llama_cpp_with_that_adapter(client, serve_files):
    import llama_cpp

    prompt = "春天来了，公园里"
    base = client.completions.create(model="learned", prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    adapted = client.completions.create(model="random", prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    with_lora = llama_cpp.Llama(model_path=str(serve_files["model"]), lora_path=str(serve_files["adapter"]),
                                n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
    assert adapted == with_lora.create_completion(prompt, max_tokens=16, temperature=0.0)["choices"][0]["text"]
    assert adapted != base


def test_unknown_extra_fields_are_accepted(server):
    status, body = http(server.url + "/v1/chat/completions", {
        "model": "learned", "messages": [{"role": "user", "content": "你好", "name": "me"}], "max_tokens": 2,
        "user": "someone", "logit_bias": {}, "parallel_tool_calls": False, "some_future_field": [1, 2]})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_chat_page_is_served_at_the_root(server):
    import urllib.request

    with urllib.request.urlopen(server.url + "/", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/html")
        page = response.read().decode()
    assert "<html" in page.lower() and "v1/chat/completions" in page
