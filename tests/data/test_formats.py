"""Data files → canonical records: every file type, every format, every kind of bad record."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from loraforge.data.formats import detect_formatting, load_records, read_rows, summarize_problems
from loraforge.data.records import Conversation, Problem, Text, Turn
from loraforge.errors import LoraforgeError


def write_rows(path: Path, rows: list) -> Path:
    """Write rows in the file's format; in .json element i starts on line i + 2."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    elif path.suffix == ".json":
        body = ",\n".join(json.dumps(row, ensure_ascii=False) for row in rows)
        path.write_text(f"[\n{body}\n]\n", encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".txt":
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def unsourced(records):
    return [replace(record, source="") for record in records]


def chat(*texts: str, system: str | None = None) -> Conversation:
    roles = ("user", "assistant")
    return Conversation(tuple(Turn(roles[i % 2], text) for i, text in enumerate(texts)), system=system)


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


# ---------------------------------------------------------------- good data, every file type

ALPACA_ROWS = [
    {"instruction": "把这句话翻译成英文", "input": "你好", "output": "Hello", "system": ""},
    {"instruction": "写一首诗", "input": "", "output": "床前明月光", "system": "你是诗人"},
]
ALPACA_RECORDS = [chat("把这句话翻译成英文\n你好", "Hello"), chat("写一首诗", "床前明月光", system="你是诗人")]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_alpaca_reads_the_same_from_every_file_type(tmp_path, suffix):
    path = write_rows(tmp_path / f"demo{suffix}", ALPACA_ROWS)
    report = load_records(path)
    assert report.format == "alpaca"
    assert report.name == f"demo{suffix}"
    assert unsourced(report.records) == ALPACA_RECORDS
    assert report.problems == []


@pytest.mark.parametrize(("suffix", "sources"), [
    (".json", ["demo.json:2", "demo.json:3"]),
    (".jsonl", ["demo.jsonl:1", "demo.jsonl:2"]),
    (".csv", ["demo.csv:2", "demo.csv:3"]),
    (".parquet", ["demo.parquet#row 0", "demo.parquet#row 1"]),
])
def test_records_point_at_their_line(tmp_path, suffix, sources):
    path = write_rows(tmp_path / f"demo{suffix}", ALPACA_ROWS)
    assert [record.source for record in load_records(path).records] == [f"{tmp_path}/{s}" for s in sources]


def test_pretty_printed_json_sources_are_the_lines_where_records_start(tmp_path):
    rows = [{"instruction": "q", "output": "a", "history": [["h", "i"]]}, *ALPACA_ROWS] * 2
    path = tmp_path / "pretty.json"
    text = json.dumps(rows, indent=2, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")
    starts = [number for number, line in enumerate(text.split("\n"), 1) if line.startswith("  {")]
    assert len(starts) == 6
    assert [source for source, _ in read_rows(path)] == [f"{path}:{n}" for n in starts]


def test_csv_row_with_a_multiline_field_points_at_its_first_line(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('instruction, output\n"line one\nline two",a\n\nq,"b"\n', encoding="utf-8")
    rows = list(read_rows(path))
    assert rows == [(f"{path}:2", {"instruction": "line one\nline two", "output": "a"}),
                    (f"{path}:5", {"instruction": "q", "output": "b"})]


def test_csv_with_byte_order_mark_reads_its_first_column(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("instruction,output\n问,答\n".encode("utf-8-sig"))
    assert unsourced(load_records(path).records) == [chat("问", "答")]


def test_json_file_holding_one_object_per_line_is_read_as_jsonl(tmp_path):
    path = write_rows(tmp_path / "lines.jsonl", ALPACA_ROWS).rename(tmp_path / "lines.json")
    report = load_records(path)
    assert unsourced(report.records) == ALPACA_RECORDS
    assert report.records[1].source == f"{path}:2"


# ---------------------------------------------------------------- every format

SHAREGPT_TAGS = {"role_tag": "speaker", "content_tag": "words", "user_tag": "客户", "assistant_tag": "客服",
                 "system_tag": "设定"}

FORMAT_CASES = {
    "alpaca with history": (
        "alpaca", None, None,
        {"instruction": "q2", "output": "a2", "history": [["q1", "a1"]], "system": "s"},
        chat("q1", "a1", "q2", "a2", system="s")),
    "alpaca empty instruction uses the input": (
        "alpaca", None, None, {"instruction": "", "input": "only input", "output": "a"}, chat("only input", "a")),
    "alpaca renamed columns keep the other defaults": (
        "alpaca", {"prompt": "question", "response": "answer"}, None,
        {"question": "q", "answer": "a", "input": "i"}, chat("q\ni", "a")),
    "alpaca column set to None is ignored": (
        "alpaca", {"query": None, "system": None}, None,
        {"instruction": "q", "output": "a", "input": "i", "system": "s"}, chat("q", "a")),
    "sharegpt with system message": (
        "sharegpt", None, None,
        {"conversations": [{"from": "system", "value": "s"}, human("q1"), gpt("a1"), human("q2"), gpt("a2")]},
        chat("q1", "a1", "q2", "a2", system="s")),
    "sharegpt with system column": (
        "sharegpt", None, None, {"conversations": [human("q"), gpt("a")], "system": "s"}, chat("q", "a", system="s")),
    "sharegpt with custom tags": (
        "sharegpt", {"messages": "dialog"}, SHAREGPT_TAGS,
        {"dialog": [{"speaker": "设定", "words": "s"}, {"speaker": "客户", "words": "q"},
                    {"speaker": "客服", "words": "a"}]},
        chat("q", "a", system="s")),
    "openai": (
        "openai", None, None,
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}]},
        chat("q", "a", system="s")),
    "auto alpaca": ("auto", None, None, {"instruction": "q", "output": "a", "extra": [1]}, chat("q", "a")),
    "auto sharegpt": ("auto", None, None, {"conversations": [human("q"), gpt("a")]}, chat("q", "a")),
    "auto conversations with role/content": (
        "auto", None, None,
        {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        chat("q", "a")),
    "auto messages with from/value": ("auto", None, None, {"messages": [human("q"), gpt("a")]}, chat("q", "a")),
}


@pytest.mark.parametrize(("formatting", "columns", "tags", "row", "record"), FORMAT_CASES.values(),
                         ids=FORMAT_CASES.keys())
def test_sft_formats_become_conversations(tmp_path, formatting, columns, tags, row, record):
    path = write_rows(tmp_path / "data.jsonl", [row])
    report = load_records(path, formatting=formatting, columns=columns, tags=tags, stage="sft")
    assert unsourced(report.records) == [record]


PT_CASES = {
    "alpaca": ("alpaca", None, {"instruction": "q", "input": "i", "output": "ignored"}, "q\ni"),
    "alpaca prompt column only": ("alpaca", {"prompt": "text"}, {"text": "正文"}, "正文"),
    "sharegpt": ("sharegpt", None,
                 {"conversations": [{"from": "system", "value": "s"}, human("q"), gpt("a")]}, "s\nq\na"),
    "openai": ("openai", None, {"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}, "q\na"),
    "text": ("text", None, {"text": "一段话"}, "一段话"),
    "auto text": ("auto", None, {"text": "一段话", "meta": 1}, "一段话"),
}


@pytest.mark.parametrize(("formatting", "columns", "row", "text"), PT_CASES.values(), ids=PT_CASES.keys())
def test_pretraining_stage_turns_every_format_into_text(tmp_path, formatting, columns, row, text):
    path = write_rows(tmp_path / "data.jsonl", [row])
    report = load_records(path, formatting=formatting, columns=columns, stage="pt")
    assert unsourced(report.records) == [Text(text)]


def test_txt_lines_are_texts_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("第一行\n\n   \n第二行\r\n", encoding="utf-8")
    report = load_records(path, stage="pt")
    assert report.format == "text"
    assert report.records == [Text("第一行", f"{path}:1"), Text("第二行", f"{path}:4")]


@pytest.mark.parametrize(("name", "rows", "kwargs"), [
    ("corpus.txt", ["一段话"], {}),
    ("corpus.jsonl", [{"text": "一段话"}], {}),
    ("c4.jsonl", [{"text": "一段话"}], {"formatting": "alpaca", "columns": {"prompt": "text", "response": None}}),
])
def test_plain_text_in_sft_stage_says_to_use_pt(tmp_path, name, rows, kwargs):
    path = write_rows(tmp_path / name, rows)
    with pytest.raises(LoraforgeError, match=f"dataset {name} is plain text: use stage: pt"):
        load_records(path, stage="sft", **kwargs)


@pytest.mark.parametrize(("row", "formatting"), [
    ({"instruction": "", "conversations": []}, "alpaca"),
    ({"conversations": []}, "sharegpt"),
    ({"messages": [], "text": ""}, "openai"),
    ({"text": ""}, "text"),
])
def test_detect_formatting(row, formatting):
    assert detect_formatting(row) == formatting


def test_undetectable_record_names_its_fields_and_the_expected_ones(tmp_path):
    path = write_rows(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(LoraforgeError) as error:
        load_records(path)
    message = str(error.value)
    assert "odd.jsonl:1" in message and "'question', 'answer'" in message and "'instruction' (alpaca)" in message


def test_skip_invalid_detects_the_format_from_the_first_usable_record(tmp_path):
    path = write_rows(tmp_path / "mixed.jsonl", [{"question": "q"}, {"instruction": "q", "output": "a"}])
    report = load_records(path, skip_invalid=True)
    assert (report.format, unsourced(report.records)) == ("alpaca", [chat("q", "a")])
    assert [(p.source, p.reason, p.detail) for p in report.problems] == [
        (f"{path}:1", "cannot tell the format (no instruction, conversations, messages or text field)",
         "fields question")]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"formatting": "xml"}, "dataset data.jsonl: unknown formatting 'xml' — use one of auto, alpaca"),
    ({"formatting": "sharegpt", "tags": {"speaker_tag": "who"}}, "unknown tag 'speaker_tag' — known tags are role_tag"),
])
def test_bad_options_are_explained(tmp_path, kwargs, message):
    path = write_rows(tmp_path / "data.jsonl", [GOOD["sharegpt"]])
    with pytest.raises(LoraforgeError, match=message):
        load_records(path, **kwargs)


def test_declared_format_that_does_not_match_the_data_says_which_it_looks_like(tmp_path):
    path = write_rows(tmp_path / "chat.json", [{"conversations": [human("q"), gpt("a")]}])
    with pytest.raises(LoraforgeError, match='looks like sharegpt — set "formatting": "sharegpt"'):
        load_records(path, formatting="alpaca")


# ---------------------------------------------------------------- bad records

GOOD = {"alpaca": {"instruction": "q", "output": "a"}, "sharegpt": {"conversations": [human("q"), gpt("a")]},
        "openai": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        "text": {"text": "正文"}}
GOOD_RECORD = {"alpaca": chat("q", "a"), "sharegpt": chat("q", "a"), "openai": chat("q", "a"), "text": Text("正文")}

BAD_CASES = {
    "missing output": ("alpaca", {"instruction": "q"}, "missing field 'output'"),
    "null output": ("alpaca", {"instruction": "q", "output": None}, "missing field 'output'"),
    "missing instruction": ("alpaca", {"output": "a"}, "missing field 'instruction'"),
    "output is a list": ("alpaca", {"instruction": "q", "output": ["a"]}, "field 'output' must be a string, got list"),
    "input is a number": ("alpaca", {"instruction": "q", "input": 5, "output": "a"},
                          "field 'input' must be a string, got number"),
    "empty response": ("alpaca", {"instruction": "q", "output": " \n"}, "empty response"),
    "empty instruction": ("alpaca", {"instruction": "", "input": "", "output": "a"}, "empty instruction"),
    "history pair of one": ("alpaca", {"instruction": "q", "output": "a", "history": [["h"]]},
                            "history must be a list of [question, answer] pairs"),
    "history is a string": ("alpaca", {"instruction": "q", "output": "a", "history": "h"},
                            "history must be a list of [question, answer] pairs"),
    "not an object": ("alpaca", ["q", "a"], "record is not an object"),
    "roles out of order": ("sharegpt", {"conversations": [{"from": "system", "value": "s"}, human("q"), human("q")]},
                           "roles out of order: message 3 should be from 'gpt' or 'function_call', got 'human'"),
    "starts with gpt": ("sharegpt", {"conversations": [gpt("a"), human("q")]},
                        "roles out of order: message 1 should be from 'human', got 'gpt'"),
    "ends with user": ("sharegpt", {"conversations": [human("q"), gpt("a"), human("q2")]},
                       "conversation ends with a user message"),
    "unknown role": ("sharegpt", {"conversations": [human("q"), {"from": "bot", "value": "a"}]},
                     "unknown role 'bot' (expected human, gpt, function_call, observation or system)"),
    "call is not a call": ("sharegpt", {"conversations": [human("q"), {"from": "function_call", "value": "{}"},
                                                          {"from": "observation", "value": "{}"}, gpt("a")]},
                           "function_call is not a JSON tool call"),
    "call is not JSON": ("sharegpt", {"conversations": [human("q"), {"from": "function_call", "value": "get_weather(1)"},
                                                        {"from": "observation", "value": "{}"}, gpt("a")]},
                         "function_call is not a JSON tool call"),
    "observation without call": ("sharegpt", {"conversations": [human("q"), gpt("a"),
                                                                {"from": "observation", "value": "{}"}, gpt("b")]},
                                 "tool result (observation) with no tool call (function_call) before it"),
    "ends with observation": ("sharegpt", {"conversations": [
        human("q"), {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
        {"from": "observation", "value": "{}"}]}, "conversation ends with a tool result (no answer after it)"),
    "tools not JSON": ("sharegpt", {"conversations": [human("q"), gpt("a")], "tools": "[{name: f}]"},
                       "invalid tool definitions"),
    "empty gpt message": ("sharegpt", {"conversations": [human("q"), gpt("")]}, "empty response"),
    "message without value": ("sharegpt", {"conversations": [human("q"), {"from": "gpt"}]}, "message has no 'value'"),
    "conversations is a string": ("sharegpt", {"conversations": "q a"},
                                  "field 'conversations' must be a list, got string"),
    "empty conversation": ("sharegpt", {"conversations": []}, "empty conversation"),
    "openai out of order": ("openai", {"messages": [{"role": "user", "content": "q"},
                                                    {"role": "user", "content": "q"}]},
                            "roles out of order: message 2 should be from 'assistant' or 'function', got 'user'"),
    "openai tool message": ("openai", {"messages": [{"role": "user", "content": "q"},
                                                    {"role": "tool", "content": "{}"}]},
                            "roles out of order: message 2 should be from 'assistant' or 'function', got 'tool'"),
    "openai unknown role": ("openai", {"messages": [{"role": "user", "content": "q"},
                                                    {"role": "bot", "content": "a"}]},
                            "unknown role 'bot' (expected user, assistant, function, tool or system)"),
    "empty text": ("text", {"text": "  "}, "empty text"),
    "text is a number": ("text", {"text": 3}, "field 'text' must be a string, got number"),
}
LINE_OF_THIRD_RECORD = {".jsonl": 3, ".json": 4}


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize(("formatting", "bad", "reason"), BAD_CASES.values(), ids=BAD_CASES.keys())
def test_a_bad_record_is_an_error_naming_its_file_line_and_reason(tmp_path, suffix, formatting, bad, reason):
    path = write_rows(tmp_path / f"bad{suffix}", [GOOD[formatting], GOOD[formatting], bad, GOOD[formatting]])
    stage = "pt" if formatting == "text" else "sft"
    with pytest.raises(LoraforgeError) as error:
        load_records(path, formatting=formatting, stage=stage)
    message = str(error.value)
    assert f"bad{suffix}:{LINE_OF_THIRD_RECORD[suffix]}: {reason}" in message
    assert "1 invalid record in" in message
    assert message.endswith("fix these records, or set data.skip_invalid=true to drop them")


@pytest.mark.parametrize(("formatting", "bad", "reason"), BAD_CASES.values(), ids=BAD_CASES.keys())
def test_skip_invalid_keeps_the_good_records_and_reports_the_bad_one(tmp_path, formatting, bad, reason):
    path = write_rows(tmp_path / "bad.jsonl", [GOOD[formatting], GOOD[formatting], bad, GOOD[formatting]])
    stage = "pt" if formatting == "text" else "sft"
    report = load_records(path, formatting=formatting, stage=stage, skip_invalid=True)
    assert unsourced(report.records) == [GOOD_RECORD[formatting]] * 3
    assert [record.source for record in report.records] == [f"{path}:{n}" for n in (1, 2, 4)]
    assert [(p.source, p.reason) for p in report.problems] == [(f"{path}:3", reason)]
    assert summarize_problems(report.problems) == f"dropped 1 invalid record: 1 × {reason} (first at {path}:3)"


def test_broken_jsonl_line_is_a_problem_with_the_json_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "q", "output": "a"}\n\n{"instruction": "q" "output": "a"}\n'
                    '{"instruction": "q2", "output": "a2"}\n', encoding="utf-8")
    with pytest.raises(LoraforgeError, match=r"bad\.jsonl:3: not valid JSON \(Expecting ',' delimiter at column 21\)"):
        load_records(path)
    report = load_records(path, skip_invalid=True)
    assert unsourced(report.records) == [chat("q", "a"), chat("q2", "a2")]
    assert [str(p) for p in report.problems] == [f"{path}:3: not valid JSON (Expecting ',' delimiter at column 21)"]


