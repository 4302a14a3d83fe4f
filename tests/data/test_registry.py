"""dataset_info.json (LLaMA-Factory's layout) and file paths → loaded datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.data.records import Conversation, Text, Turn
from loraforge.data.registry import DatasetSpec, load_datasets, read_dataset_info, resolve_datasets
from loraforge.errors import LoraforgeError

from conftest import DATA_DIR

# Entries copied in shape from LLaMA-Factory's data/dataset_info.json.
DATASET_INFO = {
    "alpaca_zh_demo": {"file_name": "alpaca_zh_demo.json"},
    "glaive_like": {"file_name": "sharegpt.json", "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "system": "system"}},
    "openai_style": {"file_name": "openai.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                     "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                              "assistant_tag": "assistant", "system_tag": "system"}},
    "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}},
    "parts": {"file_name": "parts"},
    "wiki_demo": {"file_name": "wiki_demo.txt", "columns": {"prompt": "text"}},
    "glaive_toolcall_zh_demo": {"file_name": "glaive.json", "formatting": "sharegpt",
                                "columns": {"messages": "conversations", "tools": "tools"}},
    "mllm_demo": {"file_name": "mllm_demo.json", "formatting": "sharegpt",
                  "columns": {"messages": "messages", "images": "images"},
                  "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                           "assistant_tag": "assistant"}},
    "kto_en_demo": {"file_name": "kto_en_demo.json", "formatting": "sharegpt",
                    "columns": {"messages": "messages", "kto_tag": "label"}},
    "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en", "ms_hub_url": "llamafactory/alpaca_en"},
    "dpo_zh_demo": {"file_name": "dpo_zh_demo.json", "ranking": True, "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
}


def write(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text if path.suffix == ".jsonl" else json.dumps(rows, ensure_ascii=False), encoding="utf-8")


@pytest.fixture
def data_dir(tmp_path) -> Path:
    (tmp_path / "dataset_info.json").write_text(json.dumps(DATASET_INFO, indent=2), encoding="utf-8")
    write(tmp_path / "alpaca_zh_demo.json", [{"instruction": "识别并解释给定列表中的两个科学理论", "input": "细胞理论",
                                              "output": "细胞理论是生物科学的一个理论"}])
    write(tmp_path / "sharegpt.json", [{"conversations": [{"from": "human", "value": "你好"},
                                                          {"from": "gpt", "value": "您好"}], "system": "礼貌"}])
    write(tmp_path / "openai.jsonl", [{"messages": [{"role": "system", "content": "s"},
                                                    {"role": "user", "content": "q"},
                                                    {"role": "assistant", "content": "a"}]}])
    write(tmp_path / "c4_demo.jsonl", [{"text": "第一篇"}, {"text": "第二篇"}])
    (tmp_path / "wiki_demo.txt").write_text("维基百科\n\n自由的百科全书\n", encoding="utf-8")
    write(tmp_path / "glaive.json", [
        {"conversations": [{"from": "human", "value": "天气"}, {"from": "function_call", "value": "{}"},
                           {"from": "observation", "value": "{}"}, {"from": "gpt", "value": "晴"}],
         "tools": "[]"},
        {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "您好"}], "tools": "[]"}])
    (tmp_path / "parts").mkdir()
    write(tmp_path / "parts" / "2.jsonl", [{"instruction": "q2", "output": "a2"}])
    write(tmp_path / "parts" / "1.jsonl", [{"instruction": "q1", "output": "a1"}])
    return tmp_path


def conversation(*texts: str, system: str | None = None) -> tuple:
    return tuple(Turn(("user", "assistant")[i % 2], t) for i, t in enumerate(texts)), system


def test_read_dataset_info_lists_the_local_datasets(data_dir):
    specs = read_dataset_info(data_dir)
    # hub-only and multimodal entries are not loadable here, as LLaMA-Factory's own file has;
    # preference entries (kto_tag, ranking) are, for stages kto / dpo / rm
    assert list(specs) == ["alpaca_zh_demo", "glaive_like", "openai_style", "c4_demo", "parts", "wiki_demo",
                           "glaive_toolcall_zh_demo", "kto_en_demo", "dpo_zh_demo"]
    # LLaMA-Factory's DatasetAttr defaults for an entry without columns: instruction/input/output only
    assert specs["alpaca_zh_demo"] == DatasetSpec("alpaca_zh_demo", data_dir / "alpaca_zh_demo.json", "alpaca", columns={
        "prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None,
        "tools": None})
    # LLaMA-Factory: roles an entry's "columns" leave out are absent, so c4_demo has no response
    assert specs["c4_demo"].columns == {"prompt": "text", "query": None, "response": None, "history": None,
                                        "system": None, "tools": None}


SFT_CASES = {
    "alpaca_zh_demo": ("alpaca", [conversation("识别并解释给定列表中的两个科学理论\n细胞理论", "细胞理论是生物科学的一个理论")]),
    "glaive_like": ("sharegpt", [conversation("你好", "您好", system="礼貌")]),
    "openai_style": ("sharegpt", [conversation("q", "a", system="s")]),
    "parts": ("alpaca", [conversation("q1", "a1"), conversation("q2", "a2")]),
}


@pytest.mark.parametrize(("name", "fmt", "expected"), [(k, *v) for k, v in SFT_CASES.items()], ids=SFT_CASES.keys())
def test_llama_factory_entries_load_unchanged(data_dir, name, fmt, expected):
    [report] = load_datasets(resolve_datasets(data_dir, [name]), stage="sft", skip_invalid=False)
    assert (report.name, report.format) == (name, fmt)
    assert all(isinstance(r, Conversation) for r in report.records)
    assert [(r.turns, r.system) for r in report.records] == expected


def test_pretraining_entry_loads_as_text_and_refuses_sft(data_dir):
    [report] = load_datasets(resolve_datasets(data_dir, ["c4_demo"]), stage="pt", skip_invalid=False)
    assert report.records == [Text("第一篇", f"{data_dir}/c4_demo.jsonl:1"), Text("第二篇", f"{data_dir}/c4_demo.jsonl:2")]
    with pytest.raises(LoraforgeError, match="dataset c4_demo is plain text: use stage: pt"):
        load_datasets(resolve_datasets(data_dir, ["c4_demo"]), stage="sft", skip_invalid=False)


def test_txt_entry_reads_lines_as_text(data_dir):
    [report] = load_datasets(resolve_datasets(data_dir, ["wiki_demo"]), stage="pt", skip_invalid=False)
    assert [(r.text, r.source) for r in report.records] == [
        ("维基百科", f"{data_dir}/wiki_demo.txt:1"), ("自由的百科全书", f"{data_dir}/wiki_demo.txt:3")]


def test_tool_call_records_are_dropped_with_a_reason(data_dir):
    specs = resolve_datasets(data_dir, ["glaive_toolcall_zh_demo"])
    # the first record's function_call "{}" names no function: refused with that reason, the rest kept
    with pytest.raises(LoraforgeError, match=r"glaive\.json:1: function_call is not a JSON tool call"):
        load_datasets(specs, stage="sft", skip_invalid=False)
    [report] = load_datasets(specs, stage="sft", skip_invalid=True)
    assert [(r.turns, r.system) for r in report.records] == [conversation("你好", "您好")]


def test_several_names_give_one_report_each_in_order(data_dir):
    reports = load_datasets(resolve_datasets(data_dir, ["glaive_like", "alpaca_zh_demo"]), stage="sft",
                            skip_invalid=False)
    assert [(r.name, len(r.records)) for r in reports] == [("glaive_like", 1), ("alpaca_zh_demo", 1)]


@pytest.mark.parametrize(("name", "message"), [
    ("alpaca_zh_dem", r"unknown dataset 'alpaca_zh_dem': .* names alpaca_zh_demo, glaive_like, openai_style, "
                      r"c4_demo, parts, wiki_demo, .*, dpo_zh_demo — did you mean 'alpaca_zh_demo'\?"),
    ("alpaca_en", r"dataset 'alpaca_en' in .*dataset_info\.json has hf_hub_url 'llamafactory/alpaca_en': "
                  r"loraforge does not download datasets — download it"),
    ("mllm_demo", r"dataset 'mllm_demo' .*: image data \(column 'images'\) is not supported yet"),
])
def test_names_loraforge_cannot_load_are_explained(data_dir, name, message):
    with pytest.raises(LoraforgeError, match=message):
        resolve_datasets(data_dir, [name])


def test_a_folder_entry_reads_its_data_files_in_name_order(data_dir):
    (data_dir / "parts" / "notes.md").write_text("not data")
    [report] = load_datasets(resolve_datasets(data_dir, ["parts"]), stage="sft", skip_invalid=False)
    assert [r.source for r in report.records] == [f"{data_dir}/parts/1.jsonl:1", f"{data_dir}/parts/2.jsonl:1"]


@pytest.mark.parametrize(("entry", "message"), [
    ({"file_name": "a.json", "columns": {"prompt": "instruction", "images": "images"}},
     r"image data \(column 'images'\) is not supported"),
    ({"file_name": "a.json", "columns": {"prompt": "instruction", "chosen": "c"}}, "preference data"),
    ({"file_name": "a.json", "columns": {"prompt": "instruction", "respone": "output"}},
     "unknown column role 'respone' — known roles are prompt, query, response"),
    ({"file_name": "nope.json"}, r"dataset 'broken': .*nope\.json does not exist — fix file_name"),
    ({"file_name": "a.json", "formatting": "xml"}, r"unknown formatting 'xml'"),
    ({"file_name": "empty_dir"}, r"empty_dir: the folder has no data files"),
])
def test_broken_entries_are_explained(tmp_path, entry, message):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "dataset_info.json").write_text(json.dumps({"broken": entry}), encoding="utf-8")
    with pytest.raises(LoraforgeError, match=message):
        resolve_datasets(tmp_path, ["broken"])


def test_bad_dataset_info_json_names_line_and_column(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{\n  "a": {"file_name": "a.json"}\n  "b": {}\n}', encoding="utf-8")
    with pytest.raises(LoraforgeError, match=r"dataset_info\.json:3: not valid JSON \(Expecting ',' delimiter at column 3\)"):
        resolve_datasets(tmp_path, ["a"])


@pytest.mark.parametrize("how", ["absolute", "relative to cwd", "relative to data_dir", "no data_dir"])
def test_file_paths_work_as_dataset_names(tmp_path, monkeypatch, how):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    file = data_dir / "mine.jsonl"
    write(file, [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    monkeypatch.chdir(tmp_path)
    name, given_dir = {"absolute": (str(file), data_dir), "relative to cwd": ("data/mine.jsonl", data_dir),
                       "relative to data_dir": ("mine.jsonl", data_dir), "no data_dir": ("data/mine.jsonl", None)}[how]
    [spec] = resolve_datasets(given_dir, [name])
    assert (spec.name, spec.path.resolve(), spec.formatting) == (name, file, "auto")
    [report] = load_datasets([spec], stage="sft", skip_invalid=False)
    assert (report.format, [(r.turns, r.system) for r in report.records]) == ("sharegpt", [conversation("q", "a")])


@pytest.mark.parametrize(("with_dir", "message"), [
    (True, r"dataset 'alpaca' is not a file, and .*dataset_info\.json does not exist"),
    (False, r"dataset 'alpaca' is not a file \(looked in .*\) — give a file path, or set data\.dir"),
])
def test_unknown_name_without_dataset_info_names_what_was_expected(tmp_path, with_dir, message):
    with pytest.raises(LoraforgeError, match=message):
        resolve_datasets(tmp_path if with_dir else None, ["alpaca"])


def test_read_dataset_info_without_the_file_names_the_expected_path(tmp_path):
    with pytest.raises(LoraforgeError, match=rf"{tmp_path}/dataset_info\.json not found"):
        read_dataset_info(tmp_path)


def test_no_names_is_an_error():
    with pytest.raises(LoraforgeError, match="no datasets given"):
        resolve_datasets(None, [])


def test_skip_invalid_reaches_every_dataset(data_dir):
    write(data_dir / "alpaca_zh_demo.json", [{"instruction": "q", "output": ""}, {"instruction": "q", "output": "a"}])
    with pytest.raises(LoraforgeError, match=r"alpaca_zh_demo\.json:1: empty response"):
        load_datasets(resolve_datasets(data_dir, ["alpaca_zh_demo"]), stage="sft", skip_invalid=False)
    [report] = load_datasets(resolve_datasets(data_dir, ["alpaca_zh_demo"]), stage="sft", skip_invalid=True)
    assert [(r.turns, r.system) for r in report.records] == [conversation("q", "a")]
    assert [p.reason for p in report.problems] == ["empty response"]


def test_an_entry_without_columns_reads_what_llama_factory_reads(tmp_path):
    """LLaMA-Factory reads `history` and `system` only when the entry maps them: the bundled
    alpaca_zh_demo (an entry with file_name alone) trains its 20 history/system records as
    single turns there, and so here, with a note; named by path, the fields are read."""
    records = json.loads((DATA_DIR / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    with_fields = sum(bool(r.get("history") or r.get("system")) for r in records)
    assert with_fields == 20
    (tmp_path / "demo.json").write_bytes((DATA_DIR / "alpaca_zh_demo.json").read_bytes())
    for name, columns in (("plain", None), ("mapped", {"prompt": "instruction", "query": "input", "response": "output",
                                                       "history": "history", "system": "system"})):
        entry = {"file_name": "demo.json", **({"columns": columns} if columns else {})}
        (tmp_path / "dataset_info.json").write_text(json.dumps({name: entry}), encoding="utf-8")
        [report] = load_datasets(resolve_datasets(tmp_path, [name]), stage="sft", skip_invalid=False)
        multi = sum(len(r.turns) > 2 or bool(r.system) for r in report.records)
        if columns is None:
            assert multi == 0
            note = [n for n in report.notes if "do not map" in n]
            assert note and "'history' (" in note[0] and "'system' (" in note[0], report.notes
            assert '"history": "history"' in note[0]
        else:
            assert multi == with_fields and not any("do not map" in n for n in report.notes)
    [by_path] = load_datasets(resolve_datasets(None, [str(tmp_path / "demo.json")]), stage="sft", skip_invalid=False)
    assert sum(len(r.turns) > 2 or bool(r.system) for r in by_path.records) == with_fields
