"""A real `loraforge board` process on 127.0.0.1 over a root folder with a tiny model and data."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from serve.conftest import LoraforgeProcess

from conftest import DATA_DIR


class BoardProcess(LoraforgeProcess):
    """`python -m loraforge board --root ROOT …`, ready when its page answers."""

    def __init__(self, root: Path, *args: str, timeout: float = 60.0):
        # stopping the board stops its job first (SIGTERM, then the job's checkpoint is kept)
        super().__init__(["board", "--root", str(root), *args], "/", timeout, stop_wait_s=30)

    def call(self, path: str, body: dict | None = None, method: str | None = None,
             headers: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method or ("POST" if data else "GET"),
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def board_root(pretrained_llama, tmp_path_factory) -> Path:
    """models/tiny (a copy of the pre-trained tiny LLaMA) and data/ with 16 short alpaca answers."""
    root = tmp_path_factory.mktemp("board_root")
    shutil.copytree(pretrained_llama, root / "models" / "tiny",
                    ignore=shutil.ignore_patterns("checkpoint-*", "trainer_log.jsonl", "loss.png", "loraforge.yaml",
                                                  "trained_on.json"))
    records = json.loads((DATA_DIR / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    short = sorted((r for r in records if not r.get("history") and not r.get("system")), key=lambda r: len(r["output"]))
    (root / "data").mkdir()
    (root / "data" / "short.json").write_text(json.dumps(short[10:26], ensure_ascii=False), encoding="utf-8")
    (root / "data" / "dataset_info.json").write_text(json.dumps({"short_zh": {"file_name": "short.json"}}),
                                                     encoding="utf-8")
    shutil.copy(DATA_DIR / "zh_heldout.txt", root / "data" / "zh_heldout.txt")
    return root


@pytest.fixture(scope="module")
def board(board_root):
    """A board on this module's root (test_board.py adds a symlink out of it first)."""
    process = BoardProcess(board_root)
    yield process
    process.stop()


def q(path: str) -> str:
    return urllib.parse.quote(path, safe="")


def stream_events(board: BoardProcess, path: str, kind: str = "train", limit_s: float = 300):
    """(event, data) pairs of /api/run/events until the stream ends."""
    with urllib.request.urlopen(f"{board.url}/api/run/events?kind={kind}&path={q(path)}", timeout=limit_s) as response:
        event = None
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                yield event, json.loads(line[6:])


def wait_state(board: BoardProcess, path: str, states: set[str], limit_s: float = 300) -> dict:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        status, run = board.call(f"/api/run?path={q(path)}")
        if status == 200 and run["state"] in states:
            return run
        time.sleep(0.3)
    raise AssertionError(f"{path} never reached {states}: {run}")


def config_yaml(output: str, **train) -> str:
    settings = {"lr": "5e-3", "epochs": 30, "batch_size": 4, "logging_steps": 1, "save_steps": 20, **train}
    return "\n".join(["stage: sft", "method: lora", "model:", "  path: models/tiny", "data:", "  dir: data",
                      "  datasets: short_zh", "  template: chinese-alpaca", "  cutoff_len: 256", "lora:", "  r: 16",
                      "train:", f"  output_dir: {output}", *(f"  {k}: {v}" for k, v in settings.items())]) + "\n"
