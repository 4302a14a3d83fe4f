"""`loraforge generate`: batch generation over a jsonl file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loraforge.errors import LoraforgeError
from loraforge.infer.engine import GenerationConfig
from loraforge.infer.generate import generate_file, read_requests


def requests_file(path, questions):
    (q0, a0), (q1, a1), (q2, _), (q3, _) = questions[:4]
    lines = [{"instruction": q0, "output": a0},
             {"messages": [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}]},
             {"conversations": [{"from": "human", "value": q2}]},
             {"prompt": q3}]
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines) + "\n", encoding="utf-8")
    return path


def run(*args):
    return subprocess.run([sys.executable, "-m", "loraforge", "generate", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_generate_command_over_every_request_shape(learned_gguf_f16, learned_questions, tmp_path):
    prompts = requests_file(tmp_path / "prompts.jsonl", learned_questions)
    out = tmp_path / "out" / "predictions.jsonl"
    done = run(learned_gguf_f16, "--input", prompts, "-o", out, "--temperature", "0", "--max-new-tokens", "32")
    assert done.returncode == 0, done.stderr
    assert "generate: 100%" in done.stderr and "prompt/s" in done.stderr  # tqdm: rate and ETA
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4
    assert [r["prediction"] for r in rows[:3]] == [a for _, a in learned_questions[:3]]
    assert rows[0]["output"] == learned_questions[0][1]  # the input record is kept beside the prediction
    assert rows[3]["prompt"] == learned_questions[3][0] and rows[3]["finish_reason"] in ("stop", "length")
    saved = json.loads((tmp_path / "out" / "predictions.jsonl.generation.json").read_text(encoding="utf-8"))
    assert saved["generation"]["temperature"] == 0 and saved["generation"]["max_new_tokens"] == 32
    assert (saved["engine"], saved["model"], saved["requests"]) == ("llamacpp", "learned-f16", 4)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["predictions.jsonl", "predictions.jsonl.generation.json"]


def test_both_engines_predict_the_same_greedy_file(hf_engine, gguf_engine, learned_questions, tmp_path):
    prompts = requests_file(tmp_path / "prompts.jsonl", learned_questions)
    config = GenerationConfig(temperature=0, max_new_tokens=32)
    hf = generate_file(hf_engine, prompts, tmp_path / "hf.jsonl", config)
    cpp = generate_file(gguf_engine, prompts, tmp_path / "cpp.jsonl", config)
    assert hf.output.read_text(encoding="utf-8") == cpp.output.read_text(encoding="utf-8")


def test_a_bad_line_is_an_error_with_file_and_line_and_nothing_is_written(learned_gguf_f16, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "你好"}\n{"instruction": "x", "output": \n', encoding="utf-8")
    done = run(learned_gguf_f16, "--input", prompts, "-o", tmp_path / "p.jsonl")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"error: {prompts}:2: not valid JSON" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


@pytest.mark.parametrize("bad, message", [
    ('{"question": "x"}', "no 'instruction', 'messages', 'conversations' or 'prompt' field (found: question)"),
    ('{"messages": [{"role": "user", "text": "x"}]}', "message 1 needs 'role' (one of system, user, assistant) and 'content'"),
    ('{"conversations": [{"from": "gpt", "value": "x"}]}', "the conversation has no user message to answer"),
    ('["x"]', "expected a JSON object, got list"),
    ('{"instruction": ""}', "'instruction' must be a non-empty string (and 'input' a string)"),
])
def test_each_kind_of_bad_request_names_its_line(tmp_path, bad, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "你好"}\n\n' + bad + "\n", encoding="utf-8")
    with pytest.raises(LoraforgeError) as error:
        read_requests(prompts)
    assert str(error.value) == f"{prompts}:3: {message}"


def test_a_request_too_long_for_the_context_names_its_line(gguf_engine, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "短"}\n' + json.dumps({"prompt": "长" * 2000}, ensure_ascii=False) + "\n",
                       encoding="utf-8")
    with pytest.raises(LoraforgeError, match=r"prompts.jsonl:2: the prompt has \d+ tokens"):
        generate_file(gguf_engine, prompts, tmp_path / "p.jsonl", GenerationConfig(max_new_tokens=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]
