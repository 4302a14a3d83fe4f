"""What current OpenAI clients send beyond the basics: the `developer` role, structured
output (`response_format`), and answers cut by `max_tokens` in the middle of a character —
through the official openai client against a real `loraforge serve` on 127.0.0.1."""

from __future__ import annotations

import json

import pytest

from .conftest import ServerProcess, http, is_utf8

YES_NO_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                                  "sure": {"type": "boolean"}},
                 "required": ["answer", "sure"]}


def chat(client, messages, **kw):
    return client.chat.completions.create(model="learned", messages=messages, **kw)


def test_developer_role_is_the_system_prompt(client, learned_questions):
    question = learned_questions[0][0]
    as_system = chat(client, [{"role": "system", "content": "你是一个有用的助手。"},
                              {"role": "user", "content": question}], temperature=0, max_tokens=32)
    as_developer = chat(client, [{"role": "developer", "content": "你是一个有用的助手。"},
                                 {"role": "user", "content": question}], temperature=0, max_tokens=32)
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_answer_cut_by_max_tokens_never_ends_in_half_a_character(client, direct_llama, learned_questions,
                                                                   stream):
    # a trained answer with a character the vocabulary spells in byte tokens (two or three
    # per character), which the model reproduces word for word
    for question, answer in learned_questions:
        ids = direct_llama.tokenize(answer.encode(), add_bos=False, special=False)
        split = [k for k in range(1, len(ids)) if not is_utf8(direct_llama.detokenize(ids[:k]))]
        messages = [{"role": "user", "content": question}]
        full = chat(client, messages, temperature=0, max_tokens=64).choices[0].message.content
        if split and full == answer:
            break
    else:
        pytest.fail("no reproduced trained answer has a character split over byte tokens")
    cuts = []
    for k in range(1, len(ids) + 1):
        if stream:
            chunks = list(chat(client, messages, temperature=0, max_tokens=k, stream=True,
                               stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            used = chunks[-1].usage.completion_tokens
        else:
            reply = chat(client, messages, temperature=0, max_tokens=k)
            text, reason, used = reply.choices[0].message.content, [reply.choices[0].finish_reason], \
                reply.usage.completion_tokens
        if reason != ["length"]:
            break  # the whole answer is shorter than k tokens
        assert "\ufffd" not in text, f"max_tokens={k}: {text!r}"
        assert full.startswith(text), f"max_tokens={k}: {text!r} is not the start of {full!r}"
        assert used == k  # the held-back bytes' tokens still count
        cuts.append(text)
    assert len(cuts) >= max(split)
    # a cut after the first bytes of a character shows nothing of it (the sampled ids need
    # not be the re-tokenized answer's, so not every `split` place is one)
    assert any(cuts[k - 1] == cuts[k - 2] for k in split if k > 1), (split, cuts)


def test_json_schema_answers_follow_the_schema(client, learned_questions):
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": YES_NO_SCHEMA, "strict": True}}
    for question, _ in learned_questions[:3]:
        reply = chat(client, [{"role": "user", "content": question}], temperature=0.8, seed=7, max_tokens=48,
                     response_format=fmt)
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        answer = json.loads(reply.choices[0].message.content)
        assert set(answer) == {"answer", "sure"} and answer["answer"] in ("yes", "no")
        assert isinstance(answer["sure"], bool)
    streamed = list(chat(client, [{"role": "user", "content": learned_questions[0][0]}], temperature=0.8, seed=7,
                         max_tokens=48, response_format=fmt, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert set(json.loads(text)) == {"answer", "sure"}


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_json_object_answers_are_json_objects(client, learned_questions, endpoint):
    question = learned_questions[1][0]
    if endpoint == "chat":
        reply = chat(client, [{"role": "user", "content": question}], temperature=0, max_tokens=200,
                     response_format={"type": "json_object"})
        text, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
    else:
        reply = client.completions.create(model="learned", prompt=question, temperature=0, max_tokens=200,
                                          extra_body={"response_format": {"type": "json_object"}})
        text, reason = reply.choices[0].text, reply.choices[0].finish_reason
    assert text.lstrip().startswith("{")
    if reason == "stop":
        assert isinstance(json.loads(text), dict)
    free = chat(client, [{"role": "user", "content": question}], temperature=0, max_tokens=200)
    assert free.choices[0].message.content != text  # the grammar changed the answer (the model answers prose)


@pytest.mark.parametrize("body, field", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"properties": {"a": {"$ref": "#/nowhere"}}}}}},
     "json_schema.schema"),
])
def test_bad_response_formats_are_400s_naming_the_field(server, body, field):
    status, reply = http(server.url + "/v1/chat/completions",
                         {"model": "learned", "messages": [{"role": "user", "content": "hi"}], **body})
    assert status == 400 and field in reply["error"]["message"], reply
    status, _ = http(server.url + "/v1/chat/completions",
                     {"model": "learned", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 200


def test_the_hf_engine_refuses_response_format(learned_run):
    process = ServerProcess(str(learned_run[1].output_dir), "--name", "run")
    try:
        url = process.url + "/v1/chat/completions"
        status, reply = http(url, {"model": "run", "messages": [{"role": "user", "content": "hi"}],
                                   "response_format": {"type": "json_object"}})
        assert status == 400 and "response_format" in reply["error"]["message"]
        assert "gguf" in reply["error"]["message"]  # says what to do
        status, reply = http(url, {"model": "run", "messages": [{"role": "developer", "content": "你好"},
                                                                {"role": "user", "content": "hi"}],
                                   "response_format": {"type": "text"}, "max_tokens": 4})
        assert status == 200, reply
    finally:
        process.stop()
