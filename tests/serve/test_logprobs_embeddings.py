"""`logprobs` / `top_logprobs` and `/v1/embeddings` of `loraforge serve` on a GGUF, through the
official openai client, against llama.cpp itself on the same file: log-probabilities are the
log-softmax of llama-cpp-python's own logits (`Llama(logits_all=True)`) for the same ids, and
embeddings are `Llama(embedding=True, pooling_type=MEAN).embed(…, normalize=True)`."""

from __future__ import annotations

import base64
import concurrent.futures
import math

import numpy as np
import pytest

from loraforge.data.records import Turn
from loraforge.data.templates import get_template, render_prompt

from .conftest import ServerProcess, http, is_utf8

TEMPLATE = get_template("chinese-alpaca")  # what learned_run trained with, embedded in the GGUF
PROMPT = "春天来了，公园里"  # its greedy continuation holds a stray byte-fallback token (see test_api)
TOLERANCE = 2e-3  # one decode of the whole text vs the server's prefill + one token per step
TEXTS = ["春天来了，公园里的花都开了。", "你好", "我每天坚持跑步五公里。"]


@pytest.fixture(scope="module")
def scoring_llama(serve_files):
    """llama.cpp's logits for every position: the reference log-probabilities."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(serve_files["model"]), n_ctx=2048, n_threads=1, n_threads_batch=1,
                           logits_all=True, verbose=False)


@pytest.fixture(scope="module")
def embedding_llama(serve_files):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(serve_files["model"]), embedding=True, n_ctx=2048, n_batch=2048,
                           n_ubatch=2048, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, n_threads=1,
                           n_threads_batch=1, verbose=False)


@pytest.fixture(scope="module")
def token_ids(scoring_llama) -> dict[bytes, list[int]]:
    """Token bytes → the ids spelled so; control tokens by their text (`</s>`), as reported."""
    table: dict[bytes, list[int]] = {}
    for i in range(scoring_llama.n_vocab()):
        table.setdefault(scoring_llama.detokenize([i], special=True), []).append(i)
    return table


def log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    top = rows.max(axis=-1, keepdims=True)
    return rows - top - np.log(np.exp(rows - top).sum(axis=-1, keepdims=True))


def reference(llm, prompt_ids: list[int], answer_ids: list[int]) -> np.ndarray:
    """llama.cpp's log-probabilities of the next token at each answer position."""
    llm.reset()
    llm.eval(prompt_ids + answer_ids)
    start = len(prompt_ids) - 1
    return log_softmax(np.array(llm.scores[start:start + len(answer_ids)]))


def chat_prompt_ids(llm, question: str) -> list[int]:
    prompt = render_prompt(TEMPLATE, None, [Turn("user", question)], "</s>", bos_token="<s>")
    return llm.tokenize(prompt.encode(), add_bos=True, special=True)


def answer_ids(entries, expected: np.ndarray | None, table) -> list[int]:
    """The ids of the reported tokens (by their bytes; a spelling two ids share is settled by
    the reported logprob)."""
    ids = []
    for k, entry in enumerate(entries):
        candidates = table[bytes(entry.bytes)]
        if len(candidates) > 1 and expected is not None:
            candidates = sorted(candidates, key=lambda i: abs(expected[k][i] - entry.logprob))
        ids.append(candidates[0])
    return ids


def chat(client, question: str, **kw):
    return client.chat.completions.create(model="learned", messages=[{"role": "user", "content": question}], **kw)


