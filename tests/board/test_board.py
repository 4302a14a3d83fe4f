"""`loraforge board` as a user meets it: a real board process, real `loraforge train` jobs.

Paths are confined to the root; the YAML is checked with the CLI's own errors; a run started
from the board streams the lines of its trainer_log.jsonl, can be stopped (keeping its last
checkpoint) and resumed, and is still listed after the board restarts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from loraforge.train.callbacks import read_log

from .conftest import BoardProcess, config_yaml, q, stream_events, wait_state

ESCAPES = ["/etc/passwd", "../../../../etc/passwd", "data/../../../../../etc/passwd", "link-out/passwd", "link-out"]


@pytest.fixture(scope="module")
def board(board_root):
    (board_root / "link-out").symlink_to("/etc")
    process = BoardProcess(board_root)
    yield process
    process.stop()


def test_models_and_datasets_under_the_root_are_listed(board):
    status, models = board.call("/api/models")
    assert status == 200
    [tiny] = models["models"]
    assert tiny["path"] == "models/tiny" and tiny["architecture"] == "LlamaForCausalLM" and tiny["bytes"] > 0
    status, data = board.call("/api/data")
    assert data["folders"] == [{"dir": "data", "datasets": ["short_zh"]}]
    status, info = board.call("/api/info")
    assert "sft" in info["defaults"]["stages"] and "chinese-alpaca" in info["defaults"]["templates"]
    assert info["defaults"]["train"]["lr"] == 2e-4  # the config schema's default


@pytest.mark.parametrize("path", ESCAPES)
@pytest.mark.parametrize("route", ["/api/run?path=", "/api/run/events?path=", "/api/run/loss.png?path=",
                                   "POST /api/run/stop?path=", "POST /api/run/resume?path=",
                                   "/api/run/job?kind=export&path=", "/api/run/events?kind=eval&path=",
                                   "/api/run/outputs?path=", "/api/run/file?name=loss.png&path=",
                                   "POST /api/run/stop?kind=export&path="])
def test_no_route_reads_outside_the_root(board, route, path):
    method, _, url = route.rpartition(" ")
    status, body = board.call(url + q(path), method=method or "GET")
    assert status in (403, 404), (status, body)
    assert "root:" not in json.dumps(body)  # no line of /etc/passwd
    if not path.startswith("link-out"):
        assert status == 403 and "outside the board's roots" in body["error"], body


@pytest.mark.parametrize("path", ESCAPES)
@pytest.mark.parametrize("route, body", [("/api/export", {"quants": ["q8_0"]}), ("/api/eval", {"generate": True}),
                                         ("/api/chat/load", {})])
def test_no_request_body_names_a_path_outside_the_root(board, route, body, path):
    status, answer = board.call(route, {**body, "path": path})
    assert status in (403, 404), (status, answer)
    assert "root:" not in json.dumps(answer)
    if not path.startswith("link-out"):
        assert status == 403 and "outside the board's roots" in answer["error"], answer


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "../../link-out/passwd"])
def test_a_run_file_is_a_plot_inside_the_run(board, board_root, name):
    (board_root / "runs" / "files").mkdir(parents=True, exist_ok=True)
    (board_root / "runs" / "files" / "loraforge.yaml").write_text("stage: sft\n", encoding="utf-8")
    status, answer = board.call(f"/api/run/file?path={q('runs/files')}&name={q(name)}")
    assert status in (403, 404) and "root:" not in json.dumps(answer), (status, answer)
    status, answer = board.call("/api/eval", {"path": "runs/files", "quant": True, "quants": ["q8_0"], "text": name})
    assert status in (403, 404) and "root:" not in json.dumps(answer), (status, answer)


@pytest.mark.parametrize("key, value", [("model.path", "/etc"), ("data.dir", "../../../etc"),
                                        ("train.output_dir", "/tmp/elsewhere"), ("model.path", "link-out"),
                                        ("data.datasets", "/etc/passwd"), ("data.datasets", "link-out/passwd")])
def test_a_config_naming_a_path_outside_the_root_is_refused(board, board_root, key, value):
    section, name = key.split(".")
    yaml = config_yaml("runs/x").replace(f"  {name}: ", f"  {name}: {value}  # ", 1) if section != "train" else \
        config_yaml(value)
    for route in ("/api/validate", "/api/check", "/api/train"):
        status, body = board.call(route, {"yaml": yaml})
        assert status == 403 and key in body["error"] and "outside the board's roots" in body["error"], (route, body)
    assert not (board_root / "runs" / "x").exists()


def test_a_bad_yaml_edit_shows_the_clis_error(board, board_root):
    yaml = config_yaml("runs/bad").replace("  lr: 5e-3", "  lerning_rate: 5e-3")
    status, body = board.call("/api/validate", {"yaml": yaml})
    assert status == 400
    (board_root / "bad.yaml").write_text(yaml, encoding="utf-8")
    cli = subprocess.run([sys.executable, "-m", "loraforge", "data", "check", "bad.yaml"], cwd=board_root,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2
    expected = cli.stderr.strip().removeprefix("error: ").replace("bad.yaml", "board.yaml")
    assert body["error"] == expected and "lerning_rate" in expected, (body, cli.stderr)


def test_preview_is_data_checks_report(board, board_root):
    yaml = config_yaml("runs/preview")
    status, body = board.call("/api/check", {"yaml": yaml})
    assert status == 200 and body["returncode"] == 0, body
    (board_root / "preview.yaml").write_text(yaml, encoding="utf-8")
    cli = subprocess.run([sys.executable, "-m", "loraforge", "data", "check", "preview.yaml"], cwd=board_root,
                         capture_output=True, text=True, timeout=120)
    assert body["output"] == cli.stdout and "16 examples" in body["output"]


@pytest.mark.slow
def test_a_run_streams_its_log_stops_resumes_and_outlives_the_board(board_root):
    board = BoardProcess(board_root)
    try:
        status, started = board.call("/api/train", {"yaml": config_yaml("runs/live", max_steps=400, save_steps=5)})
        assert status == 200, started
        assert started["run"] == "runs/live" and started["command"] == "loraforge train runs/live/board.yaml"
        # one job at a time: a second Start says what is running
        status, busy = board.call("/api/train", {"yaml": config_yaml("runs/other")})
        assert status == 409 and "runs/live" in busy["error"], busy
        rows = []
        for event, data in stream_events(board, "runs/live"):
            if event == "row":
                rows.append(data)
            if len([r for r in rows if "loss" in r]) >= 8:
                break
        status, stopped = board.call(f"/api/run/stop?path={q('runs/live')}", method="POST")
        assert status == 200 and stopped["state"] == "stopped", stopped
        assert stopped["last_checkpoint"] and "Resume continues from it" in stopped["note"], stopped
        logged = read_log(board_root / "runs/live/trainer_log.jsonl")
        assert rows == logged[:len(rows)]  # the stream is the file, line for line
        assert len(logged) < 400
        checkpoint_step = int(stopped["last_checkpoint"].split("-")[1])

        status, resumed = board.call(f"/api/run/resume?path={q('runs/live')}", method="POST")
        assert status == 200 and "train.resume_from_checkpoint=last" in resumed["command"], resumed
        deadline = time.monotonic() + 300
        while len(read_log(board_root / "runs/live/trainer_log.jsonl")) < len(logged) + 3:
            assert time.monotonic() < deadline and board.call(f"/api/run?path={q('runs/live')}")[1]["state"] \
                == "running"
            time.sleep(0.2)
        # the resumed job goes on from the checkpoint's step: the log keeps the first job's rows up to it
        # (those after it are dropped, as training repeats them) and goes on with one row per step
        after = read_log(board_root / "runs/live/trainer_log.jsonl")
        assert after[:checkpoint_step] == logged[:checkpoint_step]
        assert [r["step"] for r in after] == list(range(1, len(after) + 1))
    finally:
        board.stop()  # stopping the board stops its job
    board = BoardProcess(board_root)
    try:
        status, runs = board.call("/api/runs")
        live = next(r for r in runs["runs"] if r["path"] == "runs/live")
        assert live["state"] == "stopped" and live["board"] and "Resume continues from" in live["note"], live
    finally:
        board.stop()


@pytest.mark.slow
def test_a_finished_run_has_its_chart_and_loss_png(board, board_root):
    status, started = board.call("/api/train", {"yaml": config_yaml("runs/done", epochs=3)})
    assert status == 200, started
    events = list(stream_events(board, "runs/done"))
    assert events[-1][0] == "state" and events[-1][1]["state"] == "finished", events[-3:]
    rows = [data for event, data in events if event == "row"]
    assert rows == read_log(board_root / "runs/done/trainer_log.jsonl") and len(rows) >= 3
    status, run = board.call(f"/api/run?path={q('runs/done')}")
    assert run["state"] == "finished" and run["rows"] == rows and run["loss_png"]
    with urllib.request.urlopen(f"{board.url}/api/run/loss.png?path={q('runs/done')}") as response:
        assert response.read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_run_says_why(board, board_root):
    (board_root / "data" / "broken.json").write_text('[{"instruction": "你好"}]', encoding="utf-8")
    yaml = config_yaml("runs/broken").replace("datasets: short_zh", "datasets: data/broken.json")
    status, started = board.call("/api/train", {"yaml": yaml})
    assert status == 200, started
    run = wait_state(board, "runs/broken", {"failed", "finished"})
    assert run["state"] == "failed" and run["error"].startswith("error: ") and "broken.json" in run["error"], run


def test_a_non_loopback_board_needs_a_token(board_root):
    done = subprocess.run([sys.executable, "-m", "loraforge", "board", "--root", str(board_root), "--host",
                           "0.0.0.0", "--port", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "give --token T too" in done.stderr and "Traceback" not in done.stderr


def test_with_a_token_every_request_needs_it(board_root):
    board = BoardProcess(board_root, "--token", "s3cret")
    try:
        assert board.call("/api/models")[0] == 401
        assert board.call(f"/api/run?path={q('runs')}")[0] == 401
        assert board.call("/api/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert board.call("/api/models?token=s3cret")[0] == 200
        # the embedded chat page's own requests carry it as a cookie
        assert board.call("/chat/v1/models")[0] == 401
        status, body = board.call("/chat/v1/models", headers={"Cookie": "loraforge_board_token=s3cret"})
        assert status == 503 and "no chat model is loaded" in body["error"], body
    finally:
        board.stop()


def test_the_page_is_offline(board):
    with urllib.request.urlopen(board.url + "/") as response:
        page = response.read().decode()
    # one file: no script, style or font is fetched from anywhere (the SVG namespace is a name, not a fetch)
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    assert "<script src" not in page and "<link" not in page
