"""Tool calling and reasoning in data: records with function_call / observation turns and
tool definitions, how each template writes them (the strings LLaMA-Factory's templates and
Qwen2.5's / Llama-3.1's own chat templates write), what training learns of them, the Jinja
twin under transformers' apply_chat_template(tools=…), and the parser that reads a
generated call back."""

from __future__ import annotations

import json
import re

import pytest
import tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from loraforge.data import tools as tool_text
from loraforge.data.check import LEARN_CLOSE, LEARN_OPEN, mark_learned
from loraforge.data.formats import load_records
from loraforge.data.records import Conversation, Turn
from loraforge.data.registry import load_datasets, resolve_datasets
from loraforge.data.templates import (
    TEMPLATES,
    conversation_from_messages,
    get_template,
    jinja_template,
    render,
    render_prompt,
    render_segments,
    to_messages,
)
from loraforge.data.tokenize import encode_conversation
from loraforge.errors import LoraforgeError

EOS, BOS = "</s>", "<s>"
WEATHER_TOOL = {"name": "get_weather", "description": "查询城市天气",
                "parameters": {"type": "object", "properties": {
                    "city": {"type": "string", "description": "城市名"},
                    "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}
TOOLS = json.dumps([WEATHER_TOOL], ensure_ascii=False)
CALL = '{"name": "get_weather", "arguments": {"city": "北京"}}'
WEATHER = Conversation((Turn("user", "北京天气怎么样？"), Turn("function_call", CALL),
                        Turn("observation", '{"temp": 3}'), Turn("assistant", "北京今天3度。")), tools=TOOLS)
PARALLEL = Conversation((Turn("user", "北京和上海？"), Turn("function_call", json.dumps([
    {"name": "get_weather", "arguments": {"city": "北京"}}, {"name": "get_weather", "arguments": {"city": "上海"}}],
    ensure_ascii=False)), Turn("observation", "3\n</tool_response>\n<tool_response>\n9"),
    Turn("assistant", "3度和9度。")), system="Be brief.", tools=TOOLS)
THOUGHTFUL = Conversation((Turn("user", "1+1?"), Turn("assistant", "<think>\n1 plus 1\n</think>\n\n2"),
                           Turn("user", "2+2?"), Turn("assistant", "4")))
THINKING_CALL = Conversation((Turn("user", "北京天气？"),
                              Turn("function_call", "<think>\n要查天气\n</think>\n\n" + CALL),
                              Turn("observation", "3"), Turn("assistant", "3度。")), tools=TOOLS)
TOOL_CONVERSATIONS = {"weather": WEATHER, "parallel": PARALLEL, "thinking-call": THINKING_CALL,
                      "thought": THOUGHTFUL}


# ---------------------------------------------------------------- the strings each format writes

# Qwen2.5's own chat template writes exactly this system block and these turns (and so does
# LLaMA-Factory's `qwen` template): tools one JSON line each inside <tools>, calls in
# <tool_call> tags, results as a user turn in <tool_response>.
QWEN_WEATHER = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "查询城市天气", "parameters": '
    '{"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}, "unit": '
    '{"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n北京天气怎么样？<|im_end|>\n<|im_start|>assistant\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>\n'
    '<|im_start|>user\n<tool_response>\n{"temp": 3}\n</tool_response><|im_end|>\n'
    "<|im_start|>assistant\n北京今天3度。<|im_end|>\n"
)
# Llama-3.1's JSON tool calling: the definitions (indent 4) after the date lines in the system
# turn, the call as {"name", "parameters"}, the result in an ipython turn.
LLAMA3_WEATHER = (
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024"
    "\n\nYou have access to the following functions. To call a function, please respond with JSON for a function "
    'call. Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. '
    "Do not use variables.\n\n" + json.dumps({"type": "function", "function": WEATHER_TOOL}, indent=4,
                                              ensure_ascii=False) + "\n\n<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n北京天气怎么样？<|eot_id|>"
    '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "北京"}}<|eot_id|>'
    '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 3}<|eot_id|>'
    "<|start_header_id|>assistant<|end_header_id|>\n\n北京今天3度。<|eot_id|>"
)
DEFAULT_TOOLS = (
    "You have access to the following tools:\n> Tool Name: get_weather\nTool Description: 查询城市天气\nTool Args:\n"
    "  - city (string, required): 城市名\n  - unit (string): , should be one of [c, f]\n\n"
    "Use the following format if using a tool:\n```\nAction: tool name (one of [get_weather])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n'
)


def test_qwen_writes_tools_calls_and_results_as_qwen25_does():
    assert render(get_template("qwen"), WEATHER, EOS, bos_token=BOS) == QWEN_WEATHER


def test_llama3_writes_tools_calls_and_results_as_llama31_json_tool_calling():
    assert render(get_template("llama3"), WEATHER, EOS, bos_token="").removeprefix(BOS) == LLAMA3_WEATHER


def test_default_format_is_react_style_action_lines():
    text = render(get_template("default-joined"), WEATHER, EOS)
    assert text.startswith(DEFAULT_TOOLS)
    assert 'Assistant: Action: get_weather\nAction Input: {"city": "北京"}</s>' in text


@pytest.mark.parametrize(("fmt", "expected"), [
    ("qwen", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "上海"}}\n</tool_call>'),
    ("llama3", '[{"name": "get_weather", "parameters": {"city": "北京"}}, '
               '{"name": "get_weather", "parameters": {"city": "上海"}}]'),
    ("mistral", '[{"name": "get_weather", "arguments": {"city": "北京"}}, '
                '{"name": "get_weather", "arguments": {"city": "上海"}}]'),
    ("default", 'Action: get_weather\nAction Input: {"city": "北京"}\n'
                'Action: get_weather\nAction Input: {"city": "上海"}'),
])
def test_parallel_calls_per_format(fmt, expected):
    calls = tool_text.parse_call_json(PARALLEL.turns[1].text)
    assert tool_text.calls_text(fmt, calls) == expected
    assert tool_text.parse_calls(fmt, expected) == calls


def test_tool_format_override_changes_only_how_tools_are_written():
    text = render(get_template("llama3", tool_format="qwen"), WEATHER, EOS, bos_token="")
    assert "<tools>\n{\"type\": \"function\"" in text and "<tool_call>\n{\"name\": \"get_weather\"" in text
    assert "<|start_header_id|>ipython<|end_header_id|>" in text  # the template's own result turn stays
    with pytest.raises(LoraforgeError, match="unknown tool format 'hermes'.*default, llama3, qwen, mistral"):
        get_template("llama3", tool_format="hermes")


# ---------------------------------------------------------------- what training learns


def learned_and_not(tokenizer, template, conv):
    enc = encode_conversation(tokenizer, template, conv, cutoff_len=4096)
    marked = mark_learned(tokenizer, enc.input_ids, enc.labels)
    learned = re.findall(f"{LEARN_OPEN}(.*?){LEARN_CLOSE}", marked, re.DOTALL)
    return learned, re.sub(f"{LEARN_OPEN}.*?{LEARN_CLOSE}", "", marked, flags=re.DOTALL)


@pytest.mark.parametrize(("style", "name", "call"), [
    ("qwen2", "qwen", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>'),
    ("llama3", "llama3", '{"name": "get_weather", "parameters": {"city": "北京"}}<|eot_id|>'),
])
def test_calls_are_learned_like_answers_and_results_are_masked_like_user_turns(bpe_tokenizers, style, name, call):
    tokenizer = AutoTokenizer.from_pretrained(bpe_tokenizers[style])
    learned, prompt = learned_and_not(tokenizer, get_template(name), WEATHER)
    assert [span.rstrip("\n") for span in learned] == [call, "北京今天3度。" + call[call.rindex("<|"):]]
    assert '{"temp": 3}' in prompt and "get_weather" in prompt and "北京天气怎么样？" in prompt


# ---------------------------------------------------------------- reasoning (LLaMA-Factory's ReasoningTemplate)

EMPTY = "<think>\n\n</think>\n\n"


def test_qwen3_learns_an_empty_thought_where_an_answer_has_none():
    learned = [text for text, is_answer in render_segments(get_template("qwen3"), THOUGHTFUL, EOS) if is_answer]
    joined = "".join(learned)
    assert "<think>\n1 plus 1\n</think>\n\n2<|im_end|>" in joined
    assert EMPTY + "4<|im_end|>" in joined
    prompt = render_prompt(get_template("qwen3"), None, THOUGHTFUL.turns[:3], EOS)
    assert prompt.endswith("<|im_start|>assistant\n")  # the model thinks on its own


def test_qwen3_with_thinking_off_drops_thoughts_and_puts_the_empty_one_in_the_prompt():
    t = get_template("qwen3", enable_thinking=False)
    segments = render_segments(t, THOUGHTFUL, EOS)
    learned = "".join(text for text, is_answer in segments if is_answer)
    assert "1 plus 1" not in render(t, THOUGHTFUL, EOS) and "<think>\n" not in learned
    prompt_side = "".join(text for text, is_answer in segments if not is_answer)
    assert prompt_side.count("<|im_start|>assistant\n" + EMPTY) == 2
    assert render_prompt(t, None, THOUGHTFUL.turns[:3], EOS).endswith("<|im_start|>assistant\n" + EMPTY)


def test_enable_thinking_leaves_templates_without_reasoning_alone():
    assert get_template("qwen", enable_thinking=False) == get_template("qwen")
    assert "<think>" not in render(get_template("qwen3_nothink"), WEATHER, EOS)


@pytest.mark.parametrize(("text", "expected"), [
    ("<think>\nstep 1\nstep 2\n</think>\n\nThe answer.", ("step 1\nstep 2", "The answer.")),
    (EMPTY + "Hi", ("", "Hi")),
    ("No thought here.", (None, "No thought here.")),
    ("<think>\ncut off by max_tokens", ("cut off by max_tokens", "")),
])
def test_split_reasoning(text, expected):
    assert tool_text.split_reasoning(text, ("<think>\n", "\n</think>\n\n")) == expected


# ---------------------------------------------------------------- the Jinja twin (GGUF / HF chat template)


@pytest.fixture(scope="module")
def hf_tokenizer():
    model = tokenizers.models.WordLevel({"<unk>": 0, BOS: 1, EOS: 2}, unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(model), bos_token=BOS, eos_token=EOS)


@pytest.mark.parametrize("fmt", tool_text.TOOL_FORMATS)
@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conv_id", sorted(TOOL_CONVERSATIONS))
def test_jinja_renders_tools_calls_and_results_as_training_does(hf_tokenizer, name, fmt, conv_id):
    conv = TOOL_CONVERSATIONS[conv_id]
    for thinking in (True, False):
        t = get_template(name, tool_format=fmt, enable_thinking=thinking)
        hf_tokenizer.chat_template = jinja_template(t)
        tools = {"tools": json.loads(conv.tools)} if conv.tools else {}
        messages = to_messages(conv)
        assert hf_tokenizer.apply_chat_template(messages, tokenize=False, **tools) == render(t, conv, EOS, bos_token=BOS)
        first = 0 if conv.system is None else 1  # the system message
        for end in range(1, len(conv.turns), 2):
            prompt = hf_tokenizer.apply_chat_template(messages[:first + end], tokenize=False, add_generation_prompt=True,
                                                      **tools)
            assert prompt == render_prompt(t, conv.system, conv.turns[:end], EOS, bos_token=BOS, tools=conv.tools)


def test_openai_messages_round_trip_with_string_arguments_and_joined_results():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "北京和上海？"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}},
                    {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"上海"}'}}]},
                {"role": "tool", "tool_call_id": "a", "content": "3"}, {"role": "tool", "tool_call_id": "b", "content": "9"},
                {"role": "assistant", "content": "3度和9度。"}]
    conv = conversation_from_messages(messages, [WEATHER_TOOL])
    assert conv.turns == PARALLEL.turns and conv.system == "Be brief." and json.loads(conv.tools) == [WEATHER_TOOL]


