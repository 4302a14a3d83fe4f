"""How a job's output is read back: lines, and a progress bar redrawn in place."""

from __future__ import annotations

import pytest

from loraforge.board.jobs import log_tail, read_log


@pytest.mark.parametrize("written, pieces", [
    (b"$ loraforge export gguf\n", [("$ loraforge export gguf", False)]),
    # tqdm: each redraw starts with \r; the last state ends with \n
    (b"\rgguf:  10%|#| 1/10\rgguf:  50%|#####| 5/10\rgguf: 100%|##########| 10/10\n",
     [("gguf:  10%|#| 1/10", True), ("gguf:  50%|#####| 5/10", True), ("gguf: 100%|##########| 10/10", False)]),
    (b"a\r\nb\n", [("a", False), ("b", False)]),  # a Windows line end is one line end
    (b"\xe8\xae\xad\xe7\xbb\x83 done\n", [("训练 done", False)]),
    (b"half a li", []),  # nothing yet: the line is still being written
])
def test_pieces(tmp_path, written, pieces):
    log = tmp_path / "board.log"
    log.write_bytes(written)
    got, offset = read_log(log, 0)
    assert got == pieces
    assert offset == (len(written) if pieces else 0)


def test_followed_as_it_grows(tmp_path):
    log = tmp_path / "board.log"
    log.write_bytes(b"start\n\rverify:  0%| 0/10")
    first, offset = read_log(log, 0)
    with open(log, "ab") as handle:
        handle.write(b"\rverify: 40%| 4/10\rverify: 100%| 10/10\nPASS\n")
    rest, end = read_log(log, offset)
    assert first == [("start", False)]
    assert rest == [("verify:  0%| 0/10", True), ("verify: 40%| 4/10", True), ("verify: 100%| 10/10", False),
                    ("PASS", False)]
    assert end == log.stat().st_size and read_log(log, end) == ([], end)
    # the tail a page shows after a reload: the lines, not every redraw
    assert log_tail(log, 10) == ["start", "verify: 100%| 10/10", "PASS"]
    log.write_bytes(b"start\n\rverify: 40%| 4/10\r")
    assert log_tail(log, 10) == ["start", "verify: 40%| 4/10"]  # still drawing: its newest state