def check_against_llama(entries, prompt_ids, llm, table, n_top: int) -> np.ndarray:
    ids = answer_ids(entries, None, table)
    expected = reference(llm, prompt_ids, ids)
    ids = answer_ids(entries, expected, table)
    expected = reference(llm, prompt_ids, ids)
    for k, (entry, token) in enumerate(zip(entries, ids)):
        assert entry.logprob == pytest.approx(expected[k][token], abs=TOLERANCE), k
        assert entry.token == bytes(entry.bytes).decode("utf-8", errors="replace")
        best = np.argsort(-expected[k], kind="stable")[:n_top]
        assert len(entry.top_logprobs) == n_top
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(expected[k][best].tolist(), abs=TOLERANCE)
        for j, alt in enumerate(entry.top_logprobs):
            near_tie = any(abs(alt.logprob - other) < 2 * TOLERANCE for i, other in enumerate(values) if i != j)
            if not near_tie:
                assert bytes(alt.bytes) == llm.detokenize([int(best[j])], special=True), (k, j)
    return expected


@pytest.mark.parametrize("n_top", [0, 5, 20])
def test_greedy_chat_logprobs_are_llama_cpp_s_log_softmax(client, scoring_llama, token_ids, learned_questions,
                                                          n_top):
    question = learned_questions[0][0]
    reply = chat(client, question, temperature=0, max_tokens=48, logprobs=True, top_logprobs=n_top)
    prompt_ids = chat_prompt_ids(scoring_llama, question)
    assert reply.usage.prompt_tokens == len(prompt_ids)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens  # ends with the end token, which is not a token of the text
    assert b"".join(bytes(e.bytes) for e in entries).decode() == reply.choices[0].message.content
    expected = check_against_llama(entries, prompt_ids, scoring_llama, token_ids, n_top)
    for k, entry in enumerate(entries):  # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(expected[k].max(), abs=TOLERANCE)
        if n_top:
            assert entry.logprob == entry.top_logprobs[0].logprob and entry.bytes == entry.top_logprobs[0].bytes


def test_sampled_tokens_carry_the_model_s_own_distribution(client, scoring_llama, token_ids):
    """Drawn at temperature 1.5 with top_k 40, the answer's tokens are the drawn ones, and their
    logprobs the model's own distribution: the same as at any other temperature."""
    messages = [{"role": "user", "content": "春天"}]

    def ask(**kw):
        return client.chat.completions.create(model="learned", messages=messages, logprobs=True, top_logprobs=5,
                                              **kw)

    prompt_ids = chat_prompt_ids(scoring_llama, "春天")
    for seed in range(5, 15):  # an answer of a few tokens, not all of them the most likely one
        hot = ask(max_tokens=24, temperature=1.5, seed=seed, extra_body={"top_k": 40})
        entries = hot.choices[0].logprobs.content
        assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace") \
            == hot.choices[0].message.content
        expected = check_against_llama(entries, prompt_ids, scoring_llama, token_ids, 5)
        if len(entries) >= 3 and any(e.logprob < expected[k].max() - 0.1 for k, e in enumerate(entries)):
            break
    else:
        pytest.fail("ten seeds drew nothing but the most likely tokens")
    cold = ask(max_tokens=8, temperature=0.2, seed=1)
    assert cold.choices[0].logprobs.content[0].top_logprobs == entries[0].top_logprobs


