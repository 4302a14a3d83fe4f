"""Tool calling and reasoning as text: the one home for how each tool format writes

- the tool definitions (into the system block),
- a model's tool call (the learned text of a `function_call` turn),

and reads a generated reply back into OpenAI `tool_calls`; and how a `<think>…</think>`
segment is split off an answer as `reasoning_content`.

The formats are LLaMA-Factory's (`data/tool_utils.py`) — `default` (ReAct-style
"Action: / Action Input:"), `llama3` (Meta's JSON-based tool calling), `qwen`
(Hermes-style `<tool_call>` tags) and `mistral` (`[AVAILABLE_TOOLS]` / `[TOOL_CALLS]`) —
written as strings here and, for the GGUF/HF chat template, as Jinja
(`jinja_tools_text`, `jinja_calls_text`) that renders the same bytes under transformers'
`apply_chat_template(messages, tools=…)`.

A tool call in a record is the JSON LLaMA-Factory's data uses: `{"name": …, "arguments":
{…}}`, or a list of them for parallel calls. Arguments are written back with
`json.dumps(…, ensure_ascii=False)`, key order kept, as LLaMA-Factory does.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from loraforge.errors import LoraforgeError

TOOL_FORMATS = ("default", "llama3", "qwen", "mistral")
# Meta's own Llama-3.1 template writes this date when it is given none. LLaMA-Factory writes
# today's date; a fixed one keeps the training ids (and the tokenized-data cache) the same
# from one day to the next and the served prompt the same as the trained one.
LLAMA3_DATE = "26 Jul 2024"
# LLaMA-Factory's openai converter joins consecutive tool results into one observation turn
TOOL_RESULT_JOINER = "\n</tool_response>\n<tool_response>\n"

_DEFAULT_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n"
    "```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n'
    "```\n"
)
_LLAMA3_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    'Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. '
    "Do not use variables.\n\n{tool_text}"
)
_QWEN_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, '
    '"arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's API carries it

    def to_openai(self) -> dict:
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def check_format(name: str) -> str:
    if name not in TOOL_FORMATS:
        raise LoraforgeError(f"unknown tool format '{name}': use one of {', '.join(TOOL_FORMATS)} "
                             "(data.tool_format, LLaMA-Factory's tool_format)")
    return name


# ---------------------------------------------------------------- definitions and calls → text


def _function(tool: dict) -> dict:
    return tool.get("function", {}) if tool.get("type") == "function" else tool


def _wrapped(tool: dict) -> dict:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def parse_tools(text: str, where: str = "tools") -> list[dict]:
    """Tool definitions from their JSON text (a list of functions, OpenAI-wrapped or bare)."""
    try:
        tools = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        raise LoraforgeError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(tools, list):
        raise LoraforgeError(f"{where}: must be a JSON list of function definitions, got a {type(tools).__name__}")
    for index, tool in enumerate(tools, 1):
        function = _function(tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise LoraforgeError(f"{where}: tool {index} has no 'name' — each tool is "
                                 '{"name": …, "description": …, "parameters": {JSON schema}}')
        params = function.get("parameters", {})
        if not isinstance(params, dict) or not isinstance(params.get("properties", {}), dict):
            raise LoraforgeError(f"{where}: tool {index} ('{function['name']}'): 'parameters' must be a JSON "
                                 "schema object with 'properties'")
    return tools


def tools_text(fmt: str, tools: list[dict]) -> str:
    """The tool definitions as the format writes them after the system prompt ('' for none)."""
    if not tools:
        return ""
    if fmt == "default":
        blocks, names = "", []
        for tool in map(_function, tools):
            params = tool.get("parameters") or {}
            lines = ""
            for name, param in (params.get("properties") or {}).items():
                required = ", required" if name in params.get("required", []) else ""
                enum = ", should be one of [{}]".format(", ".join(map(str, param["enum"]))) if param.get("enum") else ""
                items = ", where each item should be {}".format(param["items"].get("type", "")) if param.get("items") else ""
                lines += f"  - {name} ({param.get('type', '')}{required}): {param.get('description', '')}{enum}{items}\n"
            blocks += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{lines}\n"
            names.append(tool["name"])
        return _DEFAULT_PROMPT.format(tool_text=blocks, tool_names=", ".join(names))
    if fmt == "llama3":
        text = "".join(json.dumps(_wrapped(tool), indent=4, ensure_ascii=False) + "\n\n" for tool in tools)
        return _LLAMA3_PROMPT.format(date=LLAMA3_DATE, tool_text=text)
    if fmt == "qwen":
        return _QWEN_PROMPT.format(tool_text="".join("\n" + json.dumps(_wrapped(t), ensure_ascii=False) for t in tools))
    if fmt == "mistral":
        return "[AVAILABLE_TOOLS] " + json.dumps([_wrapped(t) for t in tools], ensure_ascii=False) + "[/AVAILABLE_TOOLS]"
    raise LoraforgeError(f"unknown tool format '{fmt}'")


def parse_call_json(text: str) -> list[ToolCall]:
    """The calls of a `function_call` turn: `{"name": …, "arguments": {…}}` or a list of them.
    Raises ValueError with a reason a person can act on."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise ValueError("an empty list of calls")
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
            raise ValueError('each call must be {"name": …, "arguments": {…}}')
        arguments = call["arguments"]
        if isinstance(arguments, str):  # OpenAI's shape: the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise ValueError(f"the arguments of '{call['name']}' are a string that is not JSON") from None
        out.append(ToolCall(call["name"], json.dumps(arguments, ensure_ascii=False)))
    return out


