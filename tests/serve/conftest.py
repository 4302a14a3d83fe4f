"""Server fixtures: the learned run as a GGUF, a random LoRA adapter GGUF, and real
`loraforge serve` processes on 127.0.0.1 (free ports), shared by the session.

tests/serve is a package so this conftest does not take the module name `conftest`
from the root one (test modules elsewhere do `from conftest import …`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class LoraforgeProcess:
    """`python -m loraforge COMMAND …` in a subprocess on a free loopback port, ready when
    `ready_path` answers 200. Its output goes to a file: a pipe nobody reads fills up (64 KiB)
    and then blocks the server's event loop on its next log line."""

    def __init__(self, argv: list[str], ready_path: str, timeout: float = 120.0, stop_wait_s: float = 10.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stop_wait_s = stop_wait_s
        self.log = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        self.proc = subprocess.Popen([sys.executable, "-m", "loraforge", *argv, "--port", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loraforge {argv[0]} exited with {self.proc.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(self.url + ready_path, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"loraforge {argv[0]} did not answer {ready_path} within {timeout} s")
            time.sleep(0.1)

    def output(self) -> str:
        """What the process printed so far."""
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.stop_wait_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ServerProcess(LoraforgeProcess):
    """`python -m loraforge serve …`, ready when /health answers."""

    def __init__(self, *args: str, timeout: float = 120.0):
        # --threads 1: the same thread count as the direct `Llama` the answers are compared
        # with, and no thread changes from the governor while the suite shares the cores.
        super().__init__(["serve", *args, "--threads", "1"], "/health", timeout)


def http(url: str, body: bytes | dict | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
    """(status, JSON or text) of a GET, or of a POST when `body` is given; errors are returned, not raised."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw, kind = response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, raw, kind = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    text = raw.decode("utf-8")
    return status, json.loads(text) if "json" in kind else text


def metrics(url: str) -> dict[str, float]:
    """`/metrics` as {'name{labels}': value}."""
    _, text = http(url + "/metrics")
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


@pytest.fixture(scope="session")
def root_conftest(pytestconfig):
    """The root conftest module (its helpers), whatever module took the name `conftest` since."""
    path = str(ROOT / "tests" / "conftest.py")
    return next(p for p in pytestconfig.pluginmanager.get_plugins() if getattr(p, "__file__", None) == path)


@pytest.fixture(scope="session")
def serve_files(learned_run, pretrained_llama, root_conftest, tmp_path_factory) -> dict[str, Path]:
    """learned.gguf: base + the learned SFT adapter (Q8_0, chat template inside);
    random.gguf: a random LoRA on the same base, in llama.cpp's adapter format."""
    from loraforge.export.gguf_writer import export_gguf
    from loraforge.export.lora_gguf import export_lora_gguf

    config, result = learned_run
    out = tmp_path_factory.mktemp("serve")
    model = export_gguf(config.model.path, [result.output_dir], out / "learned.gguf", "q8_0")
    adapter = root_conftest.random_adapter(pretrained_llama, out / "random-lora", 11, r=8, lora_alpha=16)
    lora = export_lora_gguf(adapter, out / "random.gguf", pretrained_llama)
    return {"model": model, "adapter": lora}


@pytest.fixture(scope="session")
def server(serve_files):
    """Our server on the learned GGUF, with the random adapter served as model 'random'."""
    process = ServerProcess(str(serve_files["model"]), "--adapter", f"random={serve_files['adapter']}",
                            "--parallel", "4", "--ctx-size", "2048")
    yield process
    process.stop()


@pytest.fixture(scope="session")
def served_gguf(server) -> str:
    """The base URL of `loraforge serve` on the learned GGUF (model id 'learned'; chat page at /)."""
    return server.url


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def learned_questions(learned_run) -> list[tuple[str, str]]:
    """(question, trained answer) of the instructions the learned run knows by heart."""
    records = json.loads(Path(learned_run[0].data.datasets[0]).read_text(encoding="utf-8"))
    return [(r["instruction"] + (("\n" + r["input"]) if r.get("input") else ""), r["output"]) for r in records]


@pytest.fixture(scope="session")
def direct_llama(serve_files):
    """llama.cpp itself (llama-cpp-python's Llama) on the same file: the reference answers."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(serve_files["model"]), n_ctx=2048, n_threads=1, n_threads_batch=1,
                           verbose=False)
