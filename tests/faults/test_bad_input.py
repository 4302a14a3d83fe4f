"""Bad files and paths a user hands the CLI: exit 2, one `error:` naming the file and place,
no traceback, nothing written. Files that are merely in another unambiguous encoding (a UTF-8
BOM, UTF-16 with a BOM) are read."""

from __future__ import annotations

import codecs
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from loraforge.cli import main

RECORDS = [{"instruction": "用一句话介绍长城", "input": "", "output": "长城是中国古代的防御工程。"},
           {"instruction": "把这句话翻译成英文", "input": "你好", "output": "Hello"}]
CONFIG = """# 微调配置：中文注释
model:
  path: {model}
data:
  dir: {data}
  datasets: 演示数据
  template: chinese-alpaca
  cutoff_len: 512
train:
  output_dir: {out}
"""


def encode(text: str, encoding: str) -> bytes:
    boms = {"utf-8-bom": (codecs.BOM_UTF8, "utf-8"), "utf-16-bom": (codecs.BOM_UTF16_LE, "utf-16-le")}
    bom, codec = boms.get(encoding, (b"", encoding))
    return bom + text.encode(codec)


def project(tmp_path: Path, model: Path, *, config="utf-8", info="utf-8", data="utf-8",
            info_text: str | None = None) -> Path:
    """A config, a data folder with dataset_info.json and one data file, each in its own encoding."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "demo.json").write_bytes(encode(json.dumps(RECORDS, ensure_ascii=False, indent=1), data))
    info_text = info_text or json.dumps({"演示数据": {"file_name": "demo.json"}}, ensure_ascii=False, indent=2)
    (folder / "dataset_info.json").write_bytes(encode(info_text, info))
    path = tmp_path / "config.yaml"
    path.write_bytes(encode(CONFIG.format(model=model, data=folder, out=tmp_path / "run"), config))
    return path


def files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    # progress bars may come first; the message is the last line, and the only one
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: ") and err.count("error: ") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in message, (text, err)


# (case, project() encodings or dataset_info text, what the error must say)
NEW_NESTED = json.dumps({"演示数据": {"file_name": "demo.json"},
                         "dataset_info.json": {"identity": {"file_name": "identity.json"}}}, ensure_ascii=False)
BAD_FILES = [
    ("gbk config", {"config": "gbk"}, ["config.yaml:1: not UTF-8 text (byte 0xb5 at offset 4)", "save the file as UTF-8"]),
    ("utf-16 config without BOM", {"config": "utf-16-le"}, ["config.yaml:1: not UTF-8 text (a NUL byte at offset 1"]),
    ("gbk dataset_info.json", {"info": "gbk"}, ["dataset_info.json:2: not UTF-8 text (byte 0xd1 at offset 5)"]),
    ("gbk data file", {"data": "gbk"}, ["demo.json:3: not UTF-8 text", "save the file as UTF-8"]),
    ("utf-16 data without BOM", {"data": "utf-16-be"}, ["demo.json:1: not UTF-8 text (a NUL byte at offset 0"]),
    ("file_name not a string", {"info_text": '{"演示数据": {"file_name": ["demo.json"]}}'},
     ["dataset '演示数据' in ", "dataset_info.json: file_name must be a file or folder name as a string, "
      "got ['demo.json']", '"file_name": "data.json"']),
    ("file_name a number", {"info_text": '{"演示数据": {"file_name": 3}}'}, ["file_name must be", "got 3"]),
    ("entry not an object", {"info_text": '{"演示数据": "demo.json"}'},
     ["dataset_info.json: entry '演示数据' must be an object like {\"file_name\": \"data.json\"}"]),
    ("nested dataset_info.json", {"info_text": NEW_NESTED},
     ["dataset_info.json: entry 'dataset_info.json' holds dataset entries ('identity') one level too deep",
      "move them to the top level"]),
]


@pytest.mark.parametrize("case, change, expected", BAD_FILES, ids=[case[0] for case in BAD_FILES])
@pytest.mark.parametrize("command", ["data check", "train"])
def test_bad_files_are_one_error_naming_the_file(tmp_path, tiny_llama, capsys, case, change, expected, command):
    config = project(tmp_path, tiny_llama, **change)
    before = files(tmp_path)
    code, err = run_cli([*command.split(), str(config)], capsys)
    assert_refused(code, err, *expected)
    assert files(tmp_path) == before  # no run directory, no partial file


@pytest.mark.parametrize("where", ["config", "info", "data"])
@pytest.mark.parametrize("encoding", ["utf-8-bom", "utf-16-bom"])
def test_a_bom_says_what_the_file_is_and_it_is_read(tmp_path, tiny_llama, capsys, where, encoding):
    config = project(tmp_path, tiny_llama, **{where: encoding})
    assert main(["data", "check", str(config)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "演示数据" in out and "2 examples" in out and "长城是中国古代的防御工程。" in out


def test_a_gbk_prompts_file_names_its_line_before_any_model_loads(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes('{"instruction": "你好"}\n'.encode() + '{"instruction": "长城"}\n'.encode("gbk"))
    code, err = run_cli(["generate", str(tmp_path / "no-model"), "--input", str(prompts),
                         "-o", str(tmp_path / "out.jsonl")], capsys)
    assert_refused(code, err, "prompts.jsonl:2: not UTF-8 text (byte 0xb3 at offset 43)")
    assert not (tmp_path / "out.jsonl").exists()


# ---------------------------------------------------------------- missing model directories


@pytest.mark.parametrize("command", ["data check", "train"])
@pytest.mark.parametrize("override, key", [("model.path={missing}", "model.path"),
                                           ("model.path=models/llama-7b", "model.path"),  # looks like a hub id
                                           ("model.tokenizer={missing}", "model.tokenizer")])
def test_a_missing_model_directory_is_named(tmp_path, tiny_llama, capsys, command, override, key, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = project(tmp_path, tiny_llama)
    before = files(tmp_path)
    missing = tmp_path / "no-such-model"
    path = override.split("=", 1)[1].format(missing=missing)
    code, err = run_cli([*command.split(), str(config), override.format(missing=missing)], capsys)
    assert_refused(code, err, f"no such model directory: {path} ({key})")
    assert "Repo id" not in err and "huggingface" not in err.lower()
    assert files(tmp_path) == before


def test_load_base_model_names_a_missing_directory(tmp_path, tiny_llama):
    from loraforge.errors import LoraforgeError
    from loraforge.train.methods import load_base_model

    from conftest import sft_config

    config = sft_config(tiny_llama, tmp_path / "run", "model.path=org/model")
    with pytest.raises(LoraforgeError, match=r"^no such model directory: org/model \(model\.path\)"):
        load_base_model(config)


@pytest.mark.parametrize("encoding, override, expected", [
    ("gbk", "data.cutoff_len=128", "config.yaml:1: not UTF-8 text"),
    ("utf-8", "model.path=nope/model", "no such model directory: nope/model (model.path)")])
def test_the_reported_cases_as_a_process(tmp_path, tiny_llama, encoding, override, expected):
    """As a user runs them: stderr is the one message, no traceback."""
    config = project(tmp_path, tiny_llama, config=encoding)
    done = subprocess.run([sys.executable, "-m", "loraforge", "data", "check", str(config), override],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: ") and expected in done.stderr, done.stderr


# ---------------------------------------------------------------- flags and logs


def test_a_flag_llamacpp_cannot_honour_is_named_as_the_flag(tmp_path, tiny_llama, capsys):
    from loraforge.export.gguf_writer import export_gguf

    gguf = export_gguf(tiny_llama, [], tmp_path / "tiny.gguf")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "长城"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    code, err = run_cli(["generate", str(gguf), "--input", str(prompts), "-o", str(out), "--num-beams", "2",
                         "--max-new-tokens", "2"], capsys)
    assert_refused(code, err, "--num-beams 2: transformers-only", "--engine hf")
    assert "prompts.jsonl" not in err
    assert not out.exists() and not list(tmp_path.glob("out.jsonl*"))


def test_remaining_time_after_a_resume_counts_from_the_resumed_step(tmp_path, monkeypatch):
    from loraforge.train import callbacks

    clock = iter([0.0, 0.0, 10.0])  # __init__, on_train_begin, on_log
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    logger = callbacks.JsonlLogger(tmp_path / "trainer_log.jsonl")
    state = SimpleNamespace(global_step=90, max_steps=200, num_input_tokens_seen=0, epoch=1.0,
                            is_world_process_zero=True)
    logger.on_train_begin(None, state, None)
    state.global_step = 100  # 10 steps in 10 s since the resume from step 90: 100 steps left take 100 s
    logger.on_log(None, state, None, logs={"loss": 1.0})
    row = callbacks.read_log(tmp_path / "trainer_log.jsonl")[0]
    assert (row["elapsed_s"], row["remaining_s"]) == (10.0, 100.0)


@pytest.mark.parametrize("elapsed, start, step, total, remaining", [
    (10.0, 0, 10, 100, 90.0), (10.0, 90, 100, 200, 100.0), (5.0, 50, 50, 100, None), (3.0, 0, 5, 0, None),
    (4.0, 0, 120, 100, 0.0)])
def test_remaining_seconds(elapsed, start, step, total, remaining):
    from loraforge.train.callbacks import remaining_seconds

    assert remaining_seconds(elapsed, start, step, total) == remaining


def test_a_broken_utf16_file_names_the_byte(tmp_path):
    from loraforge.errors import LoraforgeError
    from loraforge.textfiles import read_text

    path = tmp_path / "config.yaml"
    path.write_bytes(codecs.BOM_UTF16_LE + "a: 1\nb: 长\n".encode("utf-16-le") + b"\x00")  # an odd last byte
    with pytest.raises(LoraforgeError, match=r"config\.yaml:3: not UTF-16 text \(byte 0x00 at offset 22\) — save"):
        read_text(path)


# ---------------------------------------------------------------- C-Eval / CMMLU CSVs

CEVAL = "id,question,A,B,C,D,answer\n0,长城位于哪个国家？,中国,日本,法国,美国,A\n1,一年有几个月？,十,十一,十二,十三,C\n"
BAD_CSVS = [
    ("gbk", encode(CEVAL, "gbk"), "art_val.csv:2: not UTF-8 text (byte 0xb3 at offset 29)"),
    ("utf-16 without BOM", encode(CEVAL, "utf-16-le"), "art_val.csv:1: not UTF-8 text (a NUL byte at offset 1"),
    ("no answer column", CEVAL.replace(",answer", ",key").encode(), "art_val.csv:1: no column 'answer' in the header"),
    ("answer not a letter", CEVAL.replace(",A\n", ",E\n").encode(), "art_val.csv:2: answer 'E' — it must be one of"),
    ("a field short", CEVAL.replace("十,十一,", "十,").encode(), "art_val.csv:3: 6 fields for 7 columns — no 'answer'"),
    ("NUL in UTF-8", CEVAL.replace("一年", "一\x00年").encode(), "art_val.csv:3: not UTF-8 text (a NUL byte"),
]


@pytest.mark.parametrize("case, data, expected", BAD_CSVS, ids=[c[0] for c in BAD_CSVS])
def test_a_bad_ceval_csv_is_named_before_any_model_loads(tmp_path, capsys, case, data, expected):
    (tmp_path / "ceval" / "val").mkdir(parents=True)
    (tmp_path / "ceval" / "val" / "art_val.csv").write_bytes(data)
    before = files(tmp_path)
    code, err = run_cli(["eval", "choice", str(tmp_path / "no-model"), "--data", str(tmp_path / "ceval"),
                         "-o", str(tmp_path / "out")], capsys)
    assert_refused(code, err, expected)
    assert files(tmp_path) == before


@pytest.mark.parametrize("encoding", ["utf-8-bom", "utf-16-bom"])
def test_a_ceval_csv_with_a_bom_is_read(tmp_path, encoding):
    from loraforge.eval.choice import read_questions

    path = tmp_path / "art_val.csv"
    path.write_bytes(encode(CEVAL, encoding))
    questions = read_questions(path, "art")
    assert [(q.question, q.options[2], q.answer) for q in questions] == [
        ("长城位于哪个国家？", "法国", "A"), ("一年有几个月？", "十二", "C")]
