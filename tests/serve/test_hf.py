"""A HF adapter run served as it is, through the transformers engine, one request at a time."""

from __future__ import annotations

import pytest

from .conftest import ServerProcess, http, metrics


@pytest.fixture(scope="module")
def hf_server(learned_run):
    run_dir = learned_run[1].output_dir
    process = ServerProcess(str(run_dir), "--name", "run")
    process.run_dir = run_dir
    yield process
    process.stop()


def test_an_adapter_run_answers_like_the_transformers_engine(hf_server, learned_questions):
    from openai import OpenAI

    from loraforge.infer.engine import GenerationConfig, open_engine

    client = OpenAI(base_url=hf_server.url + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["run"]
    question = learned_questions[0][0]
    messages = [{"role": "user", "content": question}]
    engine = open_engine(str(hf_server.run_dir), engine="hf")
    expected = engine.complete(messages, GenerationConfig(temperature=0, max_new_tokens=48))
    reply = client.chat.completions.create(model="run", messages=messages, temperature=0, max_tokens=48)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.prompt_tokens and reply.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="run", messages=messages, temperature=0, max_tokens=48,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected.text
    short = client.chat.completions.create(model="run", messages=messages, temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert expected.text.startswith(short.choices[0].message.content)
    status, health = http(hf_server.url + "/health")
    assert status == 200 and health["slots_per_model"] == 1 and "hf" in health["engine"]
    assert metrics(hf_server.url)["loraforge_slots_busy"] == 0
