"""Chat templates: how a conversation becomes the one string a model is trained on.

Each template is a handful of format strings. The same strings drive two renderers:
the Python one here (training, `render_segments`; inference, `render_prompt`) and a
Jinja chat template (`jinja_template`) that is saved into the run's tokenizer and from
there into the GGUF and the Modelfile — the template used in training must be the one
used at inference, byte for byte, and the tests hold the two renderers to that.

Layout of every conversation, for every template:

    [system block]  user₁ + prefix  answer₁ + end  separator  user₂ + prefix  answer₂ + end …

- The learned part of a round is the answer followed by the end token (`end_token`, or
  the tokenizer's EOS when the template has none), so the model learns to stop.
- The separator sits between an end token and the next round; nothing follows the last
  end token, so `render_prompt(history) + answer + end == render(conversation)`.
- The text never starts with BOS: the tokenizer adds it when it encodes. Markup in the
  middle may contain it (`{bos}`), as Llama-2's `</s><s>[INST]` between rounds does.

LLaMA-Factory's templates, under its names (alpaca, default, empty, llama2, llama2_zh,
llama3, mistral, chatml, qwen, qwen3, qwen3_nothink), are its slots written in these
fields and encoded as it encodes them (`slots=True`, data/tokenize.py): each slot alone,
BOS only where its template writes one (`prefix` / `{bos}`: then the text does start with
it), EOS as `{eos}`, and what its assistant slot holds around the answer is learned with
it (`answer_lead`, `after_end`: alpaca's `</s>\n\n`, so the text ends after the end token).
loraforge's own templates (`*-joined`, chinese-alpaca, llama2-zh) encode the prompt as one
text, exactly as llama.cpp does at inference; the difference on a SentencePiece vocabulary
is a `▁` at each slot start (tests/data/test_lf_templates.py).
- System prompt: `Conversation.system = None` means "use the template's default_system"
  (which may itself be None); `""` means "no system prompt" even when there is a
  default. In messages form a system message with empty content means the same.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from loraforge.data import tools as tool_text
from loraforge.data.records import MODEL_SIDE, USER_SIDE, Conversation, Turn
from loraforge.errors import LoraforgeError

# Placeholders a format string may hold. Everything else in it is literal markup, so
# user text containing "{user}" or "{{" is never re-expanded.
_PLACEHOLDER = re.compile(r"\{(system|user|bos|eos)\}")


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    default_system: str | None  # used when a conversation has no system prompt (None)
    stop_strings: tuple[str, ...]  # end an answer at inference besides EOS (the end token included)
    end_token: str | None  # ends each answer; None → the tokenizer's eos_token does; "" → nothing does
    system: str = "{system}"  # the system block, "{system}" → the system prompt; "{eos}" → EOS
    user: str = "{user}"  # a user turn; "{system}" in it → the system block goes there in round 1
    assistant: str = ""  # the prefix the answer follows (the generation prompt)
    separator: str = ""  # between an answer's end token and the next round; "{bos}" → BOS
    # LLaMA-Factory's encoding (`slots=True`, its templates by its names): each slot — prefix,
    # system block, a user turn with the assistant prefix, an answer with what follows it — is
    # encoded alone (tokenizer.encode(slot, add_special_tokens=False)), {bos}/{eos} are their
    # own ids, and no BOS is added but the template's own. False: loraforge's, the prompt is
    # encoded as one text, as llama.cpp encodes it at inference (data/tokenize.py).
    slots: bool = False
    prefix: str = ""  # once, before everything (LLaMA-Factory's format_prefix), e.g. "{bos}"
    answer_lead: str = ""  # learned, before each answer in its slot (mistral's " ")
    after_end: str = ""  # learned, after every answer's end token, the last one's too (alpaca's "\n\n")
    # Tools (data/tools.py writes them): how definitions and calls are written (LLaMA-Factory's
    # format_tools / format_function), and the turn a tool's result sits in ("{user}" → the
    # result; None → as a user turn, LLaMA-Factory's default). The tool text follows the system
    # prompt inside the system block. A call is learned like an answer: tool_call_prefix + call + end.
    tool_format: str = "default"
    observation: str | None = None
    tool_call_prefix: str = ""
    # Reasoning (LLaMA-Factory's ReasoningTemplate): a `thinking` template adds an empty thought
    # to every answer that has none — learned when enable_thinking, else part of the prompt —
    # and serves the thought as reasoning_content.
    thinking: bool = False
    enable_thinking: bool = True
    thought_words: tuple[str, str] = ("<think>\n", "\n</think>\n\n")


_ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

# loraforge's own Alpaca (the whole prompt encoded as one text, so llama.cpp sees the
# training ids at inference); "alpaca" itself is LLaMA-Factory's, below.
_ALPACA_JOINED = Template(
    name="alpaca-joined",
    description="Stanford Alpaca, loraforge's encoding (was 'alpaca'): ### Instruction: / ### Response:",
    default_system=_ALPACA_SYSTEM,
    stop_strings=("### Instruction:",),
    end_token=None,
    system="{system}\n\n",
    user="### Instruction:\n{user}\n\n",
    assistant="### Response:\n",
    separator="\n\n",
)

_LF = "LLaMA-Factory's, ids as it encodes them"  # description suffix of LLaMA-Factory's templates
_CHATML = dict(end_token="<|im_end|>", system="<|im_start|>system\n{system}<|im_end|>\n",
               user="<|im_start|>user\n{user}<|im_end|>\n", assistant="<|im_start|>assistant\n")
# Qwen's tool calling (Hermes-style <tool_call> tags; results as a user turn in <tool_response>)
_QWEN_TOOLS = dict(tool_format="qwen",
                   observation="<|im_start|>user\n<tool_response>\n{user}\n</tool_response><|im_end|>\n")
_LLAMA2 = dict(end_token=None, system="<<SYS>>\n{system}\n<</SYS>>\n\n", user="{bos}[INST] {system}{user} [/INST]")

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        # ---- LLaMA-Factory's templates under its names, from its src/llamafactory/data/template.py:
        # its slots as format strings, encoded slot by slot as it does (`slots=True`), so a model
        # LLaMA-Factory trained is prompted here with the ids it learned.
        Template(
            # its default system prompt carries the "\n\n"; a given system prompt is followed
            # directly by "### Instruction:", as LLaMA-Factory writes it
            name="alpaca", description=f"Stanford Alpaca, {_LF}: ### Instruction: / ### Response:",
            default_system=_ALPACA_SYSTEM + "\n\n", stop_strings=("### Instruction:",), end_token=None,
            user="### Instruction:\n{user}\n\n", assistant="### Response:\n", after_end="\n\n", slots=True,
        ),
        Template(
            name="default", description=f"{_LF}: System: …</s> Human: …</s> Assistant: …</s>",
            default_system=None, stop_strings=("\nHuman:",), end_token=None, system="System: {system}{eos}\n",
            user="Human: {user}{eos}\n", assistant="Assistant:", after_end="\n", slots=True,
        ),
        Template(
            # LLaMA-Factory's empty template learns no end token: its answers never stop on their own
            name="empty", description=f"no markup and no end token, {_LF}",
            default_system=None, stop_strings=(), end_token="", slots=True,
        ),
        Template(
            name="llama2", description=f"Llama-2 chat, {_LF}: <s>[INST] <<SYS>> … <</SYS>> … [/INST] …</s>",
            default_system=None, stop_strings=("[INST]",), slots=True, **_LLAMA2,
        ),
        Template(
            name="llama2_zh", description=f"Llama-2 chat with a Chinese default system, {_LF} (not llama2-zh)",
            default_system="You are a helpful assistant. 你是一个乐于助人的助手。", stop_strings=("[INST]",),
            slots=True, **_LLAMA2,
        ),
        Template(
            name="llama3", description=f"Llama-3 instruct, {_LF}: <|start_header_id|>role<|end_header_id|> … <|eot_id|>",
            default_system=None, stop_strings=("<|eot_id|>", "<|eom_id|>"), end_token="<|eot_id|>", prefix="{bos}",
            system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
            user="<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>",
            assistant="<|start_header_id|>assistant<|end_header_id|>\n\n", slots=True,
            tool_format="llama3", observation="<|start_header_id|>ipython<|end_header_id|>\n\n{user}<|eot_id|>",
        ),
        Template(
            # the system block goes inside the first [INST]; the answer's slot starts with a space
            name="mistral", description=f"Mistral instruct, {_LF}: <s>[INST] … [/INST] …</s>",
            default_system=None, stop_strings=("[INST]",), end_token=None, prefix="{bos}", system="{system}\n\n",
            user="[INST] {system}{user}[/INST]", answer_lead=" ", slots=True,
            tool_format="mistral", observation='[TOOL_RESULTS] {"content": {user}}[/TOOL_RESULTS]',
            tool_call_prefix="[TOOL_CALLS] ",
        ),
        Template(
            name="chatml", description=f"ChatML, {_LF}: <|im_start|>role … <|im_end|>",
            default_system=None, stop_strings=("<|im_end|>", "<|im_start|>"), after_end="\n", slots=True, **_CHATML,
            observation="<|im_start|>tool\n{user}<|im_end|>\n",
        ),
        Template(
            name="qwen", description=f"Qwen (1.5, 2, 2.5) ChatML, {_LF}",
            default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            stop_strings=("<|im_end|>",), after_end="\n", slots=True, **_CHATML, **_QWEN_TOOLS,
        ),
        Template(
            name="qwen3", description=f"Qwen3 ChatML with <think> reasoning, {_LF}",
            default_system=None, stop_strings=("<|im_end|>",), after_end="\n", slots=True, thinking=True, **_CHATML,
            **_QWEN_TOOLS,
        ),
        Template(
            name="qwen3_nothink", description=f"Qwen3 ChatML without reasoning, {_LF}",
            default_system=None, stop_strings=("<|im_end|>",), after_end="\n", slots=True, **_CHATML, **_QWEN_TOOLS,
        ),
        # ---- loraforge's templates: the prompt is encoded as one text, exactly as llama.cpp and
        # our server encode it at inference. "X-joined" is what loraforge called "X" before it
        # took LLaMA-Factory's (runs saved with the old one are recognised: template_name_in).
        _ALPACA_JOINED,
        # Chinese-LLaMA-Alpaca v1's scripts end the prompt with "### Response: " — a space,
        # no newline; a model trained on it expects exactly that.
        replace(_ALPACA_JOINED, name="chinese-alpaca", assistant="### Response: ",
                description="Chinese-LLaMA-Alpaca v1: Alpaca with '### Response: ' (space, no newline)"),
        Template(
            # Meta's Llama-2 chat layout: the system block sits inside the first [INST],
            # every later round starts with a fresh BOS after the previous answer's EOS.
            name="llama2-zh",
            description="Chinese-LLaMA-Alpaca-2 / Llama-2 chat: [INST] <<SYS>> … <</SYS>> … [/INST]",
            default_system="You are a helpful assistant. 你是一个乐于助人的助手。",
            stop_strings=("[INST]",),
            end_token=None,
            system="<<SYS>>\n{system}\n<</SYS>>\n\n",
            user="[INST] {system}{user} [/INST]",
            assistant=" ",
            separator="{bos}",
        ),
        Template(
            name="llama3-joined",
            description="Llama-3 instruct, loraforge's encoding (was 'llama3')",
            default_system=None,
            stop_strings=("<|eot_id|>",),
            end_token="<|eot_id|>",
            system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
            user="<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>",
            assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        Template(
            # Qwen's own template also writes "\n" after the last <|im_end|>; here that
            # "\n" only separates rounds, so an answer's text ends at its end token.
            name="chatml-joined",
            description="ChatML with Qwen2's default system prompt, loraforge's encoding (was 'chatml')",
            default_system="You are a helpful assistant.",
            stop_strings=("<|im_end|>",),
            end_token="<|im_end|>",
            system="<|im_start|>system\n{system}<|im_end|>\n",
            user="<|im_start|>user\n{user}<|im_end|>\n",
            assistant="<|im_start|>assistant\n",
            separator="\n",
        ),
        Template(
            name="default-joined",
            description="Human: … Assistant: … for base models, loraforge's encoding (was 'default')",
            default_system=None,
            stop_strings=("\nHuman:",),
            end_token=None,
            system="{system}\n",
            user="Human: {user}\n",
            assistant="Assistant: ",
            separator="\n",
        ),
        Template(
            name="empty-joined",
            description="no markup: system, user and answer text back to back, EOS learned (was 'empty')",
            default_system=None,
            stop_strings=(),
            end_token=None,
        ),
    ]
}


def get_template(name: str, *, tool_format: str | None = None, enable_thinking: bool | None = None) -> Template:
    """The template called `name`; an unknown name is an error that suggests the closest.
    `tool_format` and `enable_thinking` (data.tool_format / data.enable_thinking, as in
    LLaMA-Factory) replace the template's own; enable_thinking only matters to thinking templates."""
    if name in TEMPLATES:
        t = TEMPLATES[name]
        if tool_format is not None:
            t = replace(t, tool_format=tool_text.check_format(tool_format))
        if enable_thinking is not None and t.thinking:
            t = replace(t, enable_thinking=enable_thinking)
        return t
    raise LoraforgeError(f"unknown chat template '{name}': {template_hint(name)}known templates are "
                         f"{', '.join(TEMPLATES)} (set data.template to one of them)")


