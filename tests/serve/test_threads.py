"""The server's llama.cpp thread count follows the cores other processes leave free, and
changing it between steps changes no answer.

The CPU sampler is replaced by one that reports what each test says other processes use;
everything else is real: llama.cpp contexts, the decode thread, HTTP on 127.0.0.1. The
thread counts are read back from llama.cpp (llama_n_threads). No timing is asserted: what
a busy core costs is measured by benchmarks/serve.py --background pinned.
"""

from __future__ import annotations

import threading

import pytest

from loraforge.serve import threads as threads_module
from loraforge.serve.threads import threads_for

from .conftest import http


@pytest.mark.parametrize(("most", "cpus", "others", "expected"), [
    (2, 2, 0.0, 2),   # quiet: every core
    (2, 2, 0.3, 2),   # a little background work: not worth a thread
    (2, 2, 0.7, 1),   # one core mostly taken (a spinner sharing it with our second thread)
    (2, 2, 1.0, 1),   # one core busy
    (2, 2, 3.0, 1),   # every core busy: still one thread, never none
    (8, 8, 2.2, 6),
    (4, 8, 1.0, 4),   # --threads 4 on 8 cores: the cap holds while cores are free
    (4, 8, 5.0, 3),
])
def test_threads_for_leaves_the_busy_cores_alone(most, cpus, others, expected):
    assert threads_for(most, cpus, others) == expected


class ScriptedSampler:
    """Reports `others[...]` cores used by other processes: a fixed value, or a cycle."""

    script: list[float] = [0.0]
    calls = 0

    def __init__(self):
        self.cpus = {0, 1}

    def others(self) -> float:
        cls = type(self)
        cls.calls += 1
        return cls.script[cls.calls % len(cls.script)]


@pytest.fixture(scope="module")
def governed(tiny_llama, tmp_path_factory):
    """An in-process server on a tiny GGUF with two threads at most, its scheduler, and the
    thread counts llama.cpp reports after each step."""
    from loraforge.export.gguf_writer import export_gguf
    from loraforge.serve.server import ServeOptions, free_port, http_server, open_scheduler

    model = export_gguf(tiny_llama, [], tmp_path_factory.mktemp("threads") / "tiny.gguf", "q8_0")
    patch = pytest.MonkeyPatch()
    patch.setattr(threads_module, "CpuSampler", ScriptedSampler)
    patch.setattr(threads_module, "SAMPLE_S", 0.0)  # look at the cores after every step
    options = ServeOptions(model, port=free_port(), parallel=2, ctx_size=256, threads=2)
    scheduler = open_scheduler(options)
    lib, contexts = scheduler.model.lib, [lane.context.ctx for lane in scheduler.lanes.values()]
    seen: list[tuple[int, int]] = []
    scheduler.after_step.append(lambda: seen.extend((lib.llama_n_threads(c), lib.llama_n_threads_batch(c))
                                                    for c in contexts))
    listening = threading.Event()
    server = http_server(options, scheduler, lambda url, names: listening.set())
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert listening.wait(60)
    yield server.url, scheduler, seen
    server.should_exit = True
    thread.join(timeout=10)
    scheduler.close()
    patch.undo()


def complete(url: str, prompt: str = "春天来了") -> str:
    status, body = http(url + "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 24,
                                                  "temperature": 0, "ignore_eos": True})
    assert status == 200, body
    return body["choices"][0]["text"]


def test_a_busy_core_takes_a_thread_and_a_quiet_one_gives_it_back(governed):
    url, scheduler, seen = governed
    ScriptedSampler.script = [1.0]
    complete(url)
    assert seen[-1] == (1, 1)
    ScriptedSampler.script = [0.0]
    complete(url)
    assert seen[-1] == (2, 2)


def test_an_answer_is_the_same_when_the_thread_count_changes_every_step(governed):
    url, scheduler, seen = governed
    ScriptedSampler.script = [0.0]
    steady = complete(url)
    seen.clear()
    ScriptedSampler.script = [0.0, 1.0]  # 2 threads, 1, 2, 1, … step after step
    changes = scheduler.threads.changes
    assert complete(url) == steady
    assert {(1, 1), (2, 2)} <= set(seen)
    assert scheduler.threads.changes - changes >= 20
