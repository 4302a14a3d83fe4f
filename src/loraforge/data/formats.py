"""Data files (.json .jsonl .csv .parquet .txt) → canonical records.

Field names follow LLaMA-Factory's dataset_info.json conventions (alpaca `columns`,
sharegpt `tags`), so a LLaMA-Factory data folder loads unchanged. Every record that
cannot be used becomes a `Problem` that points at its file and line; the caller either
stops on them or, with `skip_invalid`, drops them and reports what was dropped.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Literal

from loraforge.data import tools as tool_text
from loraforge.data.records import (
    MODEL_SIDE,
    USER_SIDE,
    Conversation,
    LoadReport,
    Problem,
    Record,
    Text,
    Turn,
)
from loraforge.data.rows import SUPPORTED_SUFFIXES, BadRow, read_rows  # noqa: F401 (re-exported)
from loraforge.errors import LoraforgeError

FORMATTINGS = ("auto", "alpaca", "sharegpt", "openai", "text")

# role → field name; `columns` given to load_records override these, and None turns a role off
COLUMN_DEFAULTS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output",
               "history": "history", "system": "system", "tools": "tools"},
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools"},
    "openai": {"messages": "messages", "system": "system", "tools": "tools"},
    "text": {"prompt": "text", "query": None},
}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system", "observation_tag": "observation", "function_tag": "function_call"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "system_tag": "system", "observation_tag": "tool", "function_tag": "function"}
SHOWN_PROBLEMS = 5
# a thought given beside the answer (distilled reasoning data) is written in front of it,
# between LLaMA-Factory's default thought words, so every template trains on it as text
REASONING_FIELDS = ("reasoning", "chain_of_thought", "reasoning_content")
THOUGHT_OPEN, THOUGHT_CLOSE = "<think>\n", "\n</think>\n\n"
UNDETECTED = "cannot tell the format (no instruction, conversations, messages or text field)"
SKIP_HINT = "fix these records, or set data.skip_invalid=true to drop them"



class _Invalid(Exception):
    """One record is unusable; caught per record and turned into a Problem."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------- one row → one record


def detect_formatting(row: dict) -> str:
    """Name the format a row is written in, from the fields it has."""
    for key, formatting in (("instruction", "alpaca"), ("conversations", "sharegpt"),
                            ("messages", "openai"), ("text", "text")):
        if key in row:
            return formatting
    found = ", ".join(f"'{key}'" for key in row) or "none"
    raise LoraforgeError(
        f"cannot tell the data format from the fields ({found}): expected 'instruction' (alpaca), "
        "'conversations' (sharegpt), 'messages' (openai) or 'text' (plain text) — rename the fields, "
        "or declare formatting and columns in dataset_info.json")