# Names people write for a family whose LLaMA-Factory template has another name (its
# template.py: Qwen1.5/2/2.5 use `qwen`, Llama-3.x `llama3`, Qwen3 `qwen3`).
_FAMILY_HINTS = {
    "qwen1.5": "qwen", "qwen2": "qwen", "qwen2.5": "qwen", "qwen25": "qwen", "qwen3.0": "qwen3",
    "llama3.1": "llama3", "llama3.2": "llama3", "llama3.3": "llama3", "llama31": "llama3", "llama32": "llama3",
    "llama2chat": "llama2", "llama2-chat": "llama2", "mistral-instruct": "mistral", "mixtral": "mistral",
    "chinese-llama-alpaca": "chinese-alpaca", "chinese-alpaca-2": "llama2-zh", "chinese-llama-alpaca-2": "llama2-zh",
}


def _fold(name: str) -> str:
    return re.sub(r"[-_. ]", "", name.lower())


def template_hint(name: str) -> str:
    """'did you mean …? ' for an unknown template name, or "": the same name written another
    way (case, - _ .), a model family's name for its template, then only a close spelling."""
    folded = [known for known in TEMPLATES if _fold(known) == _fold(name)]
    if len(folded) == 1:
        return f"did you mean '{folded[0]}'? "
    if folded:  # llama2-zh (loraforge's) and llama2_zh (LLaMA-Factory's) differ
        return "did you mean " + " or ".join(f"'{k}' ({TEMPLATES[k].description})" for k in folded) + "? "
    family = _FAMILY_HINTS.get(name.lower()) or next(
        (v for k, v in _FAMILY_HINTS.items() if _fold(k) == _fold(name)), None)
    if family:
        return f"did you mean '{family}' (the template of that model family)? "
    close = difflib.get_close_matches(name, TEMPLATES, n=1, cutoff=0.75)
    return f"did you mean '{close[0]}'? " if close else ""


