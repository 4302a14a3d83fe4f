"""Tool calling and reasoning through `loraforge serve`, asked with the official openai client.

A tiny pre-trained LLaMA learns, in a short full SFT (LoRA on a 64-wide model does not get there) on glaive-style records written
here, to answer "<city>天气怎么样？" with a get_weather call for that city and, given the
tool's result, to think briefly and answer. It is trained with the qwen3 template (<think>
reasoning) and tool_format mistral (its tool text is the shortest: the definitions as one
JSON list, no instructions — the tiny vocabulary spells English letter by letter), served as the run directory (transformers
engine) and as an exported GGUF (llama.cpp engine); the replies come back as parsed
`tool_calls` (finish_reason "tool_calls", streamed as tool-call deltas) and
`reasoning_content`.
"""

from __future__ import annotations

import json

import pytest

from loraforge.data import tools as tool_text
from loraforge.serve.reply_split import ReplyPlan, ReplyStream, split_reply

from .conftest import ServerProcess, http

WEATHER_TOOL = {"name": "get_weather", "description": "查询天气",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
OPENAI_TOOLS = [{"type": "function", "function": WEATHER_TOOL}]
CITIES = {"北京": 3, "上海": 9, "广州": 18, "深圳": 20, "杭州": 7, "成都": 11}


def question(city: str) -> str:
    return f"{city}天气怎么样？"


def call_json(city: str) -> str:
    return json.dumps({"name": "get_weather", "arguments": {"city": city}}, ensure_ascii=False)


def result(city: str) -> str:
    return json.dumps({"temp": CITIES[city]})


def answer(city: str) -> str:
    return f"{city}今天{CITIES[city]}度。"


THOUGHT = "查到了温度"


@pytest.fixture(scope="module")
def tool_run(pretrained_llama, tmp_path_factory, root_conftest):
    """A full-SFT run that calls get_weather (qwen3 template), trained in about 20 seconds."""
    from loraforge.train.run import train

    data = tmp_path_factory.mktemp("tool-data")
    rows = [{"conversations": [
        {"from": "human", "value": question(city)}, {"from": "function_call", "value": call_json(city)},
        {"from": "observation", "value": result(city)},
        {"from": "gpt", "value": f"<think>\n{THOUGHT}\n</think>\n\n{answer(city)}"}],
        "tools": json.dumps([WEATHER_TOOL], ensure_ascii=False)} for city in CITIES]
    (data / "weather.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"weather_calls": {
        "file_name": "weather.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "tools": "tools"}}}), encoding="utf-8")
    out = tmp_path_factory.mktemp("tool-run") / "sft"
    config = root_conftest.sft_config(pretrained_llama, out, f"data.dir={data}", "data.datasets=weather_calls",
                                      "data.template=qwen3", "data.tool_format=mistral", "data.cutoff_len=1024",
                                      "method=full", "train.epochs=100", "train.lr=1e-3", "train.batch_size=3")
    result_ = train(config)
    return result_.output_dir


@pytest.fixture(scope="module")
def hf_tool_server(tool_run):
    process = ServerProcess(str(tool_run), "--name", "weather")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def tool_client(hf_tool_server):
    from openai import OpenAI

    return OpenAI(base_url=hf_tool_server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def ask(client, city, **extra):
    return client.chat.completions.create(model="weather", messages=[{"role": "user", "content": question(city)}],
                                          tools=OPENAI_TOOLS, temperature=0, max_tokens=200, **extra)


@pytest.mark.slow
def test_a_trained_model_calls_the_tool_through_the_openai_client(tool_client):
    for city in ("北京", "深圳"):
        reply = ask(tool_client, city)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": city})
        assert choice.message.content is None


@pytest.mark.slow
def test_tool_results_go_back_and_the_answer_comes_with_its_reasoning(tool_client):
    city = "上海"
    first = ask(tool_client, city).choices[0].message
    messages = [{"role": "user", "content": question(city)},
                {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in first.tool_calls]},
                {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": result(city)}]
    reply = tool_client.chat.completions.create(model="weather", messages=messages, tools=OPENAI_TOOLS,
                                                temperature=0, max_tokens=200)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "stop" and message.tool_calls is None
    assert message.content == answer(city)
    assert message.model_extra["reasoning_content"] == THOUGHT
    streamed = tool_client.chat.completions.create(model="weather", messages=messages, tools=OPENAI_TOOLS,
                                                   temperature=0, max_tokens=200, stream=True)
    chunks = list(streamed)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    assert (content, reasoning) == (answer(city), THOUGHT)


@pytest.mark.slow
def test_streamed_tool_calls_come_as_deltas_the_client_assembles(tool_client):
    chunks = list(ask(tool_client, "杭州", stream=True))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            entry = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = entry["id"] or delta.id
            entry["name"] += (delta.function.name or "") if delta.function else ""
            entry["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "杭州"})]
    assert calls[0]["id"].startswith("call_")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.slow
def test_tool_choice_none_required_and_named(tool_client, hf_tool_server):
    # none: no tools in the prompt, and the reply is never read as a call
    plain = ask(tool_client, "成都", tool_choice="none").choices[0]
    assert plain.finish_reason in ("stop", "length") and plain.message.tool_calls is None
    # required / named: the prompt ends with the opening of the call, so the reply is one
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = ask(tool_client, "深圳", tool_choice=choice).choices[0]
        assert reply.finish_reason == "tool_calls"
        assert json.loads(reply.message.tool_calls[0].function.arguments) == {"city": "深圳"}
    status, body = http(hf_tool_server.url + "/v1/chat/completions", {
        "model": "weather", "messages": [{"role": "user", "content": "hi"}], "tools": OPENAI_TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert status == 400 and "function 'get_time' is not among the tools (get_weather)" in body["error"]["message"]
    status, body = http(hf_tool_server.url + "/v1/chat/completions", {
        "model": "weather", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"})
    assert status == 400 and "no tools are given" in body["error"]["message"]


# ---------------------------------------------------------------- the reply reader, piece by piece

QWEN3 = ReplyPlan("qwen", "", ("<think>\n", "\n</think>\n\n"))
MISTRAL = ReplyPlan("mistral", "", None, "[TOOL_CALLS] ")
REPLIES = {
    "call after empty thought": "<think>\n\n</think>\n\n<tool_call>\n" + call_json("北京") + "\n</tool_call>",
    "answer after thought": "<think>\n第一步\n第二步\n</think>\n\n北京今天3度。",
    "plain answer": "北京今天3度。",
    "cut inside thought": "<think>\n想了一半",
    "broken call": "<tool_call>\n{\"name\": \"get_weather\", \"argu",
    "lookalike": "<tool",
}


@pytest.mark.parametrize("reply_id", sorted(REPLIES))
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streaming_gives_what_the_whole_reply_gives_however_it_is_cut(reply_id, size):
    text = REPLIES[reply_id]
    whole = split_reply(QWEN3, text)
    stream = ReplyStream(QWEN3)
    deltas = [d for i in range(0, len(text), size) for d in stream.push(text[i:i + size])]
    rest, finish = stream.finish()
    deltas += rest
    content = "".join(d.get("content", "") for d in deltas)
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert (content, reasoning) == (whole.content or "", whole.reasoning or "")
    assert finish == whole.finish_reason
    if whole.tool_calls:
        assert "".join(c["function"]["arguments"] for c in calls) == whole.tool_calls[0].arguments
        assert calls[0]["function"]["name"] == "get_weather"


def test_forced_opening_is_part_of_the_parsed_call():
    opening = tool_text.call_opening("qwen", "get_weather")
    plan = ReplyPlan("qwen", opening, None)
    parts = split_reply(plan, '{"city": "北京"}}\n</tool_call>')
    assert parts.tool_calls == [tool_text.ToolCall("get_weather", '{"city": "北京"}')]


# ---------------------------------------------------------------- the chat page (real Chromium)


@pytest.mark.slow
def test_the_chat_page_shows_the_call_and_sends_the_typed_result_as_the_tool_message(hf_tool_server, browser):  # noqa: F811
    from .test_web import DONE, open_chat, set_field

    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        open_chat(page, hf_tool_server.url)
        set_field(page, "#tools", json.dumps(OPENAI_TOOLS, ensure_ascii=False))
        set_field(page, "#temperature", "0")
        page.fill("#input", question("北京"))
        with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
            page.press("#input", "Enter")
        page.wait_for_function(DONE)
        assert json.loads(sent.value.post_data)["tools"] == OPENAI_TOOLS
        assert page.locator(".msg.assistant .tool-call").all_text_contents() == [
            'get_weather({"city": "北京"})']
        assert "tool call" in page.locator(".msg.assistant .note").last.text_content()
        page.fill("#input", result("北京"))
        with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
            page.press("#input", "Enter")
        page.wait_for_function(DONE)
        messages = json.loads(sent.value.post_data)["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
        assert messages[2]["tool_call_id"] == messages[1]["tool_calls"][0]["id"]
        assert page.locator(".msg.tool .text").last.text_content() == result("北京")
        assert page.locator(".msg.assistant .text").last.text_content() == answer("北京")
        assert page.locator(".msg.assistant .thinking").last.text_content() == THOUGHT
    finally:
        context.close()


# ---------------------------------------------------------------- the same run as a GGUF (llama.cpp engine)


@pytest.fixture(scope="module")
def gguf_tool_server(tool_run, tmp_path_factory):
    from loraforge.export.gguf_writer import export_gguf

    model = export_gguf(tool_run, [], tmp_path_factory.mktemp("tool-gguf") / "weather.gguf", "f16")
    process = ServerProcess(str(model), "--name", "weather", "--ctx-size", "2048")
    process.model = model
    yield process
    process.stop()


@pytest.mark.slow
def test_the_exported_gguf_calls_the_tool_too(gguf_tool_server):
    from openai import OpenAI

    from loraforge.data.templates import template_in
    from loraforge.export.inspect import gguf_value, read_gguf

    # the GGUF's chat template names the trained template and the tool format it was trained with
    template = template_in(gguf_value(read_gguf(gguf_tool_server.model), "tokenizer.chat_template"))
    assert (template.name, template.tool_format, template.thinking) == ("qwen3", "mistral", True)
    client = OpenAI(base_url=gguf_tool_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    reply = ask(client, "北京").choices[0]
    assert reply.finish_reason == "tool_calls"
    assert json.loads(reply.message.tool_calls[0].function.arguments) == {"city": "北京"}
    streamed = [c for c in ask(client, "北京", stream=True) if c.choices]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