def _kind(value: object) -> str:
    names = {str: "string", list: "list", dict: "object", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _string(row: dict, column: str | None, *, required: bool) -> str | None:
    if column is None:
        return None
    value = row.get(column)
    if value is None:
        if required:
            raise _Invalid(f"missing field '{column}'")
        return None
    if not isinstance(value, str):
        raise _Invalid(f"field '{column}' must be a string, got {_kind(value)}")
    return value


def _user_text(row: dict, columns: dict) -> str:
    # LLaMA-Factory's rule: instruction and input joined by a newline, empty parts left out
    parts = [_string(row, columns["prompt"], required=True), _string(row, columns["query"], required=False)]
    return "\n".join(part for part in parts if part)


def _plain_text(columns: dict, row: dict, source: str) -> Text:
    text = _user_text(row, columns)
    if not text.strip():
        raise _Invalid("empty text")
    return Text(text, source=source)


def _alpaca_conversation(columns: dict, row: dict, source: str) -> Conversation:
    user = _user_text(row, columns)
    response = _string(row, columns["response"], required=True)
    history = row.get(columns["history"]) if columns["history"] else None
    if history is not None and not isinstance(history, list):
        raise _Invalid("history must be a list of [question, answer] pairs", f"got {_kind(history)}")
    turns: list[Turn] = []
    for index, pair in enumerate(history or [], 1):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise _Invalid("history must be a list of [question, answer] pairs",
                           f"item {index} is {pair!r:.60}")
        turns += [Turn("user", pair[0]), Turn("assistant", pair[1])]
    if not user.strip():
        raise _Invalid("empty instruction")
    if not response.strip():
        raise _Invalid("empty response")
    system = _string(row, columns["system"], required=False)
    turns += [Turn("user", user), Turn("assistant", _with_reasoning(row, response))]
    return Conversation(tuple(turns), system=system or None, source=source, tools=_tools(row, columns))


def _with_reasoning(holder: dict, answer: str) -> str:
    for key in REASONING_FIELDS:
        thought = holder.get(key)
        if isinstance(thought, str) and thought.strip():
            if THOUGHT_OPEN.strip() in answer:
                raise _Invalid(f"the answer has a <think> segment and a '{key}' field: keep one")
            return THOUGHT_OPEN + thought.strip("\n") + THOUGHT_CLOSE + answer
        if thought is not None and not isinstance(thought, str):
            raise _Invalid(f"field '{key}' must be a string, got {_kind(thought)}")
    return answer


def _tools(row: dict, columns: dict) -> str | None:
    """The tool definitions as JSON text (glaive writes a JSON string, others a list)."""
    column = columns.get("tools")
    value = row.get(column) if column else None
    if value is None or value == "" or value == []:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if not isinstance(value, str | list):
        raise _Invalid(f"field '{column}' must be a JSON list of tools (or its text), got {_kind(value)}")
    try:
        tools = tool_text.parse_tools(text, f"field '{column}'")
    except LoraforgeError as exc:
        raise _Invalid("invalid tool definitions", str(exc)) from None
    return text if tools else None


def _chat_turns(columns: dict, tags: dict, row: dict) -> tuple[str | None, list[Turn]]:
    column = columns["messages"]
    messages = row.get(column)
    if messages is None:
        raise _Invalid(f"missing field '{column}'")
    if not isinstance(messages, list):
        raise _Invalid(f"field '{column}' must be a list, got {_kind(messages)}")
    numbered = list(enumerate(messages, 1))
    system = _string(row, columns["system"], required=False)
    if numbered and isinstance(messages[0], dict) and messages[0].get(tags["role_tag"]) == tags["system_tag"]:
        system = _message_text(tags, 1, messages[0])
        numbered = numbered[1:]
    if not numbered:
        raise _Invalid("empty conversation")
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant",
             tags["observation_tag"]: "observation", tags["function_tag"]: "function_call"}
    turns: list[Turn] = []
    for number, message, role in _merged_tool_results(tags, numbered):
        if role in roles.values():  # already a canonical role (merged tool results, openai tool_calls)
            turn_role = role
        else:
            if not isinstance(role, str | None):
                role = repr(role)
            if role not in roles and role != tags["system_tag"]:
                if role is None:
                    raise _Invalid(f"message has no '{tags['role_tag']}'",
                                   f"message {number} has {', '.join(map(str, message)) or 'no fields'}")
                raise _Invalid(f"unknown role '{role}' (expected {tags['user_tag']}, {tags['assistant_tag']}, "
                               f"{tags['function_tag']}, {tags['observation_tag']} or {tags['system_tag']})")
            turn_role = roles.get(role, "system")
        # LLaMA-Factory's rule: user side at even positions, model side at odd ones
        side, expected = (USER_SIDE, "user") if len(turns) % 2 == 0 else (MODEL_SIDE, "assistant")
        if turn_role not in side:
            shown = tags[{"user": "user_tag", "assistant": "assistant_tag", "observation": "observation_tag",
                          "function_call": "function_tag"}.get(turn_role, "system_tag")]
            other = tags["observation_tag" if expected == "user" else "function_tag"]
            raise _Invalid(f"roles out of order: message {number} should be from "
                           f"'{tags[expected + '_tag']}'" + (f" or '{other}'" if turns else "") + f", got '{shown}'")
        text = message if isinstance(message, str) else _message_text(tags, number, message)
        if turn_role == "observation" and turns[-1].role != "function_call":
            raise _Invalid("tool result (observation) with no tool call (function_call) before it",
                           f"message {number}")
        if turn_role == "function_call":
            try:
                tool_text.parse_call_json(text)
            except ValueError as exc:
                raise _Invalid("function_call is not a JSON tool call", f"message {number}: {exc}") from None
        elif turn_role == "assistant" and isinstance(message, dict):
            text = _with_reasoning(message, text)
        if not text.strip():
            raise _Invalid("empty response" if expected == "assistant" else "empty user message",
                           f"message {number}")
        turns.append(Turn(turn_role, text))
    if turns[-1].role in USER_SIDE:
        raise _Invalid("conversation ends with a user message" if turns[-1].role == "user"
                       else "conversation ends with a tool result (no answer after it)")
    return system or None, turns


