"""Overlap the stages of a stream: read+merge the next tensor and write the last one
while the current one is quantized. Each stage holds at most one tensor ahead, so
memory stays a few tensors, never the model; errors surface in the caller's thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def ahead(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Iterate `items` in a background thread, at most `depth` items ahead of the consumer."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put((item, None))
            slots.put((_DONE, None))
        except BaseException as exc:  # handed to the consumer
            slots.put((_DONE, exc))

    worker = threading.Thread(target=produce, name="loraforge-read-merge", daemon=True)
    worker.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get(timeout=0.1)
            except queue.Empty:
                pass


class Behind:
    """Run `write(data)` calls in order on one background thread, one call behind."""

    def __init__(self, write: Callable[[object], None]):
        self._write, self._pool, self._last = write, ThreadPoolExecutor(1, "loraforge-write"), None

    def __call__(self, data: object) -> None:
        self.wait()
        self._last = self._pool.submit(self._write, data)

    def wait(self) -> None:
        last: Future | None = self._last
        self._last = None
        if last is not None:
            last.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