def calls_text(fmt: str, calls: list[ToolCall]) -> str:
    """A model's tool calls as the format writes them (the learned text of the turn)."""
    if fmt == "default":
        return "\n".join(f"Action: {c.name}\nAction Input: {c.arguments}" for c in calls)
    if fmt == "llama3":
        objects = [{"name": c.name, "parameters": json.loads(c.arguments)} for c in calls]
        return json.dumps(objects[0] if len(objects) == 1 else objects, ensure_ascii=False)
    if fmt == "qwen":
        return "\n".join("<tool_call>\n" + json.dumps({"name": c.name, "arguments": json.loads(c.arguments)},
                                                      ensure_ascii=False) + "\n</tool_call>" for c in calls)
    if fmt == "mistral":
        return json.dumps([{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls], ensure_ascii=False)
    raise LoraforgeError(f"unknown tool format '{fmt}'")


def call_opening(fmt: str, name: str | None = None) -> str:
    """The text every call in this format starts with — up to the function's name, or, with
    `name`, up to its arguments. The server appends it to the prompt to make the answer a
    call (tool_choice 'required' or a named function)."""
    if fmt == "default":
        return "Action: " + (f"{name}\nAction Input: " if name else "")
    if fmt in ("llama3", "qwen"):
        head = "<tool_call>\n" if fmt == "qwen" else ""
        key = "parameters" if fmt == "llama3" else "arguments"
        return head + '{"name": ' + (json.dumps(name, ensure_ascii=False) + f', "{key}": ' if name else '"')
    if fmt == "mistral":
        return '[{"name": ' + (json.dumps(name, ensure_ascii=False) + ', "arguments": ' if name else '"')
    raise LoraforgeError(f"unknown tool format '{fmt}'")


def call_marker(fmt: str) -> str:
    """A reply that starts with this (after whitespace) is read as a call; the rest is content."""
    return {"default": "Action:", "llama3": "{", "qwen": "<tool_call>", "mistral": "[{"}[fmt]


# ---------------------------------------------------------------- generated text → tool_calls


def _json_calls(text: str, key: str) -> list[ToolCall] | None:
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    calls = value if isinstance(value, list) else [value]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) and key in c for c in calls):
        return None
    return [ToolCall(c["name"], json.dumps(c[key], ensure_ascii=False)) for c in calls]


_DEFAULT_CALL = re.compile(r"Action:\s*([a-zA-Z0-9_.-]+)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", re.DOTALL)
_QWEN_CALL = re.compile(r"<tool_call>(.+?)</tool_call>(?=\s*<tool_call>|\s*$)", re.DOTALL)


