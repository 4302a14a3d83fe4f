"""Counters for `GET /metrics`, in Prometheus' text exposition format.

Written by the decode thread and the HTTP handlers, read by scrapes; every update is a
few integer additions under one lock, so counting costs nothing next to a decode step.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

RATE_WINDOW_S = 10.0  # tokens/s is averaged over the last ten seconds
STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    def __init__(self, parallel: int):
        self.parallel = parallel
        self._lock = threading.Lock()
        self.requests = Counter()  # (endpoint, status code) → count
        self.cancelled = 0
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0  # prompt tokens found in a slot's cache, not decoded again
        self.completion_tokens = 0
        self.decode_steps = Counter()  # sequences in the step → number of llama_decode calls
        self.decoded_tokens = 0  # tokens through llama_decode (prompt chunks included)
        self.step_tokens = Counter()  # histogram bucket (upper bound) → steps
        self.queue_length = 0
        self.busy_slots = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, generated tokens) per step

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def step(self, sequences: int, tokens: int, generated: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.decode_steps[sequences] += 1
            self.decoded_tokens += tokens
            self.step_tokens[next((b for b in STEP_TOKEN_BUCKETS if tokens <= b), "+Inf")] += 1
            self.completion_tokens += generated
            self._recent.append((now, generated))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def reused(self, tokens: int) -> None:
        with self._lock:
            self.cached_prompt_tokens += tokens

    def finished(self, prompt_tokens: int, cancelled: bool) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.cancelled += cancelled

    def occupancy(self, queued: int, busy: int) -> None:
        self.queue_length, self.busy_slots = queued, busy

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [(t, n) for t, n in self._recent if t >= now - RATE_WINDOW_S]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span

    def render(self) -> str:
        rate = self.tokens_per_second()
        with self._lock:
            lines = [
                "# HELP loraforge_requests_total HTTP requests to /v1 by endpoint and status code.",
                "# TYPE loraforge_requests_total counter",
                *(f'loraforge_requests_total{{endpoint="{e}",code="{c}"}} {n}'
                  for (e, c), n in sorted(self.requests.items())),
                "# HELP loraforge_requests_cancelled_total Requests whose client went away before the end.",
                "# TYPE loraforge_requests_cancelled_total counter",
                f"loraforge_requests_cancelled_total {self.cancelled}",
                "# HELP loraforge_prompt_tokens_total Prompt tokens of finished requests.",
                "# TYPE loraforge_prompt_tokens_total counter",
                f"loraforge_prompt_tokens_total {self.prompt_tokens}",
                "# HELP loraforge_prompt_tokens_cached_total Prompt tokens reused from a slot's KV cache.",
                "# TYPE loraforge_prompt_tokens_cached_total counter",
                f"loraforge_prompt_tokens_cached_total {self.cached_prompt_tokens}",
                "# HELP loraforge_completion_tokens_total Tokens generated.",
                "# TYPE loraforge_completion_tokens_total counter",
                f"loraforge_completion_tokens_total {self.completion_tokens}",
                "# HELP loraforge_decode_steps_total llama_decode calls by the number of sequences in the batch.",
                "# TYPE loraforge_decode_steps_total counter",
                *(f'loraforge_decode_steps_total{{sequences="{k}"}} {n}' for k, n in sorted(self.decode_steps.items())),
                "# HELP loraforge_decoded_tokens_total Tokens through llama_decode, prompt chunks included.",
                "# TYPE loraforge_decoded_tokens_total counter",
                f"loraforge_decoded_tokens_total {self.decoded_tokens}",
                "# HELP loraforge_decode_step_tokens Tokens in one llama_decode call (decodes + prompt chunks).",
                "# TYPE loraforge_decode_step_tokens histogram",
                *self._histogram("loraforge_decode_step_tokens", self.step_tokens),
                f"loraforge_decode_step_tokens_sum {self.decoded_tokens}",
                "# HELP loraforge_queue_length Requests waiting for a free slot.",
                "# TYPE loraforge_queue_length gauge",
                f"loraforge_queue_length {self.queue_length}",
                "# HELP loraforge_slots_busy Slots decoding a request.",
                "# TYPE loraforge_slots_busy gauge",
                f"loraforge_slots_busy {self.busy_slots}",
                "# HELP loraforge_slots Slots per served model (--parallel).",
                "# TYPE loraforge_slots gauge",
                f"loraforge_slots {self.parallel}",
                "# HELP loraforge_tokens_per_second Generated tokens per second over the last 10 s.",
                "# TYPE loraforge_tokens_per_second gauge",
                f"loraforge_tokens_per_second {rate:.2f}",
            ]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _histogram(name: str, counts: Counter) -> list[str]:
        lines, total = [], 0
        for bound in (*STEP_TOKEN_BUCKETS, "+Inf"):
            total += counts.get(bound, 0)
            lines.append(f'{name}_bucket{{le="{bound}"}} {total}')
        return [*lines, f"{name}_count {total}"]