def test_completions_have_the_legacy_shape(client, scoring_llama, token_ids):
    reply = client.completions.create(model="learned", prompt=PROMPT, max_tokens=16, temperature=0, logprobs=3)
    logprobs = reply.choices[0].logprobs
    n = reply.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == n
    # the stray byte b'\xe8' is shown as U+FFFD in the text and in its token
    assert "\ufffd" in reply.choices[0].text and "\ufffd" in logprobs.tokens
    prompt_ids = scoring_llama.tokenize(PROMPT.encode(), add_bos=True, special=True)
    ids = []
    for token in scoring_llama.generate(prompt_ids, temp=0.0, top_k=1):
        if token == scoring_llama.token_eos() or len(ids) == n:
            break
        ids.append(token)
    # text_offset: where each token's text is in prompt + text, in order (a byte token, shown as
    # U+FFFD, points at the U+FFFD or the character its byte went into)
    full, starts = PROMPT + reply.choices[0].text, logprobs.text_offset
    assert starts[0] == len(PROMPT) and starts == sorted(starts) and starts[-1] < len(full)
    assert all(full[start:start + len(token)] == token for start, token in zip(starts, logprobs.tokens)), \
        (logprobs.tokens, starts, full)
    expected = reference(scoring_llama, prompt_ids, ids)
    assert logprobs.token_logprobs == pytest.approx([expected[k][i] for k, i in enumerate(ids)], abs=TOLERANCE)
    for k, (token, top) in enumerate(zip(logprobs.tokens, logprobs.top_logprobs)):
        assert token in top and top[token] == logprobs.token_logprobs[k]
        # the three likeliest, and the chosen one when it is not among them (byte tokens that
        # all read "\ufffd" share one key: the legacy shape is keyed by text)
        assert len(top) <= 4
        assert max(top.values()) == pytest.approx(expected[k].max(), abs=TOLERANCE)
        assert top[token] == max(top.values())  # greedy
    zero = client.completions.create(model="learned", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0)
    assert [list(t) for t in zero.choices[0].logprobs.top_logprobs] == [[t] for t in zero.choices[0].logprobs.tokens]
    plain = client.completions.create(model="learned", prompt=PROMPT, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == zero.choices[0].text


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streamed_logprobs_are_the_whole_answer_s(client, learned_questions, endpoint):
    question = learned_questions[1][0]
    if endpoint == "chat":
        kw = dict(temperature=0, max_tokens=48, logprobs=True, top_logprobs=4)
        whole = chat(client, question, **kw)
        chunks = list(chat(client, question, stream=True, **kw))
        streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole.choices[0].logprobs.content]
        for c in chunks:  # each chunk carries the entries of its own text
            text = c.choices[0].delta.content or "" if c.choices else ""
            mine = c.choices[0].logprobs.content if c.choices and c.choices[0].logprobs else []
            assert b"".join(bytes(e.bytes) for e in mine).decode() == text
    else:
        kw = dict(model="learned", prompt=PROMPT, temperature=0, max_tokens=16, logprobs=2)
        whole = client.completions.create(**kw).choices[0].logprobs
        chunks = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kw) if c.choices]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [x for c in chunks if c for x in getattr(c, key)] == getattr(whole, key), key


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tokens_cut_off_by_a_stop_string_have_no_logprobs(client, learned_questions, stream):
    question = learned_questions[1][0]
    full = chat(client, question, temperature=0, max_tokens=64, logprobs=True)
    text = full.choices[0].message.content
    stop = text[3:5]
    kw = dict(temperature=0, max_tokens=64, stop=stop, logprobs=True)
    if stream:
        chunks = list(chat(client, question, stream=True, **kw))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    else:
        reply = chat(client, question, **kw)
        content, entries = reply.choices[0].message.content, reply.choices[0].logprobs.content
    assert content == text[:text.index(stop)]
    shown = b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace")
    assert content.startswith(shown) and len(entries) < len(full.choices[0].logprobs.content)
    # the tokens wholly before the stop string: the full answer's first ones, and no more
    assert [e.model_dump() for e in entries] == [e.model_dump() for e in full.choices[0].logprobs.content[:len(entries)]]
    next_token = full.choices[0].logprobs.content[len(entries)]
    assert len(shown) + len(bytes(next_token.bytes).decode("utf-8", errors="replace")) > len(content)


def test_byte_tokens_of_a_character_report_their_raw_bytes(client, learned_questions):
    for question, _ in learned_questions:
        reply = chat(client, question, temperature=0, max_tokens=64, logprobs=True)
        entries = reply.choices[0].logprobs.content
        partial = [e for e in entries if not is_utf8(bytes(e.bytes))]
        if partial:
            break
    else:
        pytest.fail("no answer has a character spelled in byte tokens")
    assert all(e.token == bytes(e.bytes).decode("utf-8", errors="replace") and "\ufffd" in e.token for e in partial)
    assert b"".join(bytes(e.bytes) for e in entries).decode() == reply.choices[0].message.content
    # cut by max_tokens inside that character: its first bytes are neither shown nor reported
    k = entries.index(partial[0]) + 1
    cut = chat(client, question, temperature=0, max_tokens=k, logprobs=True)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == k
    assert [e.bytes for e in cut.choices[0].logprobs.content] == [e.bytes for e in entries[:k - 1]]