# ---------------------------------------------------------------- reading a generated reply


@pytest.mark.parametrize(("fmt", "reply"), [
    ("qwen", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'),
    ("qwen", '  <tool_call>{"name":"get_weather","arguments":{"city":"北京"}}</tool_call>\n'),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "北京"}}'),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "北京"}}]'),
    ("default", 'Action: get_weather\nAction Input: ```{"city": "北京"}```'),
])
def test_generated_calls_parse_into_openai_tool_calls(fmt, reply):
    [call] = tool_text.parse_calls(fmt, reply)
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "北京"})
    openai = call.to_openai()
    assert openai["type"] == "function" and openai["id"].startswith("call_")
    assert json.loads(openai["function"]["arguments"]) == {"city": "北京"}


@pytest.mark.parametrize(("fmt", "reply"), [
    ("qwen", "北京今天3度。"), ("qwen", '<tool_call>\n{"name": "get_weather", "arguments": {"city": '),
    ("llama3", '{"name": "get_weather"}'), ("llama3", "{not json"), ("default", "Action: f\nAction Input: {bad"),
])
def test_answers_and_broken_calls_are_not_calls(fmt, reply):
    assert tool_text.parse_calls(fmt, reply) is None


# ---------------------------------------------------------------- loading tool and reasoning data


