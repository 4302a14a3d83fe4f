"""What a client can get wrong, and what a client can do to the server: 401, 400 with a
message naming the field, 404 for an unknown model, a disconnect mid-stream — and the
server answering the next request every time."""

from __future__ import annotations

import time

import pytest

from .conftest import ServerProcess, http, metrics

CHAT = {"model": "learned", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def keyed_server(serve_files):
    process = ServerProcess(str(serve_files["model"]), "--api-key", "s3cret", "--parallel", "1")
    yield process
    process.stop()


def test_api_key_is_required_on_every_v1_route(keyed_server):
    from openai import AuthenticationError, OpenAI

    url = keyed_server.url
    for path, body in [("/v1/models", None), ("/v1/chat/completions", CHAT),
                       ("/v1/completions", {"model": "learned", "prompt": "春", "max_tokens": 2})]:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}]:
            status, reply = http(url + path, body, headers)
            assert status == 401, (path, headers)
            assert "--api-key" in reply["error"]["message"]
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
    assert [m.id for m in good.models.list().data] == ["learned"]
    assert good.chat.completions.create(**CHAT).choices[0].message.content is not None
    assert http(url + "/health")[0] == 200  # probes need no key


LONG_PROMPT = "春天来了，公园里的花都开了。" * 400  # far more than the 2048 tokens a slot holds


@pytest.mark.parametrize("body, status, words", [
    (b'{"model": "learned", "messages": [', 400, ["not valid JSON"]),
    (b'[1, 2]', 400, ["JSON object"]),
    ({**CHAT, "max_tokens": 0}, 400, ["max_tokens", "greater than 0"]),
    ({**CHAT, "max_tokens": -5}, 400, ["max_tokens"]),
    ({**CHAT, "max_tokens": "16"}, 400, ["max_tokens", "integer"]),
    ({**CHAT, "temperature": "hot"}, 400, ["temperature"]),
    ({**CHAT, "stream": "yes"}, 400, ["stream"]),
    ({**CHAT, "stop": 5}, 400, ["stop"]),
    ({**CHAT, "n": 2}, 400, ["n=1"]),
    ({**CHAT, "messages": []}, 400, ["messages"]),
    ({**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, 400, ["messages.0.role"]),
    ({**CHAT, "messages": [{"role": "assistant", "content": "hi"}]}, 400, ["user"]),
    ({"messages": CHAT["messages"]}, 400, ["model", "required"]),
    ({**CHAT, "messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, ["prompt is", "--ctx-size"]),
    ({**CHAT, "model": "gpt-4"}, 404, ["gpt-4", "learned, random"]),
])
def test_bad_requests_get_a_4xx_that_says_what_is_wrong(server, client, body, status, words):
    got, reply = http(server.url + "/v1/chat/completions", body)
    assert got == status, reply
    message = reply["error"]["message"]
    assert all(w in message for w in words), message
    # and the server is still there for the next request
    assert client.chat.completions.create(**CHAT).choices[0].finish_reason in ("stop", "length")


def test_completions_refuse_an_empty_or_overlong_prompt(server):
    status, reply = http(server.url + "/v1/completions", {"model": "learned", "prompt": LONG_PROMPT})
    assert status == 400 and "2048" in reply["error"]["message"]
    status, reply = http(server.url + "/v1/completions", {"model": "learned", "prompt": ["a", "b"]})
    assert status == 400 and "prompt" in reply["error"]["message"]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client):
    before = metrics(server.url)
    stream = client.completions.create(model="learned", prompt="春天来了", max_tokens=100000, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    received = [chunk.choices[0].text for _, chunk in zip(range(3), stream)]
    stream.close()
    assert len(received) == 3
    deadline = time.monotonic() + 5
    while metrics(server.url)["loraforge_slots_busy"] and time.monotonic() < deadline:
        time.sleep(0.02)
    after = metrics(server.url)
    assert after["loraforge_slots_busy"] == 0
    assert after["loraforge_requests_cancelled_total"] == before["loraforge_requests_cancelled_total"] + 1
    # it was stopped, not run to the end of its 2048-token slot
    assert after["loraforge_completion_tokens_total"] - before["loraforge_completion_tokens_total"] < 1500
    reply = client.completions.create(model="learned", prompt="春天", max_tokens=4, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 4


def test_unknown_routes_and_methods_are_4xx(server):
    assert http(server.url + "/v1/nothing")[0] == 404
    assert http(server.url + "/v1/models", {"x": 1})[0] == 405


def test_a_dropped_non_streaming_request_is_cancelled(server, client):
    import json
    import socket

    before = metrics(server.url)
    body = json.dumps({"model": "learned", "prompt": "春天来了", "max_tokens": 100000, "temperature": 0,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    while (metrics(server.url)["loraforge_requests_cancelled_total"] == before["loraforge_requests_cancelled_total"]
           and time.monotonic() < deadline):
        time.sleep(0.02)
    after = metrics(server.url)
    assert after["loraforge_requests_cancelled_total"] == before["loraforge_requests_cancelled_total"] + 1
    assert after["loraforge_slots_busy"] == 0
    assert client.completions.create(model="learned", prompt="春天", max_tokens=4,
                                    extra_body={"ignore_eos": True}).usage.completion_tokens == 4
