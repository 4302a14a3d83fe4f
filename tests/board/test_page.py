"""The board page in a real headless Chromium: clicks and typing only, a real training job."""

from __future__ import annotations

import pytest

from loraforge.train.callbacks import read_log

SCREENSHOT = "board-train.png"


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860})  # fresh localStorage per test
    page = context.new_page()
    page.set_default_timeout(180_000)  # a preview or a job start loads torch: slow on a busy machine
    yield page
    context.close()


def open_board(page, board):
    page.goto(board.url + "/")
    page.wait_for_function("() => document.getElementById('model').value === 'models/tiny' && "
                           "document.getElementById('command').textContent.startsWith('loraforge train')")


@pytest.mark.slow
def test_train_from_the_page_and_watch_the_chart(page, board, board_root, tmp_path_factory):
    open_board(page, board)
    assert page.locator("#model-info").inner_text().startswith("LlamaForCausalLM")
    assert page.locator("#datasets input[value=short_zh]").is_checked()
    for field, value in (("#lr", "5e-3"), ("#epochs", "12"), ("#batch", "4"), ("#logging", "1"),
                         ("#output", "runs/page")):
        page.fill(field, value)
        page.dispatch_event(field, "change")
    page.wait_for_function("() => document.getElementById('command').textContent === "
                           "'loraforge train runs/page/board.yaml'")
    assert "lr: 5e-3" in page.input_value("#yaml") and "output_dir: runs/page" in page.input_value("#yaml")

    page.click("#check")  # the preview is data check's report
    page.wait_for_function("() => document.getElementById('train-out').textContent.includes('16 examples')")

    page.click("#start")
    page.wait_for_selector("#tab-runs.active")
    page.wait_for_function("() => document.querySelectorAll('#chart circle.point').length >= 3")
    # while it runs: the stats line and the smoothed curve are there too
    assert page.locator("#chart polyline.smoothed").count() == 1
    page.wait_for_function("() => document.getElementById('run-title').textContent.includes('finished')",
                           timeout=300_000)
    points = page.eval_on_selector_all("#chart circle.point", "cs => cs.map(c => [+c.dataset.step, +c.dataset.loss])")
    logged = [(r["step"], r["loss"]) for r in read_log(board_root / "runs/page/trainer_log.jsonl") if "loss" in r]
    assert points == [list(p) for p in logged] and len(points) >= 3
    assert page.locator("#png").is_visible()
    shot = tmp_path_factory.mktemp("screens") / SCREENSHOT
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a reload shows the run from disk
    page.reload()
    page.click("nav button[data-tab=runs]")
    page.wait_for_selector("tr.run[data-path='runs/page']")
    assert "finished" in page.locator("tr.run[data-path='runs/page']").inner_text()


def test_chinese_labels_are_remembered(page, board):
    open_board(page, board)
    page.select_option("#lang", "zh")
    assert page.locator("nav button[data-tab=train]").inner_text() == "训练"
    assert page.locator("#check").inner_text() == "预览数据" and page.locator("#start").inner_text() == "开始"
    page.reload()
    open_board(page, board)
    assert page.locator("#start").inner_text() == "开始" and page.evaluate("document.documentElement.lang") == "zh-CN"
    page.select_option("#lang", "en")
    assert page.locator("#start").inner_text() == "Start"


def test_a_bad_yaml_edit_shows_the_clis_error_on_the_page(page, board):
    open_board(page, board)
    yaml = page.input_value("#yaml").replace("  lr: ", "  lerning_rate: ")
    page.fill("#yaml", yaml)
    page.wait_for_function("() => document.getElementById('command').classList.contains('error')")
    status, body = board.call("/api/validate", {"yaml": yaml})
    assert status == 400
    assert page.locator("#command").inner_text() == "error: " + body["error"]
    assert "lerning_rate" in body["error"]
    page.click("#start")
    page.wait_for_function("() => document.getElementById('train-out').className === 'error'")
    assert page.locator("#train-out").inner_text() == "error: " + body["error"]


@pytest.mark.slow
def test_stop_and_resume_from_the_page(page, board, board_root):
    open_board(page, board)
    for field, value in (("#lr", "5e-3"), ("#epochs", "200"), ("#batch", "4"), ("#logging", "1"), ("#save", "4"),
                         ("#output", "runs/page-stop")):
        page.fill(field, value)
        page.dispatch_event(field, "change")
    page.wait_for_function("() => document.getElementById('command').textContent === "
                           "'loraforge train runs/page-stop/board.yaml'")
    page.click("#start")
    page.wait_for_function("() => document.querySelectorAll('#chart circle.point').length >= 10")
    page.click("#stop")
    page.wait_for_function("() => document.getElementById('run-title').textContent.includes('stopped')")
    note = page.locator("#run-note").inner_text()
    assert "the last checkpoint is checkpoint-" in note and "Resume continues from it" in note, note
    assert page.locator("#resume").is_visible() and not page.locator("#stop").is_visible()
    stopped_at = len(read_log(board_root / "runs/page-stop/trainer_log.jsonl"))

    page.click("#resume")
    page.wait_for_function("() => document.getElementById('run-title').textContent.includes('running')")
    page.wait_for_function(f"() => document.querySelectorAll('#chart circle.point').length > {stopped_at + 3}")
    page.click("#stop")
    page.wait_for_function("() => document.getElementById('run-title').textContent.includes('stopped')")
    steps = [r["step"] for r in read_log(board_root / "runs/page-stop/trainer_log.jsonl")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > stopped_at + 3  # went on from its checkpoint
    assert "train.resume_from_checkpoint=last" in page.locator("#run-log").inner_text()