def _merged_tool_results(tags: dict, numbered: list) -> list[tuple[int, object, object]]:
    """(number, message or text, role) per turn. OpenAI-style data: an assistant message with
    `tool_calls` is a function_call turn, and consecutive `tool` messages are one observation
    turn (joined as LLaMA-Factory's openai converter joins them)."""
    out: list[tuple[int, object, object]] = []
    results: list[str] = []
    role_of = lambda m: m.get(tags["role_tag"]) if isinstance(m, dict) else None  # noqa: E731
    for position, (number, message) in enumerate(numbered):
        if not isinstance(message, dict):
            raise _Invalid("message is not an object", f"message {number} is a {_kind(message)}")
        role = message.get(tags["role_tag"])
        if tags["observation_tag"] == "tool" and role == "tool":
            results.append(_message_text(tags, number, message))
            if position + 1 == len(numbered) or role_of(numbered[position + 1][1]) != "tool":
                out.append((number, tool_text.TOOL_RESULT_JOINER.join(results), "observation"))
                results = []
            continue
        calls = message.get("tool_calls")
        if calls and role in (tags["assistant_tag"], tags["function_tag"]):
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                      for c in calls):
                raise _Invalid("tool_calls must be a list of {\"function\": {\"name\": …, \"arguments\": …}}",
                               f"message {number}")
            text = json.dumps([c["function"] for c in calls], ensure_ascii=False)
            content = message.get(tags["content_tag"])
            if isinstance(content, str) and THOUGHT_OPEN.strip() in content:
                text = content + text  # a thought before the call is kept, as the templates write it
            out.append((number, text, "function_call"))
            continue
        out.append((number, message, role))
    return out


def _message_text(tags: dict, number: int, message: dict) -> str:
    key = tags["content_tag"]
    value = message.get(key)
    if value is None:
        raise _Invalid(f"message has no '{key}'", f"message {number}")
    if not isinstance(value, str):
        raise _Invalid(f"message '{key}' must be a string, got {_kind(value)}", f"message {number}")
    return value


def _chat_record(as_text: bool, columns: dict, tags: dict, row: dict, source: str) -> Record:
    system, turns = _chat_turns(columns, tags, row)
    if as_text:
        return Text("\n".join(([system] if system else []) + [turn.text for turn in turns]), source=source)
    return Conversation(tuple(turns), system=system, source=source, tools=_tools(row, columns))


# ---------------------------------------------------------------- a whole dataset


def _resolve_tags(formatting: str, tags: dict | None, first_row: dict, columns: dict,
                  auto: bool, label: str) -> dict:
    defaults = OPENAI_TAGS if formatting == "openai" else SHAREGPT_TAGS
    if tags is None and auto:
        # "conversations" with role/content (and "messages" with from/value) are both common
        messages = first_row.get(columns["messages"])
        first = messages[0] if isinstance(messages, list) and messages else None
        if isinstance(first, dict):
            defaults = OPENAI_TAGS if "role" in first else SHAREGPT_TAGS if "from" in first else defaults
    unknown = set(tags or {}) - set(SHAREGPT_TAGS)
    if unknown:
        raise LoraforgeError(f"dataset {label}: unknown tag '{sorted(unknown)[0]}' — known tags are "
                             f"{', '.join(SHAREGPT_TAGS)}")
    return {**defaults, **(tags or {})}


def _record_reader(formatting: str, columns: dict | None, tags: dict | None, stage: str,
                   row: dict, auto: bool, label: str) -> Callable[[dict, str], Record]:
    """The converter for a file in `formatting`, fitted to its first record."""
    resolved = {**COLUMN_DEFAULTS[formatting], **(columns or {})}
    if stage == "sft" and (formatting == "text" or (formatting == "alpaca" and not resolved["response"])):
        raise LoraforgeError(f"dataset {label} is plain text: use stage: pt, or give instruction data "
                             "(alpaca instruction/output or sharegpt conversations)")
    if formatting in ("alpaca", "text"):
        return partial(_plain_text if stage == "pt" else _alpaca_conversation, resolved)
    chat_tags = _resolve_tags(formatting, tags, row, resolved, auto, label)
    return partial(_chat_record, stage == "pt", resolved, chat_tags)


def _check_declared(formatting: str, columns: dict | None, row: dict, source: str, label: str) -> None:
    """Point at the dataset_info entry when the first record is plainly in another format."""
    resolved = {**COLUMN_DEFAULTS[formatting], **(columns or {})}
    key = resolved.get("messages", resolved.get("prompt"))
    if key is None or key in row:
        return
    try:
        looks = detect_formatting(row)
    except LoraforgeError:
        return
    if looks != formatting:
        raise LoraforgeError(f"dataset {label} is declared {formatting}, but its first record ({source}) "
                             f"has no '{key}' and looks like {looks} — set \"formatting\": \"{looks}\" "
                             "(and columns/tags if the names differ) in its dataset_info.json entry")