def test_ragged_csv_row_is_a_problem(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("instruction,output\nq,a\nq,a,with a stray comma\nq3,a3\n", encoding="utf-8")
    with pytest.raises(LoraforgeError, match=r"bad\.csv:3: wrong number of columns \(3 values under 2 headers"):
        load_records(path)
    assert unsourced(load_records(path, skip_invalid=True).records) == [chat("q", "a"), chat("q3", "a3")]


@pytest.mark.parametrize(("text", "message"), [
    ('[\n{"instruction": "q", "output": "a"},\n{"instruction": "q" "output": "a"}\n]',
     r"bad\.json:3: not valid JSON \(Expecting ',' delimiter at column 21\)"),
    ('[\n{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": "a"}\n]',
     r"bad\.json:3: not valid JSON \(Expecting ',' delimiter or '\]' at column 1\)"),
    ('[\n{"instruction": "q", "output": "a"},\n]', r"bad\.json:3: not valid JSON \(Expecting value at column 1\)"),
    ('[{"instruction": "q", "output": "a"}', r"bad\.json:1: not valid JSON \(Expecting ',' delimiter or '\]'"),
    ('[{"instruction": "q", "output": "a"}]\n]', r"bad\.json:2: not valid JSON \(Extra data after the array"),
    ('{"data": [{"instruction": "q", "output": "a"}]}', r"bad\.json: the file is one JSON object \(keys 'data'\)"),
    ('"just a string"', r"bad\.json:1: not valid JSON \(Expecting '\[' to start an array"),
])
def test_broken_json_file_is_an_error_even_when_skipping_invalid_records(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LoraforgeError, match=message):
        load_records(path, skip_invalid=True)


def test_file_that_is_not_utf8_says_where_and_how_to_convert(tmp_path):
    path = tmp_path / "gbk.csv"
    path.write_bytes(b"instruction,output\n" + "你好,世界\n".encode("gbk"))
    with pytest.raises(LoraforgeError, match=r"gbk\.csv:2: not UTF-8 text .* save the file as UTF-8"):
        load_records(path)


@pytest.mark.parametrize(("name", "message"), [
    ("data.xlsx", r"data\.xlsx: unsupported file type '\.xlsx' — loraforge reads \.json, \.jsonl, \.csv"),
    ("missing.json", r"missing\.json: no such file"),
    ("folder", r"folder is a folder: give one of its files"),
])
def test_unreadable_paths(tmp_path, name, message):
    if name.endswith(".xlsx"):
        (tmp_path / name).write_bytes(b"PK")
    if name == "folder":
        (tmp_path / name).mkdir()
    with pytest.raises(LoraforgeError, match=message):
        load_records(tmp_path / name)


def test_many_problems_show_the_first_five_and_the_total(tmp_path):
    rows = [{"instruction": "q", "output": ""}] * 4 + [{"instruction": "q"}] * 3 + [GOOD["alpaca"]]
    path = write_rows(tmp_path / "many.jsonl", rows)
    with pytest.raises(LoraforgeError) as error:
        load_records(path)
    lines = str(error.value).split("\n")
    assert lines[0] == f"dataset many.jsonl: 7 invalid records in {path}"
    assert lines[1:6] == [f"  {path}:{n}: empty response" for n in range(1, 5)] + \
        [f"  {path}:5: missing field 'output'"]
    assert lines[6] == "  … and 2 more"


def test_summary_groups_by_reason_most_frequent_first():
    problems = [Problem("a.json:40", "missing field 'output'"), Problem("a.json:12", "empty response"),
                Problem("a.json:41", "missing field 'output'"), Problem("a.json:50", "empty response"),
                Problem("a.json:60", "empty response"), Problem("a.json:70", "not valid JSON", "Expecting value")]
    assert summarize_problems(problems) == (
        "dropped 6 invalid records: 3 × empty response (first at a.json:12), "
        "2 × missing field 'output' (first at a.json:40), 1 × not valid JSON (first at a.json:70)")


@pytest.mark.parametrize(("rows", "message"), [
    ([{"question": "q"}, {"answer": "a"}],
     r"all\.jsonl: no usable records \(2 skipped: 2 × cannot tell the format \(no instruction"),
    ([{"instruction": "q", "output": ""}, {"instruction": "q", "output": ""}, {"instruction": "q"}],
     r"all\.jsonl: no usable records \(3 skipped: 2 × empty response, 1 × missing field 'output'\)"),
    ([], r"all\.jsonl: no usable records \(the file has no rows\)"),
])
def test_dataset_with_nothing_usable_is_an_error_even_when_skipping(tmp_path, rows, message):
    path = write_rows(tmp_path / "all.jsonl", rows)
    with pytest.raises(LoraforgeError, match=message):
        load_records(path, skip_invalid=True)
