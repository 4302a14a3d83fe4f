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
- System prompt: `Conversation.system = None` means "use the template's default_system"
  (which may itself be None); `""` means "no system prompt" even when there is a
  default. In messages form a system message with empty content means the same.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from loraforge.data.records import Conversation, Turn
from loraforge.errors import LoraforgeError

# Placeholders a format string may hold. Everything else in it is literal markup, so
# user text containing "{user}" or "{{" is never re-expanded.
_PLACEHOLDER = re.compile(r"\{(system|user|bos)\}")


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    default_system: str | None  # used when a conversation has no system prompt (None)
    stop_strings: tuple[str, ...]  # end an answer at inference besides EOS (the end token included)
    end_token: str | None  # ends each answer; None → the tokenizer's eos_token does
    system: str = "{system}"  # the system block, "{system}" → the system prompt
    user: str = "{user}"  # a user turn; "{system}" in it → the system block goes there in round 1
    assistant: str = ""  # the prefix the answer follows (the generation prompt)
    separator: str = ""  # between an answer's end token and the next round; "{bos}" → BOS


_ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

_ALPACA = Template(
    name="alpaca",
    description="Stanford Alpaca: ### Instruction: / ### Response:",
    default_system=_ALPACA_SYSTEM,
    stop_strings=("### Instruction:",),
    end_token=None,
    system="{system}\n\n",
    user="### Instruction:\n{user}\n\n",
    assistant="### Response:\n",
    separator="\n\n",
)

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        _ALPACA,
        # Chinese-LLaMA-Alpaca v1's scripts end the prompt with "### Response: " — a space,
        # no newline; a model trained on it expects exactly that.
        replace(_ALPACA, name="chinese-alpaca", assistant="### Response: ",
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
            name="llama3",
            description="Llama-3 instruct: <|start_header_id|>role<|end_header_id|> … <|eot_id|>",
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
            name="chatml",
            description="ChatML (Qwen): <|im_start|>role … <|im_end|>",
            default_system="You are a helpful assistant.",
            stop_strings=("<|im_end|>",),
            end_token="<|im_end|>",
            system="<|im_start|>system\n{system}<|im_end|>\n",
            user="<|im_start|>user\n{user}<|im_end|>\n",
            assistant="<|im_start|>assistant\n",
            separator="\n",
        ),
        Template(
            name="default",
            description="LLaMA-Factory's default for base models: Human: … Assistant: …",
            default_system=None,
            stop_strings=("\nHuman:",),
            end_token=None,
            system="{system}\n",
            user="Human: {user}\n",
            assistant="Assistant: ",
            separator="\n",
        ),
        Template(
            name="empty",
            description="no markup: system, user and answer text back to back",
            default_system=None,
            stop_strings=(),
            end_token=None,
        ),
    ]
}