def load_records(path: Path, *, formatting: str = "auto", columns: dict | None = None,
                 tags: dict | None = None, stage: Literal["pt", "sft"] = "sft",
                 skip_invalid: bool = False, name: str | None = None) -> LoadReport:
    """Read one data file into canonical records.

    `formatting` "auto" picks the format from the first record's fields. In stage "pt"
    every format becomes `Text`; in "sft" chat and instruction data become
    `Conversation`s and plain text is an error. `columns` override `COLUMN_DEFAULTS`
    (None turns a role off) and `tags` the sharegpt/openai message tags. Invalid records
    raise a LoraforgeError listing them, unless `skip_invalid`, which drops them into
    `LoadReport.problems`.
    """
    path = Path(path)
    label = name or path.name
    if formatting not in FORMATTINGS:
        raise LoraforgeError(f"dataset {label}: unknown formatting '{formatting}' — use one of "
                             f"{', '.join(FORMATTINGS)}")
    if path.suffix.lower() == ".txt":  # a line is plain text whatever the entry says, as in LLaMA-Factory
        formatting, columns = "text", None
    report = LoadReport(name=label, format=formatting)
    convert, unmapped, unused = None, {}, Counter()
    for source, row in read_rows(path):
        if isinstance(row, BadRow):
            report.problems.append(Problem(source, row.reason, row.detail))
            continue
        if not isinstance(row, dict):
            report.problems.append(Problem(source, "record is not an object", f"got {_kind(row)}"))
            continue
        if convert is None:
            if formatting != "auto":
                _check_declared(formatting, columns, row, source, label)
                report.format = formatting
            else:
                try:
                    report.format = detect_formatting(row)
                except LoraforgeError as error:
                    if not skip_invalid:
                        raise LoraforgeError(f"{source}: {error}") from None
                    report.problems.append(Problem(source, UNDETECTED, f"fields {', '.join(map(str, row))}"))
                    continue
            convert = _record_reader(report.format, columns, tags, stage, row, formatting == "auto", label)
            unmapped = _unmapped_fields(report.format, columns)
        for key in unmapped:
            unused[key] += bool(row.get(key))
        try:
            report.records.append(convert(row, source))
        except _Invalid as invalid:
            report.problems.append(Problem(source, invalid.reason, invalid.detail))
    _check_report(report, path, skip_invalid)
    if any(unused.values()):
        fields = ", ".join(f"'{key}' ({count})" for key, count in unused.items() if count)
        mapping = ", ".join(f'"{role}": "{key}"' for key, role in unmapped.items() if unused[key])
        report.notes.append(f"records with {fields} fields that the columns do not map — "
                            f"not trained on, as in LLaMA-Factory; to use them add \"columns\": {{{mapping}}} "
                            "(with the main fields) to its dataset_info.json entry")
    return report


def _unmapped_fields(formatting: str, columns: dict | None) -> dict[str, str]:
    """Field → role, for the optional roles (history, system, tools) a dataset_info entry's
    columns leave out: LLaMA-Factory does not read those fields, so neither do we."""
    if columns is None:
        return {}
    optional = ("history", "system", "tools")
    return {COLUMN_DEFAULTS[formatting][role]: role for role in optional
            if role in COLUMN_DEFAULTS[formatting] and columns.get(role) is None}


def _check_report(report: LoadReport, path: Path, skip_invalid: bool) -> None:
    problems = report.problems
    if problems and not skip_invalid:
        shown = [f"  {problem}" for problem in problems[:SHOWN_PROBLEMS]]
        more = [f"  … and {len(problems) - SHOWN_PROBLEMS} more"] if len(problems) > SHOWN_PROBLEMS else []
        raise LoraforgeError("\n".join([f"dataset {report.name}: {_count(len(problems), 'invalid record')} "
                                        f"in {path}", *shown, *more, SKIP_HINT]))
    if not report.records:
        groups = ", ".join(f"{count} × {reason}" for reason, count, _ in _group(problems))
        why = f"{len(problems)} skipped: {groups}" if problems else "the file has no rows"
        raise LoraforgeError(f"{path}: no usable records ({why})")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _group(problems: list[Problem]) -> list[tuple[str, int, str]]:
    """(reason, count, first source), most frequent first; ties keep file order."""
    groups: dict[str, list] = {}
    for problem in problems:
        groups.setdefault(problem.reason, [0, problem.source])[0] += 1
    return sorted(((reason, count, first) for reason, (count, first) in groups.items()), key=lambda g: -g[1])


def summarize_problems(problems: list[Problem]) -> str:
    """One line for people: how many records were dropped, and why, grouped by reason."""
    if not problems:
        return "no invalid records"
    groups = ", ".join(f"{count} × {reason} (first at {first})" for reason, count, first in _group(problems))
    return f"dropped {_count(len(problems), 'invalid record')}: {groups}"