def parse_calls(fmt: str, text: str) -> list[ToolCall] | None:
    """The tool calls in a generated reply, or None when it is not (wholly) a call — then it
    is an ordinary answer. The inverse of `calls_text`, as LLaMA-Factory's tool_extractor."""
    if fmt == "default":
        found = _DEFAULT_CALL.findall(text)
        if not found:
            return None
        calls = []
        for name, raw in found:
            try:
                arguments = json.loads(raw.strip().strip('"').strip("`"))
            except json.JSONDecodeError:
                return None
            calls.append(ToolCall(name.strip(), json.dumps(arguments, ensure_ascii=False)))
        return calls
    if fmt == "llama3":
        return _json_calls(text, "parameters")
    if fmt == "mistral":
        return _json_calls(text.strip().removeprefix("[TOOL_CALLS]"), "arguments")
    if fmt == "qwen":
        found = _QWEN_CALL.findall(text)
        calls = [_json_calls(body, "arguments") for body in found]
        if not found or any(c is None or len(c) != 1 for c in calls):
            return None
        return [c[0] for c in calls]
    raise LoraforgeError(f"unknown tool format '{fmt}'")


# ---------------------------------------------------------------- reasoning


def split_reasoning(text: str, thought_words: tuple[str, str]) -> tuple[str | None, str]:
    """(reasoning, answer) of a reply that opens with a thought segment; (None, text) otherwise.
    A reply cut off inside its thought (max_tokens) is all reasoning."""
    open_, close = thought_words[0].strip(), thought_words[1].strip()
    body = text.lstrip()
    if not body.startswith(open_):
        return None, text
    body = body[len(open_):]
    end = body.find(close)
    if end < 0:
        return body.strip("\n"), ""
    return body[:end].strip("\n"), body[end + len(close):].lstrip("\n")


def remove_thought(text: str, thought_words: tuple[str, str]) -> str:
    """LLaMA-Factory's remove_thought: the thought segment dropped, leading newlines too."""
    pattern = re.compile(f"{re.escape(thought_words[0])}(.*?){re.escape(thought_words[1])}", re.DOTALL)
    return pattern.sub("", text).lstrip("\n")


def has_thought(text: str, thought_words: tuple[str, str]) -> bool:
    # LLaMA-Factory's test: either marker, stripped, anywhere in the answer
    return thought_words[0].strip() in text or thought_words[1].strip() in text


# ---------------------------------------------------------------- the same in Jinja

# Jinja (transformers' environment: `tojson` is json.dumps(ensure_ascii=False, indent=…))
# that sets `ns.tools_text` from the `tools` variable, per format.
_JINJA_WRAP = ("{%- set wrapped = tool if 'type' in tool and tool['type'] == 'function' "
               "else {'type': 'function', 'function': tool} -%}")
_JINJA_FUNCTION = ("{%- set fn = tool['function'] if 'type' in tool and tool['type'] == 'function' "
                   "else tool -%}")