CHAT = {"model": "learned", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 2}


@pytest.mark.parametrize("path, body, words", [
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, ["top_logprobs", "20"]),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": -1}, ["top_logprobs", "0"]),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, ["top_logprobs", "logprobs: true"]),
    ("/v1/chat/completions", {**CHAT, "logprobs": 3}, ["logprobs", "boolean"]),
    ("/v1/completions", {"model": "learned", "prompt": "春", "logprobs": 6}, ["logprobs", "5"]),
    ("/v1/completions", {"model": "learned", "prompt": "春", "logprobs": True}, ["logprobs", "integer"]),
    ("/v1/embeddings", {"model": "learned", "input": []}, ["input", "empty"]),
    ("/v1/embeddings", {"model": "learned", "input": ["a", ""]}, ["index 1", "empty"]),
    ("/v1/embeddings", {"model": "learned", "input": "a", "encoding_format": "hex"}, ["encoding_format"]),
    ("/v1/embeddings", {"model": "learned", "input": "a", "dimensions": 8}, ["dimensions", "64"]),
    ("/v1/embeddings", {"model": "learned", "input": [[1, 99999]]}, ["input 0", "99999", "vocabulary"]),
    ("/v1/embeddings", {"model": "learned", "input": ["春天", "春天来了，公园里的花都开了。" * 400]},
     ["input 1", "tokens", "2048"]),
    ("/v1/embeddings", {"model": "gpt-4", "input": "a"}, ["gpt-4", "learned, random"]),
])
def test_bad_logprobs_and_embedding_requests_are_400s(server, path, body, words):
    status, reply = http(server.url + path, body)
    assert status == (404 if body["model"] == "gpt-4" else 400), reply
    message = reply["error"]["message"]
    assert all(word in message for word in words), message
    status, reply = http(server.url + "/v1/embeddings", {"model": "learned", "input": "春天"})
    assert status == 200 and len(reply["data"][0]["embedding"]) == 64


def test_embeddings_are_llama_cpp_s_mean_pooled_and_normalized(client, embedding_llama):
    reply = client.embeddings.create(model="learned", input=TEXTS, encoding_format="float")
    assert reply.object == "list" and reply.model == "learned"
    assert [d.index for d in reply.data] == [0, 1, 2] and all(d.object == "embedding" for d in reply.data)
    expected = embedding_llama.embed(TEXTS, normalize=True)
    for got, want in zip(reply.data, expected):
        assert len(got.embedding) == embedding_llama.n_embd()
        assert got.embedding == pytest.approx(want, abs=1e-5)
        assert math.fsum(x * x for x in got.embedding) == pytest.approx(1.0, abs=1e-5)
    ids = [embedding_llama.tokenize(t.encode()) for t in TEXTS]
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == sum(len(i) for i in ids)
    # one at a time, in another order, and as token ids: the same vectors
    for text, want in zip(reversed(TEXTS), reversed(reply.data)):
        alone = client.embeddings.create(model="learned", input=text, encoding_format="float").data[0].embedding
        assert alone == pytest.approx(want.embedding, abs=1e-6)
    by_ids = client.embeddings.create(model="learned", input=ids, encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in by_ids.data], [d.embedding for d in reply.data], atol=1e-6)
    single = client.embeddings.create(model="learned", input=ids[1], encoding_format="float")
    assert single.data[0].embedding == pytest.approx(reply.data[1].embedding, abs=1e-6)
    exact = client.embeddings.create(model="learned", input=TEXTS[0], dimensions=64, encoding_format="float")
    assert exact.data[0].embedding == pytest.approx(reply.data[0].embedding, abs=1e-6)


