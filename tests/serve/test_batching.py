"""Continuous batching: concurrent requests share decode steps, and batching changes no answer."""

from __future__ import annotations

import asyncio

from .conftest import metrics

PROMPTS = ["春天来了", "公园里的花", "我们今天", "中国的", "天气很好", "学习是"]


def batched_steps(url: str) -> float:
    """llama_decode calls that carried more than one sequence."""
    return sum(v for k, v in metrics(url).items()
               if k.startswith("loraforge_decode_steps_total{") and k != 'loraforge_decode_steps_total{sequences="1"}')


def test_concurrent_requests_are_decoded_together_and_answer_as_alone(server, client):
    from openai import AsyncOpenAI

    def request(prompt):
        return dict(model="learned", prompt=prompt, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})

    alone = [client.completions.create(**request(p)).choices[0].text for p in PROMPTS]
    before = batched_steps(server.url)

    async def together():
        async with AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as aclient:
            replies = await asyncio.gather(*(aclient.completions.create(**request(p)) for p in PROMPTS))
        return [r.choices[0].text for r in replies]

    concurrent = asyncio.run(together())
    assert concurrent == alone
    # 6 requests on 4 slots: most of the 40 steps of each carried several sequences
    assert batched_steps(server.url) - before >= 40


def test_greedy_chat_is_the_same_with_and_without_company(server, client, learned_questions):
    """Chat requests of different lengths prefill and decode in the same steps."""
    from concurrent.futures import ThreadPoolExecutor

    questions = [q for q, _ in learned_questions[:6]]

    def ask(question):
        reply = client.chat.completions.create(model="learned", messages=[{"role": "user", "content": question}],
                                               temperature=0, max_tokens=48)
        return reply.choices[0].message.content

    alone = [ask(q) for q in questions]
    with ThreadPoolExecutor(len(questions)) as pool:
        assert list(pool.map(ask, questions)) == alone


def test_base_and_adapter_requests_run_side_by_side(client):
    from concurrent.futures import ThreadPoolExecutor

    def ask(model):
        return client.completions.create(model=model, prompt="春天来了", max_tokens=20, temperature=0).choices[0].text

    alone = {m: ask(m) for m in ("learned", "random")}
    with ThreadPoolExecutor(4) as pool:
        mixed = list(pool.map(ask, ["learned", "random", "learned", "random"]))
    assert mixed == [alone["learned"], alone["random"]] * 2


def step_buckets(url: str) -> dict[str, float]:
    return {k.split('le="')[1].rstrip('"}'): v for k, v in metrics(url).items()
            if k.startswith("loraforge_decode_step_tokens_bucket")}


def test_a_long_prompt_is_fed_in_chunks_while_another_request_decodes(server, client):
    running = client.completions.create(model="learned", prompt="春天", max_tokens=100000, temperature=0,
                                        stream=True, extra_body={"ignore_eos": True})
    chunks = iter(running)
    next(chunks)  # decoding now
    before = step_buckets(server.url)
    long = client.completions.create(model="learned", prompt="春天来了，公园里的花都开了。" * 100, max_tokens=1)
    after = step_buckets(server.url)
    assert next(chunks).choices[0].finish_reason is None  # the first request decoded all along
    running.close()
    assert long.usage.prompt_tokens > 1000
    delta = {bound: after[bound] - before[bound] for bound in after}
    assert delta["+Inf"] - delta["256"] == 0  # no step carried more than one chunk (128) + the decodes
    assert delta["256"] - delta["128"] >= long.usage.prompt_tokens // 128 - 1


def test_a_repeated_prefix_is_not_prefilled_again_and_changes_nothing(server, client, direct_llama,
                                                                     learned_questions):
    """A slot keeps its KV cells after a request; the next request that starts with the same
    tokens (a chat's history) reuses them — and answers exactly as a fresh llama.cpp does."""
    from loraforge.data.records import Turn
    from loraforge.data.templates import get_template, render_prompt

    first, second = learned_questions[0][0], learned_questions[1][0]

    def ask(messages):
        return client.chat.completions.create(model="learned", messages=messages, temperature=0, max_tokens=48)

    before = metrics(server.url)["loraforge_prompt_tokens_cached_total"]
    reply = ask([{"role": "user", "content": first}])
    answer = reply.choices[0].message.content
    again = ask([{"role": "user", "content": first}, {"role": "assistant", "content": answer},
                 {"role": "user", "content": second}]).choices[0].message.content
    reused = metrics(server.url)["loraforge_prompt_tokens_cached_total"] - before
    assert reused >= reply.usage.prompt_tokens - 1  # the first prompt came from the cache

    template = get_template("chinese-alpaca")
    text = render_prompt(template, None, [Turn("user", first), Turn("assistant", answer), Turn("user", second)],
                         "</s>", bos_token="<s>")
    fresh = direct_llama.create_completion(direct_llama.tokenize(text.encode(), add_bos=True, special=True),
                                           max_tokens=48, temperature=0.0, stop=list(template.stop_strings))
    # llama-cpp-python drops bytes that make no character (errors="ignore"); the server shows them as U+FFFD
    assert again.replace("\ufffd", "") == fresh["choices"][0]["text"]


def test_requests_arriving_together_share_one_prefill_of_their_system_prompt(server, client, direct_llama,
                                                                           learned_questions):
    from concurrent.futures import ThreadPoolExecutor

    system = "你是一个认真负责、知识渊博的中文助手，请用简洁的中文回答用户的问题。" * 3  # no slot has it yet
    questions = [q for q, _ in learned_questions[:4]]

    def ask(question):
        reply = client.chat.completions.create(model="learned", temperature=0, max_tokens=32, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": question}])
        return reply.choices[0].message.content, reply.usage.prompt_tokens

    before = metrics(server.url)["loraforge_prompt_tokens_cached_total"]
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(ask, questions))
    shared = metrics(server.url)["loraforge_prompt_tokens_cached_total"] - before
    system_tokens = len(direct_llama.tokenize(system.encode(), add_bos=False)) - 2  # less its edges
    assert system_tokens > 50
    assert shared >= (len(questions) - 1) * system_tokens  # one slot prefilled the system prompt, three shared it
    assert [text for text, _ in together] == [ask(q)[0] for q in questions]