def get_template(name: str) -> Template:
    """The template called `name`; an unknown name is an error that suggests the closest."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    close = difflib.get_close_matches(name, TEMPLATES, n=1, cutoff=0.4)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise LoraforgeError(
        f"unknown chat template '{name}': {hint}known templates are {', '.join(TEMPLATES)} "
        "(set data.template to one of them)"
    )


def to_messages(conv: Conversation) -> list[dict]:
    """The conversation as chat messages (what tokenizer.apply_chat_template and the OpenAI API take)."""
    messages = [] if conv.system is None else [{"role": "system", "content": conv.system}]
    return messages + [{"role": turn.role, "content": turn.text} for turn in conv.turns]


def render_segments(
    t: Template, conv: Conversation, eos_token: str, *, bos_token: str = "<s>"
) -> list[tuple[str, bool]]:
    """The training string cut into consecutive (text, learned) segments.

    Learned segments are exactly each answer followed by the end token; all other text
    (system, user, markup, separators) is in non-learned segments, adjacent ones merged
    and empty ones dropped. `bos_token` only matters for templates whose markup holds
    BOS between rounds (llama2-zh); pass the tokenizer's own.
    """
    _check_turns(conv.turns, conv.source)
    system = conv.system if conv.system is not None else t.default_system
    end = t.end_token if t.end_token is not None else eos_token
    values = {"bos": bos_token}
    system_block = _fill(t.system, values, system=system) if system else ""
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
        if turn.role == "user":
            if index > 0:
                add(_fill(t.separator, values))
            add(_fill(t.user, values, user=turn.text, system=system_block if index == 0 else ""))
        else:
            add(t.assistant)
            add(turn.text + end, learned=True)
    return segments


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
) -> str:
    """The generation prompt: the history (ending with a user turn) exactly as in training,
    then the assistant prefix — so prompt + answer + end token is the training string."""
    if not turns or turns[-1].role != "user":
        raise LoraforgeError(
            "render_prompt needs turns that end with a user turn (the question to answer); "
            f"got {'no turns' if not turns else 'a last turn from ' + turns[-1].role}"
        )
    history = render(t, Conversation(tuple(turns), system), eos_token, bos_token=bos_token)
    return history + t.assistant


def jinja_template(t: Template) -> str:
    """The template as a Jinja chat template (HF `tokenizer.chat_template`: variables
    messages, add_generation_prompt, eos_token, bos_token) rendering exactly what
    `render` / `render_prompt` do.

    Every tag strips the whitespace around it and all text is emitted from `{{ }}`
    literals, so the result does not depend on trim_blocks/lstrip_blocks (transformers
    sets them; other engines that read the GGUF's template may not).
    """
    default = _jinja_literal(t.default_system) if t.default_system is not None else "''"
    end = _jinja_literal(t.end_token) if t.end_token is not None else "eos_token"
    lines = [
        f"{{#- loraforge chat template '{t.name}' -#}}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content'] -%}",
        "{%- set loop_messages = messages[1:] -%}",
        "{%- else -%}",
        f"{{%- set system = {default} -%}}",
        "{%- set loop_messages = messages -%}",
        "{%- endif -%}",
    ]
    system_block = _jinja_emit(t.system, system="system")
    if "{system}" not in t.user:
        lines += ["{%- if system -%}", *system_block, "{%- endif -%}"]
    lines += [
        "{%- for message in loop_messages -%}",
        "{%- if message['role'] == 'user' -%}",
        "{%- if not loop.first -%}",
        *_jinja_emit(t.separator),
        "{%- endif -%}",
        *_jinja_emit(t.user, user="message['content']", system_block=system_block),
        "{%- elif message['role'] == 'assistant' -%}",
        *_jinja_emit(t.assistant),
        "{{- message['content'] -}}",
        f"{{{{- {end} -}}}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}",
        *_jinja_emit(t.assistant),
        "{%- endif -%}",
    ]
    return "\n".join(lines)


def template_name_in(chat_template: str | None) -> str | None:
    """The loraforge template a Jinja chat template was written from (its first-line
    comment, as `jinja_template` writes it), or None for any other template."""
    match = re.match(r"\{#-? loraforge chat template '([^']+)'", chat_template or "")
    return match.group(1) if match else None


def format_parts(fmt: str) -> list[tuple[str, str]]:
    """A format string cut into ("text", literal) and ("placeholder", name) parts, in
    order — for writing a template in another language (export/ollama.py's Go template)."""
    pieces = _PLACEHOLDER.split(fmt)  # literal, name, literal, name, …, literal
    return [("placeholder" if i % 2 else "text", piece) for i, piece in enumerate(pieces) if piece]


def _check_turns(turns: Sequence[Turn], source: str) -> None:
    """Turns must alternate user → assistant, starting with the user."""
    where = f"{source}: " if source else ""
    if not turns:
        raise LoraforgeError(f"{where}conversation has no turns")
    for index, turn in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn.role != expected:
            raise LoraforgeError(
                f"{where}turn {index + 1} is from '{turn.role}' but should be from '{expected}': "
                "conversations alternate user → assistant, starting with the user"
            )


def _fill(fmt: str, values: dict[str, str], **more: str) -> str:
    """Replace the placeholders in one pass, so substituted text is never scanned again."""
    values = {**values, **more}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], fmt)


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
        if name == "bos":
            lines.append("{{- bos_token -}}")
        elif name == "user":
            lines.append(f"{{{{- {user} -}}}}")
        elif system_block:
            lines += ["{%- if loop.first and system -%}", *system_block, "{%- endif -%}"]
        else:
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
