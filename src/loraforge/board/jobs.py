"""Jobs started from the board: `loraforge train`, export and eval commands as subprocesses.

A job belongs to a run directory and has a kind (train, export, eval). Its state lives in the
run directory, so a page reload or a restart of the board reads it back: `board.json` holds
the commands and the pid, `board.log` what they printed, and `board-exit.json` how the job
ended (exit code, stopped or not, the `error:` line) — `board-export.*` and `board-eval.*` for
the other kinds. A job is one command or a few run one after another (export: each quant type,
then the merge); the first that fails ends it. One job runs at a time. A page reload does not
touch it; stopping the board stops it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from loraforge.outputs import write_text
from loraforge.train.run import latest_checkpoint

KINDS = {"train": "board", "export": "board-export", "eval": "board-eval"}  # kind → its files' stem
YAML_FILE = "board.yaml"  # the config a board job trains on
STOP_WAIT_S = 20
_TERMINATOR = re.compile(rb"\r\n|\n|\r")


class Busy(Exception):
    """A second Start while a job runs (HTTP 409)."""


def job_files(run_dir: Path, kind: str) -> tuple[Path, Path, Path]:
    """(job file, log, exit file) of a `kind` job in `run_dir`."""
    stem = KINDS[kind]
    return run_dir / f"{stem}.json", run_dir / f"{stem}.log", run_dir / f"{stem}-exit.json"


def _alive(pid: int | None) -> bool:
    if not isinstance(pid, int) or pid <= 0:  # never started (or kill(-1) would ask about every process)
        return False
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


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read()
    except OSError:
        return b""


def read_new(path: Path, offset: int) -> tuple[list[bytes], int]:
    """The complete lines of `path` after byte `offset` (a line being written is left for later),
    and the offset after them: a file followed as it grows, without reading it again."""
    data = _read_from(path, offset)
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


def read_log(path: Path, offset: int) -> tuple[list[tuple[str, bool]], int]:
    """What a job printed after byte `offset`: (text, is_progress) pieces and the offset after them.
    A piece ended by a carriage return is a progress bar redrawing itself (tqdm): a page shows
    the newest one in place instead of appending each."""
    data = _read_from(path, offset)
    pieces, start = [], 0
    for match in _TERMINATOR.finditer(data):
        text = data[start:match.start()].decode("utf-8", errors="replace")
        if text.strip():
            pieces.append((text, match.group() == b"\r"))
        start = match.end()
    return pieces, offset + start


def log_tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines a job printed, with its progress bar's newest state if it is drawing one."""
    pieces, _ = read_log(path, 0)
    kept = [text for text, progress in pieces if not progress]
    if pieces and pieces[-1][1]:
        kept.append(pieces[-1][0])
    return kept[-lines:]


def error_line(log: Path) -> str | None:
    """What a failed command said: its last `error:` line, else its last line."""
    lines = log_tail(log, 10_000)
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else None


def job_state(run_dir: Path, kind: str, active: bool = False) -> dict | None:
    """A `kind` job's state in `run_dir` as its files say (None: it never had one). `active`:
    this board's job is running there."""
    job_file, log_file, exit_file = job_files(run_dir, kind)
    job, ended = _read_json(job_file), _read_json(exit_file)
    if job is None and ended is None:
        return None
    if active or (ended is None and job is not None and _alive(job.get("pid"))):
        state = "running"
    elif ended is None:
        state = "stopped"  # the board (and so the job) ended without writing the exit file
    elif ended.get("stopped"):
        state = "stopped"
    else:
        state = "finished" if ended.get("returncode") == 0 else "failed"
    return {"kind": kind, "state": state, "error": None if state == "running" or ended is None else ended.get("error"),
            "command": (job or {}).get("shown")}


def run_state(run_dir: Path, active: bool = False) -> dict:
    """A training run: running / finished / stopped / failed, with what a page shows about it.
    `active`: this board's training job is running there (until its exit file is written)."""
    job = job_state(run_dir, "train", active)
    rows, _ = read_lines(run_dir / "trainer_log.jsonl", 0)
    steps = [r["step"] for r in rows if "step" in r]
    last = latest_checkpoint(run_dir)  # complete checkpoints only: what Resume would load
    state = {"step": steps[-1] if steps else 0, "remaining_s": rows[-1].get("remaining_s") if rows else None,
             "last_checkpoint": last.name if last else None, "board": job is not None,
             "loss_png": (run_dir / "loss.png").is_file()}
    if job is not None:
        state["state"], state["error"] = job["state"], job["error"]
    else:  # trained from the command line
        saved = any((run_dir / name).is_file() for name in ("adapter_model.safetensors", "model.safetensors"))
        state["state"], state["error"] = ("finished" if saved else "stopped"), None
    if state["state"] == "stopped":
        state["note"] = (f"stopped at step {state['step']}; the last checkpoint is {state['last_checkpoint']} — "
                         "Resume continues from it") if last else \
            f"stopped at step {state['step']} before its first checkpoint — Resume starts it again"
    return state


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to a process started in its own session and its children, SIGKILL if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def shown_command(command: list[str]) -> str:
    """A command as a person would type it: `loraforge …`, not the interpreter running it."""
    return " ".join(["loraforge", *command[3:]] if command[:3] == [sys.executable, "-m", "loraforge"] else command)


