"""After training: chat with the run, export it, evaluate it — from the board, over HTTP and in Chromium.

One run is trained from the board until the tiny model knows its 16 answers by heart (the
learned_run recipe), so a greedy answer can be checked against the training data itself. Chat
loads it into a real `loraforge serve` behind the board; Export and Evaluate run the real
`export gguf --verify`, `merge`, `export ollama`, `eval generate` and `eval quant` commands.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest

from .conftest import config_yaml, q, stream_events, wait_state

pytestmark = pytest.mark.slow
RUN = "runs/learned"


@pytest.fixture(scope="module")
def learned(board, board_root) -> list[tuple[str, str]]:
    """runs/learned, trained from the board; (question, trained answer) pairs."""
    yaml = config_yaml(RUN, epochs=120, batch_size=8, save_steps=100000).replace("  r: 16", "  r: 32")
    status, started = board.call("/api/train", {"yaml": yaml})
    assert status == 200, started
    run = wait_state(board, RUN, {"finished", "failed", "stopped"}, limit_s=900)
    assert run["state"] == "finished", run
    records = json.loads((board_root / "data" / "short.json").read_text(encoding="utf-8"))
    return [(r["instruction"] + (("\n" + r["input"]) if r.get("input") else ""), r["output"]) for r in records]


def wait_chat(board, limit_s: float = 600) -> dict:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        status, chat = board.call("/api/chat")
        if chat["state"] != "loading":
            return chat
        time.sleep(0.3)
    raise AssertionError(f"the chat model never loaded: {chat}")


def served(board) -> str:
    status, models = board.call("/chat/v1/models")
    assert status == 200, models
    return models["data"][0]["id"]


def ask(board, question: str, **options) -> str:
    status, reply = board.call("/chat/v1/chat/completions", {
        "model": served(board), "messages": [{"role": "user", "content": question}], "temperature": 0,
        "max_tokens": 64, **options})
    assert status == 200, reply
    return reply["choices"][0]["message"]["content"]


def test_chat_serves_the_run_behind_the_board(board, learned):
    status, listed = board.call("/api/chat/models")
    assert {"path": RUN, "kind": "run"} in listed["models"] and {"path": "models/tiny", "kind": "model"} in \
        listed["models"], listed
    status, loading = board.call("/api/chat/load", {"path": RUN})
    assert status == 200 and loading["model"] == RUN and loading["state"] in ("loading", "ready"), loading
    assert wait_chat(board)["state"] == "ready"
    # serve's own page and API under /chat/: the greedy answer is the trained one
    with urllib.request.urlopen(board.url + "/chat/") as response:
        assert "v1/chat/completions" in response.read().decode()
    question, answer = learned[0]
    assert ask(board, question) == answer
    # streamed through the proxy as server-sent events, the same text
    request = urllib.request.Request(board.url + "/chat/v1/chat/completions", data=json.dumps({
        "model": served(board), "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 64,
        "stream": True}).encode(), headers={"Content-Type": "application/json"})
    pieces = []
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
    assert "".join(pieces) == answer
    status, unloaded = board.call("/api/chat/unload", method="POST")
    assert unloaded["state"] == "stopped" and board.call("/chat/v1/models")[0] == 503


def test_a_run_without_weights_is_not_loaded(board, board_root):
    (board_root / "runs" / "empty").mkdir(parents=True, exist_ok=True)
    (board_root / "runs" / "empty" / "loraforge.yaml").write_text("stage: sft\n", encoding="utf-8")
    status, body = board.call("/api/chat/load", {"path": "runs/empty"})
    assert status == 400 and "no trained weights yet" in body["error"], body
    status, body = board.call("/api/export", {"path": "runs/empty", "quants": ["q8_0"]})
    assert status == 400 and "no trained weights yet" in body["error"], body


def test_export_with_verify_merged_and_modelfile(board, board_root, learned):
    status, started = board.call("/api/export", {"path": RUN, "quants": ["q4_0"], "verify": True, "merged": True,
                                                 "ollama": True})
    assert status == 200, started
    assert started["command"].startswith("loraforge export gguf --base models/tiny --adapter runs/learned "
                                         "--quant q4_0 -o runs/learned/export/learned-Q4_0.gguf --verify")
    # one job at a time: an evaluation waits, and says what runs
    status, busy = board.call("/api/eval", {"path": RUN, "generate": True})
    assert status == 409 and "an export is already running: runs/learned" in busy["error"], busy
    events = list(stream_events(board, RUN, "export", limit_s=900))
    assert events[-1][0] == "state" and events[-1][1]["state"] == "finished", events[-5:]
    lines = [data for event, data in events if event == "log"]
    assert any("PASS" in line for line in lines), lines  # --verify's verdict, as the terminal shows it
    assert any("100%" in data for event, data in events if event in ("log", "progress")), events
    status, out = board.call(f"/api/run/outputs?path={q(RUN)}")
    [gguf] = [e for e in out["exports"] if e["file"] == "learned-Q4_0.gguf"]
    path = board_root / RUN / "export" / "learned-Q4_0.gguf"
    assert gguf["bytes"] == path.stat().st_size and gguf["verdict"] == "PASS", gguf
    parity = json.loads(path.with_name("learned-Q4_0.parity.json").read_text(encoding="utf-8"))
    assert parity["verdict"] == "PASS" and gguf["parity"].splitlines()[-1].startswith("PASS: ")
    assert out["merged_bytes"] == sum(p.stat().st_size for p in (board_root / RUN / "export" / "merged").glob(
        "*.safetensors")) > 0
    assert "\nFROM ./learned-Q4_0.gguf\n" in out["modelfile"], out["modelfile"]
    # the merge is peft's: the merged model answers the trained question
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = board_root / RUN / "export" / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    question, answer = learned[1]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    generated = model.generate(**ids, max_new_tokens=48, do_sample=False)
    assert tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == answer


def test_evaluate_generate_and_quant(board, board_root, learned):
    status, started = board.call("/api/eval", {"path": RUN, "generate": True, "limit": 8, "quant": True,
                                               "quants": ["q8_0"], "text": "data/zh_heldout.txt"})
    assert status == 200, started
    assert "loraforge eval generate runs/learned --compare models/tiny --data runs/learned/loraforge.yaml " \
           "--limit 8 -o runs/learned/eval-generate" in started["command"], started
    events = list(stream_events(board, RUN, "eval", limit_s=900))
    assert events[-1][1]["state"] == "finished", events[-5:]
    status, out = board.call(f"/api/run/outputs?path={q(RUN)}")
    generate = next(e for e in out["evals"] if e["command"] == "eval generate")
    report = json.loads((board_root / RUN / generate["dir"] / "eval.json").read_text(encoding="utf-8"))
    assert generate["models"] == [{"label": m["label"], "metrics": m["metrics"]} for m in report["models"]]
    tuned, base = (m["metrics"] for m in report["models"])
    assert tuned["exact_match"] >= 50 > base["exact_match"]  # it learned its answers; the base did not
    assert "| BLEU-4 |" in generate["markdown"]
    quant = next(e for e in out["evals"] if e["command"] == "eval quant")
    assert "| q8_0 |" in quant["markdown"] and quant["plot"] == f"{quant['dir']}/kl_vs_size.png"
    with urllib.request.urlopen(f"{board.url}/api/run/file?path={q(RUN)}&name={q(quant['plot'])}") as response:
        assert response.read()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- the same, with clicks and typing


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(int(os.environ.get("BOARD_PAGE_TIMEOUT_MS", 600_000)))  # loading a model or an export starts torch: slow on a busy machine
    yield page
    context.close()


def open_tab(page, board, tab: str):
    page.goto(board.url + "/")
    page.wait_for_function("() => document.getElementById('command').textContent.startsWith('loraforge train')")
    page.click(f"nav button[data-tab={tab}]")


@pytest.mark.parametrize("way", ["runs tab", "chat tab"])
def test_chat_with_the_finished_run_from_the_page(page, board, learned, way):
    if way == "runs tab":  # one click on the finished run
        open_tab(page, board, "runs")
        page.click(f"tr.run[data-path='{RUN}']")
        page.click("#run-chat")
        page.wait_for_selector("#tab-chat.active")
    else:
        open_tab(page, board, "chat")
        page.wait_for_selector(f"#chat-model option[value='{RUN}']", state="attached")
        page.select_option("#chat-model", RUN)
        page.click("#chat-load")
    page.wait_for_selector("#chat-frame", state="visible")
    assert RUN in page.locator("#chat-status").inner_text()
    frame = page.frame_locator("#chat-frame")
    # the page of this load (not the last one's) has read /v1/models
    page.wait_for_function("() => { const f = document.getElementById('chat-frame'), d = f.contentDocument; "
                           "return !f.hidden && d && d.location.href === f.src && d.readyState === 'complete' && "
                           "d.getElementById('model') && d.getElementById('model').value !== ''; }")
    frame.locator("#temperature").fill("0")
    frame.locator("#temperature").dispatch_event("change")
    question, answer = learned[2 if way == "chat tab" else 3]
    frame.locator("#input").fill(question)
    frame.locator("#input").press("Enter")
    try:
        page.wait_for_function("() => { const d = document.getElementById('chat-frame').contentDocument; "
                               "return d.querySelector('.msg.assistant') && d.getElementById('stop').hidden && "
                               "!d.querySelector('.msg.streaming'); }")
    except Exception:
        page.screenshot(path="/tmp/chat-fail.png")
        raise
    assert frame.locator(".msg.assistant .text").last.text_content() == answer


def test_export_q8_0_from_the_page(page, board, board_root, learned):
    open_tab(page, board, "export")
    page.wait_for_selector(f"#export-run option[value='{RUN}']", state="attached")
    page.select_option("#export-run", RUN)
    assert page.locator("#quants input[value=q8_0]").is_checked() and page.locator("#verify").is_checked()
    page.click("#export-start")
    page.wait_for_selector("#export-stop", state="visible")
    row = page.locator("#export-files tr[data-file='learned-Q8_0.gguf']")
    row.wait_for()
    page.wait_for_function("() => document.getElementById('export-state').textContent !== '' && "
                           "document.getElementById('export-stop').hidden")
    assert page.locator("#export-state").inner_text() == "finished"
    assert row.locator("td").nth(2).inner_text() == "PASS"
    size = (board_root / RUN / "export" / "learned-Q8_0.gguf").stat().st_size
    assert row.locator("td").nth(1).inner_text() == f"{size / 2**20:.2f} MiB"
    row.click()
    assert page.locator("#export-parity").inner_text().startswith("Q8_0")
    assert "PASS" in page.locator("#export-log").inner_text()


def test_evaluate_from_the_page(page, board, board_root, learned):
    open_tab(page, board, "eval")
    page.wait_for_selector(f"#eval-run option[value='{RUN}']", state="attached")
    page.select_option("#eval-run", RUN)
    page.wait_for_selector("#eval-results .eval")  # the evaluation made over HTTP above
    before = page.locator(".eval[data-command='eval generate']").count()
    page.fill("#eval-limit", "4")
    page.uncheck("#eval-quant")
    page.click("#eval-start")
    page.wait_for_selector("#eval-stop", state="visible")
    page.wait_for_selector("#eval-stop", state="hidden")
    assert page.locator("#eval-state").inner_text() == "finished"
    assert page.locator(".eval[data-command='eval generate']").count() == before + 1
    newest = page.locator(".eval[data-command='eval generate']").first
    folder = newest.get_attribute("data-dir")
    report = json.loads((board_root / RUN / folder / "eval.json").read_text(encoding="utf-8"))
    bars = newest.locator("rect.bar").evaluate_all(
        "bars => bars.map(b => [b.dataset.model, b.dataset.metric, +b.dataset.value])")
    expected = [[m["label"], k, m["metrics"][k]] for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match")
                for m in report["models"]]
    assert bars == expected
    header = newest.locator("table tr").first.locator("th").all_inner_texts()
    assert header[0] == "metric" and header[1] == report["models"][0]["label"]
    page.select_option("#lang", "zh")
    assert page.locator("#eval-start").inner_text() == "评估" and page.locator("nav button[data-tab=export]") \
        .inner_text() == "导出"
