"""`loraforge serve` refusals, and the server started inside a process (the demo's way)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT, http


def serve_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraforge", "serve", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


@pytest.mark.parametrize("adapter, words", [
    ("noequals", ["NAME=PATH"]),
    ("x=/nonexistent/a.gguf", ["no such file"]),
    ("learned=/nonexistent/a.gguf", ["base model's name"]),
])
def test_bad_adapters_are_refused(serve_files, adapter, words):
    done = serve_cli(str(serve_files["model"]), "--adapter", adapter)
    assert done.returncode == 2, done.stderr
    assert all(w in done.stderr for w in words), done.stderr


def test_a_peft_adapter_dir_is_refused_with_the_lora_gguf_command(serve_files):
    peft_dir = serve_files["adapter"].parent / "random-lora"
    if not peft_dir.exists():
        pytest.skip("the peft adapter dir is only there when the session built it")
    done = serve_cli(str(serve_files["model"]), "--adapter", f"r={peft_dir}")
    assert done.returncode == 2 and "loraforge export lora-gguf --adapter" in done.stderr, done.stderr


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a model")
    done = serve_cli(str(bogus))
    assert done.returncode == 2 and "not a GGUF file" in done.stderr


def test_in_process_server_and_a_missing_chat_page(serve_files, monkeypatch, tmp_path):
    from openai import OpenAI

    import loraforge.serve.app as app
    from loraforge.serve.server import ServeOptions, background_server

    monkeypatch.setattr(app, "WEB_PAGE", tmp_path / "web" / "index.html")
    with background_server(ServeOptions(serve_files["model"], name="m", port=0, parallel=1, threads=1)) as url:
        status, text = http(url + "/")
        assert status == 500 and "chat page is missing" in text and "index.html" in text
        reply = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).completions.create(
            model="m", prompt="春天", max_tokens=3, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 3
    with pytest.raises(OSError):  # stopped: nothing listens any more
        http(url + "/health")