def loraforge_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "loraforge", *args]


class Jobs:
    """The one job this board runs, if any."""

    def __init__(self, workdir: Path):
        self.workdir = workdir  # where jobs run: a config's relative paths start here
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._run_dir: Path | None = None
        self._kind: str | None = None
        self._waiter: threading.Thread | None = None
        self._stopping = False

    def current(self) -> tuple[str, Path] | None:
        """(kind, run directory) of the job, from its start until its exit file is written."""
        with self._lock:
            busy = self._waiter is not None and self._waiter.is_alive()
            return (self._kind, self._run_dir) if busy else None

    def running(self, kind: str | None = None) -> Path | None:
        """The run directory of the job (of that kind), while it runs."""
        current = self.current()
        return current[1] if current and kind in (None, current[0]) else None

    def start_train(self, run_dir: Path, yaml_text: str, overrides: list[str] = ()) -> str:
        """Write RUN/board.yaml and start `loraforge train` on it; the command, as shown."""
        def prepare():
            write_text(run_dir / YAML_FILE, yaml_text)
        return self.start("train", run_dir, [loraforge_command("train", str(run_dir / YAML_FILE), *overrides)],
                          prepare)

    def start(self, kind: str, run_dir: Path, commands: list[list[str]], prepare=None) -> str:
        """Run `commands` one after another as a `kind` job of `run_dir`; the commands, as shown."""
        job_file, log_file, exit_file = job_files(run_dir, kind)
        with self._lock:
            if self._waiter is not None and self._waiter.is_alive():
                what = {"train": "a training job", "export": "an export", "eval": "an evaluation"}[self._kind]
                raise Busy(f"{what} is already running: {self._run_dir} — wait for it or stop it first "
                           "(one job at a time)")
            run_dir.mkdir(parents=True, exist_ok=True)
            exit_file.unlink(missing_ok=True)
            if prepare is not None:
                prepare()
            shown = " && ".join(shown_command(c) for c in commands)
            write_text(job_file, json.dumps({"commands": commands, "shown": shown, "pid": None,
                                             "started": time.time()}))
            self._run_dir, self._kind, self._stopping, self._proc = run_dir, kind, False, None
            self._waiter = threading.Thread(target=self._run, args=(kind, run_dir, commands, shown), daemon=True)
            self._waiter.start()
            return shown

    def _run(self, kind: str, run_dir: Path, commands: list[list[str]], shown: str) -> None:
        job_file, log_file, exit_file = job_files(run_dir, kind)
        code = 0
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for command in commands:
            with self._lock:
                if self._stopping:
                    break
                with open(log_file, "a", encoding="utf-8") as log:
                    log.write(f"$ {shown_command(command)}\n")
                    log.flush()
                    # its own session: a page reload never reaches it, and Stop signals the whole group
                    self._proc = proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                         start_new_session=True, cwd=self.workdir)
                write_text(job_file, json.dumps({"commands": commands, "shown": shown, "pid": proc.pid,
                                                 "started": time.time()}))
            code = proc.wait()
            if code != 0:
                break
        with self._lock:
            stopped = self._stopping
        write_text(exit_file, json.dumps({
            "returncode": code, "stopped": stopped, "ended": time.time(),
            "error": None if code == 0 or stopped else error_line(log_file)}))

    def stop(self, run_dir: Path | None = None, kind: str | None = None) -> bool:
        """Stop the running job (SIGTERM, then SIGKILL); False when nothing (or another job) runs."""
        with self._lock:
            proc, waiter = self._proc, self._waiter
            if waiter is None or not waiter.is_alive() or (run_dir is not None and run_dir != self._run_dir) \
                    or (kind is not None and kind != self._kind):
                return False
            self._stopping = True
        if proc is not None:
            stop_group(proc)
        waiter.join()  # it writes the exit file
        return True