def template_of(data) -> Template:
    """The template a data config trains with: data.template with data.tool_format and
    data.enable_thinking applied (config.DataConfig; LLaMA-Factory's keys of those names)."""
    return get_template(data.template, tool_format=getattr(data, "tool_format", None),
                        enable_thinking=getattr(data, "enable_thinking", None))


def to_messages(conv: Conversation) -> list[dict]:
    """The conversation as chat messages (what tokenizer.apply_chat_template and the OpenAI API
    take): a function_call turn is an assistant message with `tool_calls` (arguments as a
    mapping, transformers' convention; its thought, if any, as content), an observation a
    `tool` message. The tool definitions go in apply_chat_template's `tools=`."""
    messages = [] if conv.system is None else [{"role": "system", "content": conv.system}]
    for turn in conv.turns:
        if turn.role == "function_call":
            thought, calls = _split_call(turn.text, DEFAULT_THOUGHT, conv.source)
            messages.append({"role": "assistant", "content": thought, "tool_calls": [
                {"type": "function", "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                for c in calls]})
        elif turn.role == "observation":
            messages.append({"role": "tool", "content": turn.text})
        else:
            messages.append({"role": turn.role, "content": turn.text})
    return messages


def conversation_from_messages(messages: Sequence[dict], tools: list | str | None = None) -> Conversation:
    """Chat messages (OpenAI's shape: system/developer, user, assistant with optional
    `tool_calls`, tool) → a Conversation, the inverse of `to_messages`. Consecutive tool
    results become one observation turn, joined as LLaMA-Factory's openai converter does."""
    system, turns, results = None, [], []
    for index, message in enumerate(messages, 1):
        role = message.get("role") if isinstance(message, dict) else None
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant", "tool"):
            raise LoraforgeError(f"message {index}: role must be system, user, assistant or tool, got {role!r}")
        text = _content_text(message.get("content"), index)
        if role != "tool" and results:
            turns.append(Turn("observation", tool_text.TOOL_RESULT_JOINER.join(results)))
            results = []
        if role == "system":
            if index != 1:
                raise LoraforgeError(f"message {index}: a system message may only be the first message")
            system = text
        elif role == "tool":
            results.append(text)
        elif role == "assistant" and message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = call.get("function", call) if isinstance(call, dict) else None
                if not isinstance(function, dict) or "name" not in function:
                    raise LoraforgeError(f"message {index}: each tool call needs function.name and function.arguments")
                calls.append({"name": function["name"], "arguments": function.get("arguments", {})})
            try:
                parsed = tool_text.parse_call_json(json.dumps(calls, ensure_ascii=False))
            except ValueError as exc:
                raise LoraforgeError(f"message {index}: tool_calls: {exc}") from None
            body = json.dumps([{"name": c.name, "arguments": json.loads(c.arguments)} for c in parsed],
                              ensure_ascii=False)
            turns.append(Turn("function_call", text + body))
        else:
            turns.append(Turn(role, text))
    if results:
        turns.append(Turn("observation", tool_text.TOOL_RESULT_JOINER.join(results)))
    if tools is not None and not isinstance(tools, str):
        tools = json.dumps(tools, ensure_ascii=False)
    return Conversation(tuple(turns), system, tools=tools or None)


def _content_text(content, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text", "") for p in content)
    raise LoraforgeError(f"message {index}: content must be text (a string or text parts), "
                         f"got {json.dumps(content, ensure_ascii=False)[:80]}")


DEFAULT_THOUGHT = ("<think>\n", "\n</think>\n\n")


def _split_call(text: str, thought_words: tuple[str, str], source: str) -> tuple[str, list]:
    """(thought, calls) of a function_call turn: a thought segment anywhere in it is kept
    and written before the call, as LLaMA-Factory's FunctionFormatter does."""
    pattern = re.compile(f"{re.escape(thought_words[0])}(.*?){re.escape(thought_words[1])}", re.DOTALL)
    match = pattern.search(text)
    thought = match.group(0) if match else ""
    try:
        return thought, tool_text.parse_call_json(text.replace(thought, "") if thought else text)
    except ValueError as exc:
        where = f"{source}: " if source else ""
        raise LoraforgeError(f"{where}function_call turn: {exc}") from None


def _model_turn(t: Template, turn: Turn, source: str) -> tuple[str, str]:
    """(text added to the prompt, learned text before the end token) of an answer or a call."""
    if turn.role == "function_call":
        thought, calls = _split_call(turn.text, t.thought_words, source)
        body = t.tool_call_prefix + thought + tool_text.calls_text(t.tool_format, calls)
    else:
        body = turn.text
    if not t.thinking:
        return "", body
    # LLaMA-Factory's ReasoningTemplate.encode_multiturn
    if not t.enable_thinking:
        body = tool_text.remove_thought(body, t.thought_words)
    if tool_text.has_thought(body, t.thought_words):
        return "", body
    empty = t.thought_words[0] + t.thought_words[1]
    return ("", empty + body) if t.enable_thinking else (empty, body)


def render_segments(
    t: Template, conv: Conversation, eos_token: str, *, bos_token: str = "<s>"
) -> list[tuple[str, bool]]:
    """The training string cut into consecutive (text, learned) segments.

    Learned segments are exactly each answer (or tool call, as its format writes it)
    followed by the end token; all other text (system and tool definitions, user turns,
    tool results, markup, separators) is in non-learned segments, adjacent ones merged
    and empty ones dropped. `bos_token` only matters for templates whose markup holds
    BOS between rounds (llama2-zh); pass the tokenizer's own.
    """
    _check_turns(conv.turns, conv.source)
    if t.slots:
        return _slot_segments(t, conv, eos_token, bos_token)
    system = conv.system if conv.system is not None else t.default_system
    end = t.end_token if t.end_token is not None else eos_token
    values = {"bos": bos_token, "eos": eos_token}
    system_text = (system or "") + _tools_text(t, conv)
    system_block = _fill(t.system, values, system=system_text) if system_text else ""
    system_in_user = "{system}" in t.user

    segments: list[tuple[str, bool]] = []

    def add(text: str, learned: bool = False) -> None:
        if segments and not learned and not segments[-1][1]:
            segments[-1] = (segments[-1][0] + text, False)
        elif text:
            segments.append((text, learned))

    if not system_in_user:
        add(system_block)
    for index, turn in enumerate(conv.turns):
        if turn.role in USER_SIDE:
            if index > 0:
                add(_fill(t.separator, values))
            fmt = t.observation if turn.role == "observation" and t.observation is not None else t.user
            add(_fill(fmt, values, user=turn.text, system=system_block if index == 0 else ""))
        else:
            extra, learned = _model_turn(t, turn, conv.source)
            add(t.assistant + extra)
            add(learned + end, learned=True)
    return segments


def _slot_segments(
    t: Template, conv: Conversation, eos_token: str, bos_token: str, *, generation: bool = False
) -> list[tuple[str, bool]]:
    """LLaMA-Factory's Template._encode as text: one segment per piece it encodes alone.

    Its first message holds prefix, system block and user turn; each user turn's slot ends
    with the assistant prefix (the generation prompt), each answer's slot is lead + answer +
    end + after_end, learned whole; {bos}/{eos} are pieces of their own (ids, not text).
    The system block goes into the first user turn where the user format holds {system}
    (its Llama2Template). `generation`: the turns end on the user side and the assistant
    prefix (and a thinking template's prompt-side empty thought) closes the last slot.
    """
    system = conv.system if conv.system is not None else t.default_system
    end = t.end_token if t.end_token is not None else "{eos}"  # LLaMA-Factory's {"eos_token"}
    values = {"bos": bos_token, "eos": eos_token}
    system_text = (system or "") + _tools_text(t, conv)
    system_in_user = "{system}" in t.user
    segments: list[tuple[str, bool]] = []

    def add(fmt: str, learned: bool = False, **more: str) -> None:
        segments.extend((piece, learned) for piece in _fill_pieces(fmt, values, **more) if piece)

    add(t.prefix)
    if system_text and not system_in_user:
        add(t.system, system=system_text)
    system_block = _fill(t.system, values, system=system_text) if system_text else ""
    empty_thought = t.thought_words[0] + t.thought_words[1]
    for index, turn in enumerate(conv.turns):
        if turn.role in USER_SIDE:
            fmt = t.observation if turn.role == "observation" and t.observation is not None else t.user
            closes = index + 1 < len(conv.turns) or generation
            add(fmt + (t.assistant if closes else ""), user=turn.text, system=system_block if index == 0 else "")
        else:
            extra, learned = _model_turn(t, turn, conv.source)
            if extra:  # the empty thought of a prompt: LLaMA-Factory appends its ids to the prompt's
                segments.append((extra, False))
            if t.thinking and learned.startswith(empty_thought) and not turn.text.startswith(empty_thought):
                segments.append((empty_thought, True))  # ... or prepends them to the answer's
                learned = learned[len(empty_thought):]
            # a call's slot is LLaMA-Factory's format_function: tool_call_prefix (in `learned`) in place of the lead
            lead = "" if turn.role == "function_call" else t.answer_lead
            add(lead + "{user}" + end + t.after_end, learned=True, user=learned)
    if generation and t.thinking and not t.enable_thinking:
        segments.append((empty_thought, False))
    return segments


def prompt_segments(
    t: Template,
    system: str | None,
    turns: Sequence[Turn],
    eos_token: str,
    *,
    bos_token: str = "<s>",
    tools: str | None = None,
) -> list[tuple[str, bool]]:
    """The generation prompt (`render_prompt`) cut into the segments its ids are encoded
    from (data/tokenize.py `encode_prompt_turns`): for a slot template, one per slot."""
    text = render_prompt(t, system, turns, eos_token, bos_token=bos_token, tools=tools)
    if not t.slots:
        return [(text, False)]
    conv = Conversation(tuple(turns), system, tools=tools)
    _check_turns(conv.turns, conv.source)
    segments = _slot_segments(t, conv, eos_token, bos_token, generation=True)
    assert "".join(s for s, _ in segments) == text, "prompt segments must spell the prompt"
    return segments


def _tools_text(t: Template, conv: Conversation) -> str:
    if not conv.tools:
        return ""
    where = f"{conv.source}: tools" if conv.source else "tools"
    return tool_text.tools_text(t.tool_format, tool_text.parse_tools(conv.tools, where))


def render(t: Template, conv: Conversation, eos_token: str, *, bos_token: str = "<s>") -> str:
    """The full training string of a conversation (no leading BOS: the tokenizer adds it)."""
    return "".join(text for text, _ in render_segments(t, conv, eos_token, bos_token=bos_token))


def render_prompt(
    t: Template,
    system: str | None,
    turns: Sequence[Turn],
    eos_token: str,
    *,
    bos_token: str = "<s>",
    tools: str | None = None,
) -> str:
    """The generation prompt: the history (ending with a user turn or a tool result) exactly
    as in training, then the assistant prefix — so prompt + answer + end token is the
    training string. A thinking template with enable_thinking off also writes the empty
    thought, as its training prompts have it."""
    if not turns or turns[-1].role not in USER_SIDE:
        raise LoraforgeError(
            "render_prompt needs turns that end with a user turn or a tool result (the question to answer); "
            f"got {'no turns' if not turns else 'a last turn from ' + turns[-1].role}"
        )
    history = render(t, Conversation(tuple(turns), system, tools=tools), eos_token, bos_token=bos_token)
    empty = t.thought_words[0] + t.thought_words[1] if t.thinking and not t.enable_thinking else ""
    return history + t.assistant + empty


def jinja_template(t: Template) -> str:
    """The template as a Jinja chat template (HF `tokenizer.chat_template`: variables
    messages, add_generation_prompt, eos_token, bos_token, and tools / enable_thinking as
    transformers' apply_chat_template passes them) rendering exactly what `render` /
    `render_prompt` do — tool definitions, assistant `tool_calls` and `tool` messages included.

    Every tag strips the whitespace around it and all text is emitted from `{{ }}`
    literals, so the result does not depend on trim_blocks/lstrip_blocks (transformers
    sets them; other engines that read the GGUF's template may not). Tools need
    transformers' `tojson` (json.dumps, ensure_ascii=False, keys in order).
    """
    default = _jinja_literal(t.default_system) if t.default_system is not None else "''"
    end = _jinja_literal(t.end_token) if t.end_token is not None else "eos_token"
    lines = [
        f"{{#- loraforge chat template '{t.name}'{_options_comment(t)} -#}}",
        "{%- set ns = namespace(tools_text='', calls_text='', calls=[], observation='', blocks='', names=[],"
        " args='', text='', list=[]) -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content'] -%}",
        "{%- set loop_messages = messages[1:] -%}",
        "{%- else -%}",
        f"{{%- set system = {default} -%}}",
        "{%- set loop_messages = messages -%}",
        "{%- endif -%}",
        *tool_text.jinja_tools_text(t.tool_format),
        "{%- set system_text = (system or '') + ns.tools_text -%}",
    ]
    if t.thinking:
        lines.append(f"{{%- set thinking = enable_thinking if enable_thinking is defined else "
                     f"{'true' if t.enable_thinking else 'false'} -%}}")
    system_block = _jinja_emit(t.system, system="system_text")
    lines += _jinja_emit(t.prefix)
    if "{system}" not in t.user:
        lines += ["{%- if system_text -%}", *system_block, "{%- endif -%}"]
    observation = t.observation if t.observation is not None else t.user
    lines += [
        "{%- for message in loop_messages -%}",
        "{%- if message['role'] == 'user' -%}",
        "{%- if not loop.first -%}",
        *_jinja_emit(t.separator),
        "{%- endif -%}",
        *_jinja_emit(t.user, user="message['content']", system_block=system_block),
        "{%- elif message['role'] == 'tool' -%}",
        # consecutive tool results are one observation turn, as conversation_from_messages makes it
        "{%- if loop.first or loop_messages[loop.index0 - 1]['role'] != 'tool' -%}",
        "{%- set ns.observation = message['content'] -%}",
        "{%- else -%}",
        f"{{%- set ns.observation = ns.observation + {_jinja_literal(tool_text.TOOL_RESULT_JOINER)} + message['content'] -%}}",
        "{%- endif -%}",
        "{%- if loop.last or loop_messages[loop.index0 + 1]['role'] != 'tool' -%}",
        *_jinja_emit(t.separator),
        *_jinja_emit(observation, user="ns.observation"),
        "{%- endif -%}",
        "{%- elif message['role'] == 'assistant' -%}",
        *_jinja_emit(t.assistant),
        "{%- set body = message['content'] if message['content'] is string else '' -%}",
        "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}",
        *tool_text.jinja_calls_text(t.tool_format),
        f"{{%- set body = {_jinja_literal(t.tool_call_prefix)} + body + ns.calls_text -%}}",
        "{%- endif -%}",
    ]
    if t.thinking:
        open_, close = t.thought_words
        lines += [
            # LLaMA-Factory's remove_thought, for one thought segment per answer
            f"{{%- if not thinking and {_jinja_literal(open_)} in body and {_jinja_literal(close)} in body -%}}",
            f"{{%- set body = (body.split({_jinja_literal(open_)})[0] + body.split({_jinja_literal(close)})[-1])"
            ".lstrip('\\n') -%}",
            "{%- endif -%}",
            f"{{%- if {_jinja_literal(open_.strip())} not in body and {_jinja_literal(close.strip())} not in body -%}}",
            f"{{{{- {_jinja_literal(open_ + close)} -}}}}",
            "{%- endif -%}",
        ]
    if t.answer_lead:
        lines += ["{%- if not (message['tool_calls'] is defined and message['tool_calls']) -%}",
                  *_jinja_emit(t.answer_lead), "{%- endif -%}"]
    lines += [
        "{{- body -}}",
        f"{{{{- {end} -}}}}",
        *_jinja_emit(t.after_end),
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}",
        *_jinja_emit(t.assistant),
    ]
    if t.thinking:
        lines += ["{%- if not thinking -%}", f"{{{{- {_jinja_literal(t.thought_words[0] + t.thought_words[1])} -}}}}",
                  "{%- endif -%}"]
    lines.append("{%- endif -%}")
    return "\n".join(lines)


def _options_comment(t: Template) -> str:
    """The settings that differ from the registered template, for `template_in` to restore."""
    base = TEMPLATES.get(t.name)
    out = ""
    if base is not None and t.tool_format != base.tool_format:
        out += f" tool_format={t.tool_format}"
    if base is not None and t.thinking and t.enable_thinking != base.enable_thinking:
        out += f" enable_thinking={'true' if t.enable_thinking else 'false'}"
    return out


def template_name_in(chat_template: str | None) -> str | None:
    """The loraforge template a Jinja chat template was written from (its first-line
    comment, as `jinja_template` writes it), or None for any other template.

    Runs saved before loraforge took LLaMA-Factory's templates under its names (alpaca,
    default, empty, llama3, chatml) name the template they were trained with as it was
    then; that one is "NAME-joined" now, and the saved Jinja is told apart by what it renders.
    """
    match = re.match(r"\{#-? loraforge chat template '([^']+)'", chat_template or "")
    if not match:
        return None
    name = match.group(1)
    legacy = f"{name}-joined"
    if legacy in TEMPLATES and _renders_as(chat_template, legacy) and not _renders_as(chat_template, name):
        return legacy
    return name


# what tells the two apart: a given system prompt, none (the default), a second round
_PROBES = (("S", ("u", "a", "v")), (None, ("u", "a", "v")))


@functools.lru_cache(maxsize=64)
def _renders_as(chat_template: str, name: str) -> bool:
    """Whether the Jinja renders the probe conversations' prompts exactly as template `name` does."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    t = TEMPLATES[name]
    try:
        compiled = ImmutableSandboxedEnvironment().from_string(chat_template)
        for system, texts in _PROBES:
            turns = [Turn("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(texts)]
            messages = to_messages(Conversation(tuple(turns), system))
            got = compiled.render(messages=messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
            if got != render_prompt(t, system, turns, "</s>", bos_token="<s>"):
                return False
    except jinja2.TemplateError:
        return False
    return True


def template_in(chat_template: str | None) -> Template | None:
    """The loraforge template a Jinja chat template was written from, with the settings
    its first line records (tool_format, enable_thinking); None for any other template."""
    name = template_name_in(chat_template)
    if name is None:
        return None
    first = chat_template.split("\n", 1)[0]
    options = dict(re.findall(r" (tool_format|enable_thinking)=(\w+)", first))
    thinking = options.get("enable_thinking")
    return get_template(name, tool_format=options.get("tool_format"),
                        enable_thinking=None if thinking is None else thinking == "true")


def format_parts(fmt: str) -> list[tuple[str, str]]:
    """A format string cut into ("text", literal) and ("placeholder", name) parts, in
    order — for writing a template in another language (export/ollama.py's Go template)."""
    pieces = _PLACEHOLDER.split(fmt)  # literal, name, literal, name, …, literal
    return [("placeholder" if i % 2 else "text", piece) for i, piece in enumerate(pieces) if piece]


def _check_turns(turns: Sequence[Turn], source: str) -> None:
    """Turns alternate a user side (user, or a tool's result) and a model side (an answer,
    or a tool call), starting with the user; a tool result follows a tool call."""
    where = f"{source}: " if source else ""
    if not turns:
        raise LoraforgeError(f"{where}conversation has no turns")
    for index, turn in enumerate(turns):
        side, expected = (USER_SIDE, "user") if index % 2 == 0 else (MODEL_SIDE, "assistant")
        if turn.role not in side:
            raise LoraforgeError(
                f"{where}turn {index + 1} is from '{turn.role}' but should be from '{expected}'"
                f"{' (or ' + side[1] + ')' if index else ''}: conversations alternate user → assistant, "
                "starting with the user"
            )
        if turn.role == "observation" and (index == 0 or turns[index - 1].role != "function_call"):
            raise LoraforgeError(f"{where}turn {index + 1} is a tool result (observation) that follows no "
                                 "tool call: put the function_call turn that produced it right before it")


def _fill(fmt: str, values: dict[str, str], **more: str) -> str:
    """Replace the placeholders in one pass, so substituted text is never scanned again."""
    values = {**values, **more}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], fmt)


def _fill_pieces(fmt: str, values: dict[str, str], **more: str) -> list[str]:
    """`_fill`, cut before and after each {bos}/{eos}: the pieces LLaMA-Factory encodes one
    by one (its slots hold the two tokens as ids, never as text to tokenize)."""
    values = {**values, **more}
    pieces, text, position = [], "", 0
    for match in _PLACEHOLDER.finditer(fmt):
        text += fmt[position : match.start()]
        position = match.end()
        name = match.group(1)
        if name in ("bos", "eos"):
            pieces += [text, values[name]]
            text = ""
        else:
            text += values[name]
    return pieces + [text + fmt[position:]]


def _jinja_emit(
    fmt: str, *, system: str = "", user: str = "", system_block: Sequence[str] = ()
) -> list[str]:
    """Jinja lines that output `fmt`: literals as quoted strings, placeholders as expressions.
    `{system}` inside a user format becomes the system block, in the first round only."""
    lines: list[str] = []
    position = 0
    for match in _PLACEHOLDER.finditer(fmt):
        if match.start() > position:
            lines.append(f"{{{{- {_jinja_literal(fmt[position : match.start()])} -}}}}")
        name = match.group(1)
        if name in ("bos", "eos"):
            lines.append(f"{{{{- {name}_token -}}}}")
        elif name == "user":
            lines.append(f"{{{{- {user} -}}}}")
        elif system_block:
            lines += ["{%- if loop.first and system_text -%}", *system_block, "{%- endif -%}"]
        elif system:  # no system expression: a later turn's {system} is empty
            lines.append(f"{{{{- {system} -}}}}")
        position = match.end()
    if position < len(fmt):
        lines.append(f"{{{{- {_jinja_literal(fmt[position:])} -}}}}")
    return lines


def _jinja_literal(text: str) -> str:
    """A single-quoted Jinja string literal. Jinja decodes literals with Python's
    unicode-escape rules, so backslash, quote and control characters are escaped; other
    characters (Chinese included) are written as they are."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f"'{escaped}'"