def test_base64_embeddings_are_the_same_floats(server, client):
    status, floats = http(server.url + "/v1/embeddings", {"model": "learned", "input": TEXTS})
    status64, packed = http(server.url + "/v1/embeddings",
                            {"model": "learned", "input": TEXTS, "encoding_format": "base64"})
    assert status == status64 == 200
    for as_float, as_b64 in zip(floats["data"], packed["data"]):
        decoded = np.frombuffer(base64.b64decode(as_b64["embedding"]), dtype="<f4")
        assert decoded.tolist() == as_float["embedding"]  # bit for bit
    # the openai client asks for base64 by default and decodes it itself
    default = client.embeddings.create(model="learned", input=TEXTS)
    assert [d.embedding for d in default.data] == [d["embedding"] for d in floats["data"]]


def test_an_adapter_s_embeddings_are_llama_cpp_s_with_that_adapter(client, serve_files):
    import llama_cpp

    with_lora = llama_cpp.Llama(model_path=str(serve_files["model"]), lora_path=str(serve_files["adapter"]),
                                embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, n_ctx=256,
                                n_threads=1, n_threads_batch=1, verbose=False)
    adapted = client.embeddings.create(model="random", input=TEXTS[0], encoding_format="float").data[0].embedding
    base = client.embeddings.create(model="learned", input=TEXTS[0], encoding_format="float").data[0].embedding
    assert adapted == pytest.approx(with_lora.embed(TEXTS[0], normalize=True), abs=1e-5)
    assert adapted != pytest.approx(base, abs=1e-3)


def test_embeddings_do_not_disturb_answers_being_generated(client, learned_questions):
    question = learned_questions[2][0]
    alone = chat(client, question, temperature=0, max_tokens=64, logprobs=True, top_logprobs=2)
    alone_vectors = client.embeddings.create(model="learned", input=TEXTS, encoding_format="float")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(chat, client, question, temperature=0, max_tokens=64, logprobs=True, top_logprobs=2)
                   for _ in range(2)]
        vectors = [pool.submit(client.embeddings.create, model="learned", input=TEXTS * 4, encoding_format="float")
                   for _ in range(3)]
        for answer in answers:
            reply = answer.result()
            assert reply.choices[0].message.content == alone.choices[0].message.content
            assert [e.logprob for e in reply.choices[0].logprobs.content] == pytest.approx(
                [e.logprob for e in alone.choices[0].logprobs.content], abs=TOLERANCE)
        for future in vectors:
            got = future.result().data
            np.testing.assert_allclose([d.embedding for d in got[:3]], [d.embedding for d in alone_vectors.data],
                                       atol=1e-6)


def test_the_hf_engine_refuses_logprobs_and_embeddings(learned_run):
    process = ServerProcess(str(learned_run[1].output_dir), "--name", "run")
    try:
        chat_body = {"model": "run", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for path, body in [("/v1/chat/completions", {**chat_body, "logprobs": True}),
                           ("/v1/chat/completions", {**chat_body, "logprobs": True, "top_logprobs": 3}),
                           ("/v1/completions", {"model": "run", "prompt": "春", "max_tokens": 2, "logprobs": 1}),
                           ("/v1/embeddings", {"model": "run", "input": "春天"})]:
            status, reply = http(process.url + path, body)
            assert status == 400, (path, reply)
            message = reply["error"]["message"]
            assert ("logprobs" in message or "embeddings" in message) and "gguf" in message and "HF" in message
        status, reply = http(process.url + "/v1/chat/completions", {**chat_body, "logprobs": False})
        assert status == 200 and reply["choices"][0]["logprobs"] is None
    finally:
        process.stop()