def write(path, rows):
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def glaive_row(call=CALL, result='{"temp": 3}', tools=TOOLS):
    return {"conversations": [{"from": "human", "value": "北京天气怎么样？"}, {"from": "function_call", "value": call},
                              {"from": "observation", "value": result}, {"from": "gpt", "value": "北京今天3度。"}],
            "tools": tools}


def test_glaive_data_through_dataset_info_loads_roles_and_tools(tmp_path):
    write(tmp_path / "glaive.json", [glaive_row()])
    (tmp_path / "dataset_info.json").write_text(json.dumps({"glaive_toolcall_zh_demo": {
        "file_name": "glaive.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "tools": "tools"}}}))
    [report] = load_datasets(resolve_datasets(tmp_path, ["glaive_toolcall_zh_demo"]), stage="sft", skip_invalid=False)
    [record] = report.records
    assert (record.turns, record.tools) == (WEATHER.turns, TOOLS)


def test_openai_data_with_tool_calls_and_tool_messages(tmp_path):
    row = {"messages": [{"role": "user", "content": "北京天气怎么样？"},
                        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                            "name": "get_weather", "arguments": {"city": "北京"}}}]},
                        {"role": "tool", "content": '{"temp": 3}'}, {"role": "assistant", "content": "北京今天3度。"}],
           "tools": [WEATHER_TOOL]}
    [record] = load_records(write(tmp_path / "openai.json", [row])).records
    assert [t.role for t in record.turns] == ["user", "function_call", "observation", "assistant"]
    assert tool_text.parse_call_json(record.turns[1].text) == tool_text.parse_call_json(CALL)
    assert json.loads(record.tools) == [WEATHER_TOOL]


