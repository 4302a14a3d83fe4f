"""How many threads llama.cpp gets while other jobs share the cores.

llama.cpp splits every step of the graph (hundreds of matmuls, norms, ropes per token)
over its threads and makes them all meet at a barrier after each node. When a thread has
to share its core with another busy process, the kernel runs it only part of the time, and
every barrier waits for it: the step costs as many scheduler time slices as the graph has
nodes. Spinning makes it worse — the waiting threads burn their own core while they wait
(llama-cpp-python's wheels use OpenMP, whose barrier spins ~300,000 times before sleeping;
ggml's own thread pool, in builds without OpenMP, polls at `poll` 50).

Measured on 2 cores (x86_64 EPYC, llama-cpp-python 0.3.36 whose libggml-cpu uses OpenMP;
the 107M-parameter Q8_0 of benchmarks/serve.py; median ms of one llama_decode of 1 and of 8
sequences; 2026-12-02, while another job already kept about one core busy — /proc/stat said
1.0 cores used by others — and again with `python -c "while True: pass"` under `taskset -c 0`
on top):

                                       another job       + pinned spinner
  2 threads                            23 / 126 ms       159 / 59 ms (means 240 / 279)
  2 threads, ggml thread pool, poll 0  25 / 119 ms       14 / 61 ms (means 33 / 89)
  2 threads, OMP_WAIT_POLICY=passive   10 / 51 ms        10 / 51 ms
  1 thread                              9 / 47 ms         — (24 / 147: the spinner and the
                                                             job shared our core that run)
  ThreadGovernor (2 at most → 1)        9 / 45 ms         9 / 45 ms

Two threads vary 2-20x from step to step with a busy core; one thread does not. An
attached ggml thread pool with poll 0 changes nothing that is not noise: in an OpenMP
build ggml's barrier is `#pragma omp barrier`, and `poll` is never read. A passive OpenMP
wait helps almost as much as one thread, but libgomp reads OMP_WAIT_POLICY once, when
llama_cpp is first imported. So the server takes every core it may run on (on a quiet
machine two threads gave 409 tokens/s at 8 clients against 233 for one: RESULTS.md,
2026-12-01 20:37), and between steps `ThreadGovernor` lowers llama.cpp's thread count to
the cores other processes leave free — sampled from /proc/stat every SAMPLE_S: CPU time on
our CPUs minus this process's own — and raises it again when they go quiet.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

SAMPLE_S = 0.5  # how often the governor looks at the cores: 10-100 decode steps, ~50 µs to read
# Cores of CPU time other processes took, from which one core counts as taken: plain
# rounding. Measured only at 0 and at 1 busy core; a half-busy core is a guess either way.
TAKEN = 0.5


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(cpus, 1)


def _busy_ticks(cpus: set[int]) -> int | None:
    """Clock ticks the CPUs in `cpus` spent running anything, since boot (None: no /proc/stat)."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        # user nice system idle iowait irq softirq steal (guest time is already in user)
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in rest.split()[:8])
        total += user + nice + system + irq + softirq + steal
    return total


@dataclass
class CpuSampler:
    """How many cores other processes kept busy since the last sample."""

    cpus: set[int] = field(default_factory=lambda: set(os.sched_getaffinity(0)))
    _last: tuple[float, int, float] | None = None  # wall time, busy ticks, our CPU time
    _tick: float = field(default_factory=lambda: 1 / os.sysconf("SC_CLK_TCK"))

    def others(self) -> float | None:
        """Cores used by other processes over the last interval; None on the first call
        or where /proc/stat cannot be read."""
        ticks = _busy_ticks(self.cpus)
        if ticks is None:
            return None
        now = (time.monotonic(), ticks, time.process_time())
        last, self._last = self._last, now
        if last is None or now[0] - last[0] <= 0:
            return None
        wall = now[0] - last[0]
        everyone = (now[1] - last[1]) * self._tick
        ours = now[2] - last[2]
        return max(0.0, (everyone - ours) / wall)


def threads_for(most: int, cpus: int, others: float) -> int:
    """llama.cpp threads when other processes use `others` of our `cpus` cores."""
    taken = int(others + (1 - TAKEN))  # 0.4 → 0, 0.5 → 1, 1.6 → 2
    return max(1, min(most, cpus - taken))


class ThreadGovernor:
    """Sets llama.cpp's thread count on some contexts, between decode steps, to what the
    cores other processes leave free allow: at most `most` (and `most_batch` for prompts).

    `step()` is meant for the decode thread (Scheduler.after_step): llama.cpp reads the
    count once per llama_decode, and nothing else touches the contexts there."""

    def __init__(self, lib, contexts: list, most: int, most_batch: int | None = None,
                 sampler: CpuSampler | None = None):
        self.lib = lib
        self.contexts = contexts  # llama_context pointers
        self.most = most
        self.most_batch = most_batch or most
        self.sampler = sampler or CpuSampler()
        self.cpus = len(self.sampler.cpus)
        self.threads = most  # what the contexts run with now
        self.changes = 0
        self._next = 0.0
        self.sampler.others()  # the baseline for the first interval

    def step(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + SAMPLE_S
        others = self.sampler.others()
        if others is None:
            return
        self.set(threads_for(self.most, self.cpus, others))

    def set(self, threads: int) -> None:
        if threads == self.threads:
            return
        batch = min(self.most_batch, max(threads, self.most_batch - (self.most - threads)))
        for ctx in self.contexts:
            self.lib.llama_set_n_threads(ctx, threads, batch)
        self.threads = threads
        self.changes += 1
