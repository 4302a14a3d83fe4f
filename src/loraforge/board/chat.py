"""The Chat tab's model: `loraforge serve MODEL` on a free loopback port, behind the board.

The board does not have a chat page of its own. It starts `serve` on the run (an adapter dir:
its base is loaded through transformers + peft) or the .gguf the page picked, and proxies
/chat/… to it, so the tab embeds serve's own page (streaming, stop, system prompt, sampling)
from the board's origin: the board's token guards it, and it works on a board reached from
another machine. The serve process listens on 127.0.0.1 only, with a random API key that only
the board sends. One model is loaded at a time; loading another stops the first, and stopping
the board stops it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from loraforge.board.jobs import error_line, log_tail, loraforge_command, stop_group

READY_TIMEOUT_S = 600  # a HF model loads torch and the weights first: slow on a busy machine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ChatServer:
    def __init__(self, workdir: Path):
        self.workdir = workdir  # serve runs here: a run's relative base path starts here
        self.key = secrets.token_urlsafe(24)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._shown: str | None = None
        self._state = "none"  # none / loading / ready / failed / stopped
        self._error: str | None = None
        self._port: int | None = None
        self._serial = 0  # one more per load: the page reloads its frame for a new one
        self._logs = Path(tempfile.mkdtemp(prefix="loraforge-board-chat-"))

    @property
    def url(self) -> str | None:
        with self._lock:
            return f"http://127.0.0.1:{self._port}" if self._state == "ready" else None

    def status(self) -> dict:
        with self._lock:
            log = self._logs / "serve.log"
            return {"model": self._shown, "state": self._state, "error": self._error, "serial": self._serial,
                    "log": log_tail(log, 12) if self._proc is not None else []}

    def load(self, model: Path, shown: str) -> None:
        """Stop the loaded model, if any, and start serving `model`; ready when /v1/models answers."""
        self.stop()
        port = _free_port()
        log_path = self._logs / "serve.log"
        with self._lock:
            with open(log_path, "w", encoding="utf-8") as log:
                log.write(f"$ loraforge serve {shown}\n")
                log.flush()
                self._proc = subprocess.Popen(
                    loraforge_command("serve", str(model), "--host", "127.0.0.1", "--port", str(port),
                                      "--api-key", self.key),
                    stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self._shown, self._port, self._state, self._error = shown, port, "loading", None
            self._serial += 1
            proc = self._proc
        threading.Thread(target=self._wait_ready, args=(proc, port, log_path), daemon=True).start()

    def _wait_ready(self, proc: subprocess.Popen, port: int, log_path: Path) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                         headers={"Authorization": f"Bearer {self.key}"})
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        self._set(proc, "ready", None)
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        if proc.poll() is None:
            self._set(proc, "failed", f"the model did not load in {READY_TIMEOUT_S} s")
            stop_group(proc)
            return
        self._set(proc, "failed", error_line(log_path) or f"exit code {proc.returncode}")

    def _set(self, proc: subprocess.Popen, state: str, error: str | None) -> None:
        with self._lock:
            if proc is self._proc:  # not a model that was replaced meanwhile
                self._state, self._error = state, error

    def stop(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                self._state, self._port = "stopped", None
        if proc is not None:
            stop_group(proc)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._logs, ignore_errors=True)
