"""Training jobs started from the board: `loraforge train RUN/board.yaml` as a subprocess.

A job's state lives in its run directory, so a page reload or a restart of the board reads it
back. `board.json` holds the command and the pid, `board.log` what the command printed, and
`board-exit.json` how it ended (exit code, stopped or not, the `error:` line). One job runs
at a time. A page reload does not touch it; stopping the board stops it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from loraforge.outputs import write_text
from loraforge.train.run import latest_checkpoint

JOB_FILE, EXIT_FILE, LOG_FILE, YAML_FILE = "board.json", "board-exit.json", "board.log", "board.yaml"
STOP_WAIT_S = 20


class Busy(Exception):
    """A second Start while a job runs (HTTP 409)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a reused pid is another program; a process that is exiting has an empty command line
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return not cmdline or b"loraforge" in cmdline


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def log_rows(run_dir: Path, offset: int = 0) -> list[dict]:
    """trainer_log.jsonl's complete lines from byte `offset` (a line being written is left for later)."""
    return read_lines(run_dir / "trainer_log.jsonl", offset)[0]


def read_new(path: Path, offset: int) -> tuple[list[bytes], int]:
    """The complete lines of `path` after byte `offset` (a line being written is left for later),
    and the offset after them: a file followed as it grows, without reading it again."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    return data[:end].splitlines(), offset + end


def read_lines(path: Path, offset: int) -> tuple[list[dict], int]:
    """The JSON lines of `path` after byte `offset`, as read_new reads them."""
    lines, offset = read_new(path, offset)
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows, offset


def run_state(run_dir: Path, active: bool = False) -> dict:
    """running / finished / stopped / failed, with what a page shows about it. `active`: this
    board's job is running there (until its exit file is written)."""
    job, ended = _read_json(run_dir / JOB_FILE), _read_json(run_dir / EXIT_FILE)
    rows = log_rows(run_dir)
    steps = [r["step"] for r in rows if "step" in r]
    last = latest_checkpoint(run_dir)  # complete checkpoints only: what Resume would load
    state = {"step": steps[-1] if steps else 0, "remaining_s": rows[-1].get("remaining_s") if rows else None,
             "last_checkpoint": last.name if last else None, "board": job is not None,
             "loss_png": (run_dir / "loss.png").is_file()}
    saved = any((run_dir / name).is_file() for name in ("adapter_model.safetensors", "model.safetensors"))
    if active:
        state["state"] = "running"
    elif ended is not None:
        if ended.get("stopped"):
            state["state"] = "stopped"
        else:
            state["state"] = "finished" if ended.get("returncode") == 0 else "failed"
        state["error"] = ended.get("error")
    elif job is not None and _alive(job.get("pid", -1)):
        state["state"] = "running"
    elif job is not None:
        state["state"] = "stopped"  # the board (and so the job) ended without writing the exit file
    else:
        state["state"] = "finished" if saved else "stopped"
    if state["state"] == "stopped":
        state["note"] = (f"stopped at step {state['step']}; the last checkpoint is {state['last_checkpoint']} — "
                         "Resume continues from it") if last else \
            f"stopped at step {state['step']} before its first checkpoint — Resume starts it again"
    return state


def _error_line(log: Path) -> str | None:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1]
    tail = [line for line in lines if line.strip()][-1:]
    return tail[0] if tail else None


class Jobs:
    """The one training job this board runs, if any."""

    def __init__(self, workdir: Path):
        self.workdir = workdir  # where jobs run: a config's relative paths start here
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._run_dir: Path | None = None
        self._waiter: threading.Thread | None = None
        self._stopping = False

    def running(self) -> Path | None:
        """The run directory of the job, from its start until its exit file is written."""
        with self._lock:
            return self._run_dir if self._waiter is not None and self._waiter.is_alive() else None

    def start(self, run_dir: Path, yaml_text: str, overrides: list[str] = ()) -> list[str]:
        """Write RUN/board.yaml and start `loraforge train` on it; the command, as run."""
        with self._lock:
            if self._waiter is not None and self._waiter.is_alive():
                raise Busy(f"a training job is already running: {self._run_dir} — stop it first "
                           "(one job at a time)")
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / EXIT_FILE).unlink(missing_ok=True)
            write_text(run_dir / YAML_FILE, yaml_text)
            command = [sys.executable, "-m", "loraforge", "train", str(run_dir / YAML_FILE), *overrides]
            log = open(run_dir / LOG_FILE, "a", encoding="utf-8")
            log.write(f"$ loraforge train {run_dir / YAML_FILE} {' '.join(overrides)}\n".rstrip() + "\n")
            log.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            # its own session: a page reload never reaches it, and Stop signals the whole group
            self._proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True, cwd=self.workdir)
            log.close()
            self._run_dir, self._stopping = run_dir, False
            write_text(run_dir / JOB_FILE, json.dumps({"command": command, "pid": self._proc.pid,
                                                              "started": time.time()}))
            self._waiter = threading.Thread(target=self._wait, args=(self._proc, run_dir), daemon=True)
            self._waiter.start()
            return ["loraforge", *command[3:]]

    def _wait(self, proc: subprocess.Popen, run_dir: Path) -> None:
        code = proc.wait()
        with self._lock:
            stopped = self._stopping and proc is self._proc
        write_text(run_dir / EXIT_FILE, json.dumps({
            "returncode": code, "stopped": stopped, "ended": time.time(),
            "error": None if code == 0 or stopped else _error_line(run_dir / LOG_FILE)}))

    def stop(self, run_dir: Path | None = None) -> bool:
        """Stop the running job (SIGTERM, then SIGKILL); False when nothing (or another run) runs."""
        with self._lock:
            proc, waiter = self._proc, self._waiter
            if waiter is None or not waiter.is_alive() or (run_dir is not None and run_dir != self._run_dir):
                return False
            self._stopping = True
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
        waiter.join()  # it writes the exit file
        return True