def test_reasoning_fields_become_a_thought_before_the_answer(tmp_path):
    rows = [{"instruction": "1+1?", "output": "2", "reasoning": "1 plus 1"},
            {"messages": [{"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4", "reasoning_content": "2 plus 2"}]}]
    [alpaca] = load_records(write(tmp_path / "a.json", rows[:1])).records
    [openai] = load_records(write(tmp_path / "o.json", rows[1:])).records
    assert alpaca.turns[-1].text == "<think>\n1 plus 1\n</think>\n\n2"
    assert openai.turns[-1].text == "<think>\n2 plus 2\n</think>\n\n4"


@pytest.mark.parametrize(("row", "reason"), [
    (glaive_row(call="get_weather(北京)"), "function_call is not a JSON tool call"),
    (glaive_row(call='{"city": "北京"}'), "function_call is not a JSON tool call"),
    (glaive_row(tools='[{"description": "no name"}]'), "invalid tool definitions"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "3"}]},
     "roles out of order: message 2 should be from 'gpt' or 'function_call', got 'observation'"),
])
def test_malformed_tool_records_are_refused_with_a_reason(tmp_path, row, reason):
    with pytest.raises(LoraforgeError, match=re.escape(f"t.json:2: {reason}")):
        load_records(write(tmp_path / "t.json", [row]), formatting="sharegpt")
