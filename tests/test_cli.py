"""The `loraforge` command as a user runs it: exit codes, messages, output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import DATA_DIR, EXAMPLES


def loraforge(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraforge", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_version_and_env():
    from loraforge import __version__

    assert loraforge("version").stdout.strip() == __version__
    env = loraforge("env").stdout
    for name in ("torch", "transformers", "peft", "llama-cpp-python", "cuda"):
        assert name in env


def test_unknown_key_exits_2_with_the_suggestion_and_no_traceback():
    done = loraforge("train", str(EXAMPLES / "configs" / "tiny-sft.yaml"), "train.learnig_rate=1e-4")
    assert done.returncode == 2
    assert "error: override 'train.learnig_rate=1e-4': unknown config key" in done.stderr
    assert "did you mean 'train.lr'" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_data_exits_2_naming_file_and_line(tmp_path, tiny_llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "你好", "output": "你好！"}, ensure_ascii=False) + "\n"
                   + '{"instruction": "x", "output": \n')
    done = loraforge("data", "check", str(EXAMPLES / "configs" / "tiny-sft.yaml"), f"model.path={tiny_llama}",
                     f"data.datasets={bad}")
    assert done.returncode == 2
    assert "bad.jsonl:2" in done.stderr and "Traceback" not in done.stderr


def test_data_check_shows_formats_learned_spans_and_lengths(tiny_llama):
    done = loraforge("data", "check", str(EXAMPLES / "configs" / "tiny-sft.yaml"), f"model.path={tiny_llama}",
                     f"data.dir={DATA_DIR}", "data.cutoff_len=200")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in ("alpaca_zh_demo", "alpaca", "sharegpt_zh_demo", "sharegpt", "openai_zh_demo",
                     "truncated by cutoff_len=200", "token lengths before truncation", "p50", "p99", "### Response: ⟦"):
        assert expected in out, expected
    assert "</s>⟧" in out  # the end token is learned with the answer


@pytest.mark.parametrize("argv", [["train"], ["data"], []])
def test_usage_errors_are_argparse_errors(argv):
    assert loraforge(*argv).returncode == 2
