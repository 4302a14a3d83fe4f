"""`loraforge chat` for real: under a pseudo-terminal (pexpect), and with piped stdin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

PROMPT = "你>"  # prompt_toolkit draws the space after it as a cursor move
# prompt_toolkit turns bracketed paste off when a line is sent and on when the next prompt
# starts: what a command printed lies between the two (the prompt itself is redrawn on every key)
SENT, NEXT_PROMPT = "\x1b[?2004l", "\x1b[?2004h"
BACKSPACE, LEFT = "\x7f", "\x1b[D"


def spawn_chat(model, *flags: str, locale: str = "C.UTF-8") -> pexpect.spawn:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_")}
    env.update(TERM="xterm-256color", LANG=locale, LC_ALL=locale,
               PROMPT_TOOLKIT_NO_CPR="1")  # no terminal answers cursor-position requests here
    child = pexpect.spawn(sys.executable, ["-m", "loraforge", "chat", str(model), "--temperature", "0", *flags],
                          env=env, encoding="utf-8", timeout=30, dimensions=(40, 160))
    child.expect_exact(PROMPT)
    return child


def send_line(child: pexpect.spawn, text: str) -> str:
    """Send a line; return what the chat printed until the next prompt."""
    child.send(text)
    child.send("\r")
    child.expect_exact(SENT)
    child.expect_exact(NEXT_PROMPT)
    return child.before


@pytest.fixture(scope="module")
def one_line(learned_questions):
    """Learned questions without a newline (Enter sends the line)."""
    return [(q, a) for q, a in learned_questions if "\n" not in q]


@pytest.fixture(params=["C.UTF-8", "C"])
def chat(request, learned_gguf_f16):
    """A chat in a UTF-8 terminal, and in one whose locale says ASCII (the bytes are UTF-8 anyway)."""
    child = spawn_chat(learned_gguf_f16, locale=request.param)
    yield child
    child.close(force=True)


def test_typing_and_editing_chinese_then_streamed_answer(chat, one_line):
    question, answer = one_line[0]
    # type the question with two wrong characters in the middle, walk back over the rest of
    # the line (wide characters), delete the two, then send: the model must get the exact question
    cut = 3
    chat.send(question[:cut] + "错误")
    chat.send(question[cut:])
    chat.send(LEFT * len(question[cut:]))
    chat.send(BACKSPACE * 2)
    printed = send_line(chat, "")
    assert printed.split("\r\n")[0] == answer  # streamed straight to the terminal, then a newline
    assert send_line(chat, "/history") == f"[user] {question}\r\n[assistant] {answer}\r\n"
    # backspace over a whole typed Chinese word and type another: nothing of the first survives
    # (after /clear: the model learned single-turn answers)
    assert send_line(chat, "/clear") == "(history cleared)\r\n"
    second, second_answer = one_line[1]
    chat.send("胡说八道")
    chat.send(BACKSPACE * 4)
    assert send_line(chat, second) == f"{second_answer}\r\n"
    assert send_line(chat, "/history") == f"[user] {second}\r\n[assistant] {second_answer}\r\n"


def test_system_clear_and_exit(chat, one_line):
    question, _ = one_line[2]
    assert send_line(chat, "/system 你是一个诗人。") == "(system prompt: '你是一个诗人。'; history cleared)\r\n"
    send_line(chat, question)
    assert send_line(chat, "/history").startswith(f"[system] 你是一个诗人。\r\n[user] {question}\r\n[assistant] ")
    assert send_line(chat, "/clear") == "(history cleared)\r\n"
    assert send_line(chat, "/history") == "[system] 你是一个诗人。\r\n"
    assert send_line(chat, "/system") == "(system prompt: the model's default; history cleared)\r\n"
    assert send_line(chat, "/history") == ""
    chat.send("胡说八道\x03")  # Ctrl-C drops the line being typed, as a shell does, and the chat goes on
    chat.expect_exact(NEXT_PROMPT)
    assert send_line(chat, "/history") == ""
    chat.send("/exit\r")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_history_is_trimmed_oldest_rounds_first(learned_gguf_f16, one_line):
    # no system prompt, a 160-token window less 24 for the answer: two short rounds fit, three do not
    child = spawn_chat(learned_gguf_f16, "--n-ctx", "160", "--max-new-tokens", "24", "--system", "")
    try:
        asked = sorted((q for q, _ in one_line), key=len)[:5]
        output = "".join(send_line(child, question) for question in asked)
        history = send_line(child, "/history")
    finally:
        child.close(force=True)
    assert "(dropped the 1 oldest round to fit the context window)" in output and "error" not in output
    kept = [q for q in asked if f"[user] {q}\r\n" in history]
    assert 2 <= len(kept) < len(asked) and kept == asked[-len(kept):]  # the newest survive, the oldest go


@pytest.mark.parametrize("model", ["learned_gguf_f16", "learned_run_dir"])
def test_piped_stdin_reads_plain_lines(request, model, one_line):
    """Either reference: the GGUF (llama.cpp) or the adapter run dir (its base + the adapter, transformers)."""
    question, answer = one_line[0]
    done = subprocess.run([sys.executable, "-m", "loraforge", "chat", str(request.getfixturevalue(model)),
                           "--temperature", "0"],
                          input=f"{question}\n/history\n/exit\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{answer}\n" in done.stdout and f"[user] {question}\n" in done.stdout
    assert done.stdout.startswith(f"{Path(request.getfixturevalue(model)).stem} (")


def test_missing_model_is_an_error_not_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "loraforge", "chat", str(tmp_path / "nope.gguf")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "error: no such GGUF file" in done.stderr and "Traceback" not in done.stderr