def _lit(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f"'{escaped}'"


def jinja_tools_text(fmt: str) -> list[str]:
    """Jinja lines that set `ns.tools_text` to `tools_text(fmt, tools)`."""
    lines = ["{%- set ns.tools_text = '' -%}", "{%- if tools -%}"]
    if fmt == "default":
        head, tail = _DEFAULT_PROMPT.split("{tool_text}")
        middle, end = tail.split("{tool_names}")
        lines += [
            "{%- set ns.blocks = '' -%}", "{%- set ns.names = [] -%}",
            "{%- for tool in tools -%}", _JINJA_FUNCTION,
            "{%- set params = fn['parameters'] if 'parameters' in fn and fn['parameters'] else {} -%}",
            "{%- set props = params['properties'] if 'properties' in params and params['properties'] else {} -%}",
            "{%- set required = params['required'] if 'required' in params else [] -%}",
            "{%- set ns.args = '' -%}",
            "{%- for pname, param in props.items() -%}",
            "{%- set ns.args = ns.args + '  - ' + pname + ' (' + (param['type'] if 'type' in param else '')"
            " + (', required' if pname in required else '') + '): '"
            " + (param['description'] if 'description' in param else '')"
            " + (', should be one of [' + param['enum'] | join(', ') + ']' if 'enum' in param and param['enum'] else '')"
            " + (', where each item should be ' + (param['items']['type'] if 'type' in param['items'] else '')"
            " if 'items' in param and param['items'] else '') + '\\n' -%}",
            "{%- endfor -%}",
            "{%- set ns.blocks = ns.blocks + '> Tool Name: ' + fn['name'] + '\\nTool Description: '"
            " + (fn['description'] if 'description' in fn else '') + '\\nTool Args:\\n' + ns.args + '\\n' -%}",
            "{%- set ns.names = ns.names + [fn['name']] -%}",
            "{%- endfor -%}",
            f"{{%- set ns.tools_text = {_lit(head.replace('{{', '{').replace('}}', '}'))} + ns.blocks + "
            f"{_lit(middle)} + ns.names | join(', ') + {_lit(end.replace('{{', '{').replace('}}', '}'))} -%}}",
        ]
    elif fmt == "llama3":
        head = _LLAMA3_PROMPT.split("{tool_text}")[0].replace("{date}", LLAMA3_DATE)
        lines += ["{%- set ns.text = '' -%}", "{%- for tool in tools -%}", _JINJA_WRAP,
                  "{%- set ns.text = ns.text + wrapped | tojson(indent=4) + '\\n\\n' -%}", "{%- endfor -%}",
                  f"{{%- set ns.tools_text = {_lit(head.replace('{{', '{').replace('}}', '}'))} + ns.text -%}}"]
    elif fmt == "qwen":
        head, tail = _QWEN_PROMPT.split("{tool_text}")
        lines += ["{%- set ns.text = '' -%}", "{%- for tool in tools -%}", _JINJA_WRAP,
                  "{%- set ns.text = ns.text + '\\n' + wrapped | tojson -%}", "{%- endfor -%}",
                  f"{{%- set ns.tools_text = {_lit(head)} + ns.text + "
                  f"{_lit(tail.replace('{{', '{').replace('}}', '}'))} -%}}"]
    elif fmt == "mistral":
        lines += ["{%- set ns.list = [] -%}", "{%- for tool in tools -%}", _JINJA_WRAP,
                  "{%- set ns.list = ns.list + [wrapped] -%}", "{%- endfor -%}",
                  "{%- set ns.tools_text = '[AVAILABLE_TOOLS] ' + ns.list | tojson + '[/AVAILABLE_TOOLS]' -%}"]
    return lines + ["{%- endif -%}"]


def jinja_calls_text(fmt: str) -> list[str]:
    """Jinja lines that set `ns.calls_text` from `message['tool_calls']` (OpenAI's
    `{"function": {"name", "arguments"}}` or transformers' bare `{"name", "arguments"}`;
    arguments a mapping, or JSON text written as it is)."""
    key = "parameters" if fmt == "llama3" else "arguments"
    lines = [
        "{%- set ns.calls = [] -%}",
        "{%- for call in message['tool_calls'] -%}",
        "{%- set fn = call['function'] if 'function' in call else call -%}",
        "{%- set args = fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson -%}",
    ]
    if fmt == "default":
        lines.append("{%- set ns.calls = ns.calls + ['Action: ' + fn['name'] + '\\nAction Input: ' + args] -%}")
    else:
        lines.append("{%- set ns.calls = ns.calls + ['{\"name\": ' + fn['name'] | tojson + "
                     f"', \"{key}\": ' + args + '}}'] -%}}")
    lines.append("{%- endfor -%}")
    if fmt == "default":
        lines.append("{%- set ns.calls_text = ns.calls | join('\\n') -%}")
    elif fmt == "llama3":
        lines.append("{%- set ns.calls_text = ns.calls[0] if ns.calls | length == 1 "
                     "else '[' + ns.calls | join(', ') + ']' -%}")
    elif fmt == "qwen":
        lines.append("{%- set ns.calls_text = '<tool_call>\\n' + ns.calls | join('\\n</tool_call>\\n<tool_call>\\n')"
                     " + '\\n</tool_call>' -%}")
    elif fmt == "mistral":
        lines.append("{%- set ns.calls_text = '[' + ns.calls | join(', ') + ']' -%}")
    return lines
