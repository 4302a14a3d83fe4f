"""`loraforge serve` under hostile clients, in a real process on 127.0.0.1.

- Fuzzed from its own OpenAPI document (/openapi.json) with schemathesis: bodies that fit
  the schema and bodies that break it, for every operation — never a 5xx, never a hang, and
  the server still answers a good request afterwards.
- Bodies that are not UTF-8, JSON strings with lone surrogates, 1 MB prompts: a 400 that
  names the problem, quickly.
- 64 clients at once that drop their connections at random points of a streamed answer,
  three rounds: every slot is freed, and the server's resident memory stays within
  MEMORY_BOUND_MB of what it was after the first round.

Bounded: a fixed number of examples per operation (derandomized, so a failure reproduces),
a 256-token context so no answer runs long, a timeout on every request.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time

import psutil
import pytest
from serve.conftest import ServerProcess, http

EXAMPLES = 40  # per operation and mode
REQUEST_TIMEOUT_S = 30
MEMORY_BOUND_MB = 40
CLIENTS, ROUNDS = 64, 3
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    from loraforge.export.gguf_writer import export_gguf

    gguf = export_gguf(tiny_llama, [], tmp_path_factory.mktemp("fuzz") / "tiny.gguf")
    process = ServerProcess(str(gguf), "--ctx-size", "256", "--parallel", "4", "--chat-template", "chinese-alpaca")
    yield process
    process.stop()


def answers_a_good_request(server) -> None:
    status, body = http(server.url + "/v1/chat/completions", GOOD)
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length"), body
    assert server.proc.poll() is None
    assert "Traceback" not in server.output(), server.output()[-3000:]  # a dropped client is not an error


def test_the_openapi_document_names_every_route_and_its_body(server):
    status, doc = http(server.url + "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
                                 "/health"}
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name = chat["$ref"].rsplit("/", 1)[1]
    fields = doc["components"]["schemas"][name]["properties"]
    assert {"messages", "max_tokens", "response_format", "tools", "logprobs", "stream"} <= set(fields)


def fuzz(server, operation, mode: str, statuses: set[int]) -> None:
    """EXAMPLES generated requests to one operation; every status lands in `statuses`."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def call(case):
        response = case.call(base_url=server.url, timeout=REQUEST_TIMEOUT_S)
        statuses.add(response.status_code)
        assert response.status_code < 500, (case.body, response.text[:500])
        if response.status_code == 400:  # an error the client can read: OpenAI's shape, a message
            assert response.json()["error"]["message"], response.text

    call()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_get_no_5xx_and_no_hang(server, mode):
    import schemathesis

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    seen: dict[str, set[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode == "negative" and operation.method.upper() == "GET":
            continue  # no parameters to break
        fuzz(server, operation, mode, seen.setdefault(operation.label, set()))
    assert len(seen) == (5 if mode == "positive" else 3), seen
    if mode == "negative":  # bodies that break the schema are refused, not answered
        assert seen["POST /v1/chat/completions"] & {400}, seen
    answers_a_good_request(server)


BAD_BODIES = [
    ("not UTF-8", b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe\xb3\xa4"}]}',
     "not valid JSON"),
    ("GBK text", '{"model": "tiny", "messages": [{"role": "user", "content": "长城"}]}'.encode("gbk"),
     "not valid JSON"),
    ("a lone surrogate", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "not valid JSON"),
    ("UTF-16", '{"model": "tiny", "messages": []}'.encode("utf-16"), "not valid JSON"),
    ("cut off", b'{"model": "tiny", "messages": [{"role": "us', "not valid JSON"),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
@pytest.mark.parametrize("case, body, expected", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_a_body_that_is_not_utf8_json_is_a_400(server, path, case, body, expected):
    if path != "/v1/chat/completions":
        body = body.replace(b'"messages": [{"role": "user", "content": ', b'"prompt": ', 1) \
            .replace(b'"messages": [{"role": "us', b'"prompt": "us').replace(b'}]}', b'}')
        if path == "/v1/embeddings":
            body = body.replace(b'"prompt"', b'"input"')
    status, answer = http(server.url + path, body)
    assert status == 400 and expected in answer["error"]["message"], (status, answer)


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", lambda text: {"model": "tiny", "messages": [{"role": "user", "content": text}]}),
    ("/v1/completions", lambda text: {"model": "tiny", "prompt": text}),
    ("/v1/embeddings", lambda text: {"model": "tiny", "input": text}),
])
def test_a_one_megabyte_prompt_is_refused_quickly_by_its_length(server, path, body):
    text = "长城是中国古代的防御工程。" * (1_000_000 // 39)  # 1 MB of UTF-8
    assert len(text.encode()) > 999_000
    started = time.monotonic()
    status, answer = http(server.url + path, body(text))
    assert status == 400 and "tokens" in answer["error"]["message"], (status, answer)
    assert "256" in answer["error"]["message"]  # what the context holds
    assert time.monotonic() - started < REQUEST_TIMEOUT_S
    answers_a_good_request(server)


def dropping_client(server, rng: random.Random) -> None:
    """A streamed request, dropped after a random number of bytes (or before any answer)."""
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "讲个故事" * rng.randint(1, 8)}],
                       "max_tokens": 200, "stream": True, "temperature": 1.0}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=REQUEST_TIMEOUT_S) as sock:
        how = rng.random()
        if how < 0.15:  # half a request: the head, then gone
            sock.sendall(head)
            return
        sock.sendall(head + body)
        want, got = rng.randint(0, 4000), 0
        while got < want:
            chunk = sock.recv(512)
            if not chunk:
                break
            got += len(chunk)
        if how < 0.5:  # a reset rather than a clean close
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


def client(server, seed: int, errors: list[BaseException]) -> None:
    try:
        dropping_client(server, random.Random(seed))
    except OSError:
        pass  # the connection the client itself broke
    except BaseException as error:  # noqa: BLE001 — reported by the test
        errors.append(error)


@pytest.mark.slow
def test_64_clients_dropping_at_random_free_their_slots_and_memory_stays_flat(server):
    rss = []
    for round_ in range(ROUNDS):
        rng = random.Random(round_)
        seeds = [rng.randrange(1 << 30) for _ in range(CLIENTS)]
        errors: list[BaseException] = []
        threads = [threading.Thread(target=client, args=(server, seed, errors)) for seed in seeds]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=2 * REQUEST_TIMEOUT_S)
        assert not errors and not any(t.is_alive() for t in threads), errors
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while True:  # every dropped request's slot is given back
            _, health = http(server.url + "/health")
            if health["slots_busy"] == 0 and health["queue_length"] == 0:
                break
            assert time.monotonic() < deadline, health
            time.sleep(0.2)
        answers_a_good_request(server)
        rss.append(psutil.Process(server.proc.pid).memory_info().rss / 2**20)
    growth = max(rss[1:]) - rss[0]
    assert growth < MEMORY_BOUND_MB, f"resident memory by round (MB): {[round(r) for r in rss]}"
