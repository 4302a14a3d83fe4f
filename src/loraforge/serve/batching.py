"""Continuous batching: one decode thread, all requests of a model in one llama_decode.

Each served name (the base, and every adapter) is a *lane*: a llama.cpp context with
`parallel` slots, slot i being sequence i of the context's KV cache. Between decode steps
the thread admits waiting requests into free slots, drops cancelled ones, and builds one
batch per lane: the last sampled token of every decoding slot, then prompt tokens of
slots still prefilling. A long prompt is fed in chunks of `prefill_chunk` tokens while
others are decoding, so it delays them by one chunk per step, not by the whole prompt;
with nobody decoding it goes in at full batch size. After the decode every slot that
produced logits samples with its own sampler chain.

A slot's KV cells outlive its request, as a prefix cache: a new request takes the free
slot that already holds the longest prefix of its prompt, or shares the cells of another
slot that holds (or is prefilling) it — a system prompt is prefilled once, not per slot.

HTTP handlers never touch llama.cpp state: they `submit` a Job, and the thread sends
back events through the Job's `emit` callback (thread-safe on the handler's side).

Embeddings (`embed`) are the one exception: they run on the calling (HTTP worker) thread,
one request at a time, on an embedding context of their own per served name (`Embedder`) —
llama.cpp allows different contexts of one model on different threads, and the decode
thread's contexts are never touched.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from loraforge.errors import LoraforgeError
from loraforge.serve.gguf_model import Context, ContextSpec, Embedder, GgufModel
from loraforge.serve.metrics import Metrics
from loraforge.serve.sampling import (
    SamplingParams,
    TextStream,
    TokenLogprob,
    sampler_chain,
    top_logprobs,
)

EMBED_MAX_TOKENS = 2048  # the most tokens of one /v1/embeddings input (or the context per request); see Embedder


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens of this text, when asked for


@dataclass
class Finished:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # the last piece of text, released at the end
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Failed:
    message: str


Event = Delta | Finished | Failed


@dataclass
class Job:
    """One request: its prompt ids, how to sample, and where its events go."""

    lane: str
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: bool = False  # set by the HTTP side when the client goes away
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled = True


MIN_SHARED = 16  # a prefix shorter than this is prefilled again rather than waited for


class Slot:
    def __init__(self, seq: int):
        self.seq = seq
        self.job: Job | None = None
        # Tokens in this sequence's KV cells, kept after a request ends: the next request
        # that starts with the same tokens (a system prompt, the history of a chat) skips
        # their prefill, as llama-cpp-python and llama-server reuse a cached prefix.
        self.cached: list[int] = []
        self.borrow: tuple[Slot, int] | None = None  # (slot prefilling our prefix, its length)

    def start(self, job: Job, sampler, stream: TextStream, keep: int) -> None:
        self.job, self.sampler, self.stream = job, sampler, stream
        self.borrow = None
        self.cached = self.cached[:keep]
        self.pending = list(job.prompt[keep:])  # prompt tokens not yet in the KV cache
        self.n_past = keep  # tokens in the KV cache
        self.next_token: int | None = None  # sampled, to be fed at the next step
        self.generated = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Lane:
    """A context (base model, or base + one adapter) and its slots."""

    def __init__(self, name: str, context: Context, parallel: int):
        self.name = name
        self.context = context
        self.slots = [Slot(i) for i in range(parallel)]
        self.waiting: deque[Job] = deque()

    def busy(self) -> list[Slot]:
        return [s for s in self.slots if s.job is not None]


class Scheduler:
    """Owns the model, the contexts and the decode thread."""

    def __init__(self, model: GgufModel, adapters: dict[str, object], base_name: str, spec: ContextSpec,
                 prefill_chunk: int = 128):
        self.model = model
        self.spec = spec
        self.prefill_chunk = min(prefill_chunk, spec.n_batch)
        self.lanes: dict[str, Lane] = {}
        for name, adapter in [(base_name, None), *adapters.items()]:
            self.lanes[name] = Lane(name, Context(model, spec, adapter), spec.parallel)
        self.n_ctx_seq = next(iter(self.lanes.values())).context.n_ctx_seq
        self.embedder = Embedder(model, {base_name: None, **adapters}, min(self.n_ctx_seq, EMBED_MAX_TOKENS),
                                 spec.threads_batch)
        self.metrics = Metrics(spec.parallel)
        self._wake = threading.Condition()
        self._running = True
        self.after_step: list[Callable[[], None]] = []  # e.g. hand a step's events to the event loop at once
        self._thread = threading.Thread(target=self._run, name="loraforge-decode", daemon=True)
        self._thread.start()

    # -- the HTTP side -------------------------------------------------------------

    def vocab(self, lane: str) -> GgufModel:
        """What a served name's prompts are tokenized with: the one model (adapters share its vocabulary)."""
        return self.model

    def check_prompt(self, prompt: list[int]) -> None:
        """Refuse, before queuing, a prompt the context cannot hold (with one answer token)."""
        if len(prompt) >= self.n_ctx_seq:
            raise LoraforgeError(f"the prompt is {len(prompt)} tokens but this server's context holds "
                                 f"{self.n_ctx_seq} tokens per request (prompt + answer): shorten it, or "
                                 f"restart the server with a larger --ctx-size")

    def submit(self, job: Job) -> None:
        if job.lane not in self.lanes:
            raise LoraforgeError(f"unknown model '{job.lane}': this server has {', '.join(self.lanes)}")
        self.check_prompt(job.prompt)
        with self._wake:
            self.lanes[job.lane].waiting.append(job)
            self._wake.notify()

    def embed(self, lane: str, inputs: list[list[int]]) -> list[np.ndarray]:
        """One L2-normalized vector per input (see `Embedder`). Blocking: call it from a worker thread."""
        return self.embedder.embed(lane, inputs)

    def close(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        self._thread.join(timeout=10)
        for lane in self.lanes.values():
            for slot in lane.busy():
                self._release(lane, slot, None)
            lane.context.close()
        self.lanes.clear()
        self.embedder.close()  # after an embedding in flight

    # -- the decode thread ---------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._running and not any(lane.waiting or lane.busy() for lane in self.lanes.values()):
                    self._wake.wait()
                if not self._running:
                    return
                for lane in self.lanes.values():
                    self._admit(lane)
            for lane in list(self.lanes.values()):
                try:
                    self._step(lane)
                except Exception as exc:  # a failed step must not kill the server: fail its requests
                    for slot in lane.busy():
                        slot.job.emit(Failed(f"decoding failed: {exc}"))
                        self._release(lane, slot, None, forget=True)
            self._report()
            for hook in self.after_step:
                hook()

    def _admit(self, lane: Lane) -> None:
        gone = [job for job in lane.waiting if job.cancelled]  # clients that left while queued
        if gone:
            lane.waiting = deque(job for job in lane.waiting if not job.cancelled)
            for _ in gone:
                self.metrics.finished(0, cancelled=True)
        free = [slot for slot in lane.slots if slot.job is None]
        while free and lane.waiting:
            job = lane.waiting.popleft()
            # the free slot whose cached tokens share the longest prefix with this prompt
            slot = max(free, key=lambda s: common_prefix(s.cached, job.prompt))
            # keep at least the last prompt token to decode: its logits give the first answer token
            keep = min(common_prefix(slot.cached, job.prompt), len(job.prompt) - 1)
            try:
                if not lane.context.trim_sequence(slot.seq, keep):
                    keep = 0
                sampler = sampler_chain(self.model.lib, job.params, self.model.n_vocab, self.model.vocab)
            except Exception as exc:  # never let one request's setup stop the decode thread
                job.emit(Failed(f"could not start decoding: {exc}"))
                continue
            free.remove(slot)
            donor, shared = self._donor(lane, slot, job.prompt)
            if shared >= keep + MIN_SHARED and common_prefix(donor.cached, job.prompt) >= shared:
                lane.context.clear_sequence(slot.seq)  # the prefix is in the donor's cells now: share them
                lane.context.copy_prefix(donor.seq, slot.seq, shared)
                slot.cached, keep = list(job.prompt[:shared]), shared
            self.metrics.reused(keep)
            slot.start(job, sampler, TextStream(job.params.stop), keep)
            if shared >= keep + MIN_SHARED:
                slot.borrow = (donor, shared)  # the donor is still prefilling it: wait, then share

    def _donor(self, lane: Lane, slot: Slot, prompt: list[int]) -> tuple[Slot | None, int]:
        """The other slot holding, or prefilling, the longest prefix of `prompt`.

        Requests that arrive together with one system prompt would each prefill it;
        instead one does, and the others share its KV cells (llama_memory_seq_cp: in a
        unified cache the cells are tagged with both sequences, nothing is copied)."""
        best, best_n = None, 0
        for other in lane.slots:
            if other is slot:
                continue
            tokens = other.cached + other.pending if other.job is not None else other.cached
            n = min(common_prefix(tokens, prompt), len(prompt) - 1)
            if n > best_n:
                best, best_n = other, n
        return best, best_n

    def _settle_borrow(self, lane: Lane, slot: Slot) -> bool:
        """Share a donor's prefix once it is in the KV cache; False while still waiting."""
        donor, shared = slot.borrow
        prompt = slot.job.prompt
        if len(donor.cached) < shared and donor.job is not None and donor.pending \
                and common_prefix(donor.cached + donor.pending, prompt) >= shared:
            return False  # its prefill is on the way
        slot.borrow = None
        if common_prefix(donor.cached, prompt) >= shared > slot.n_past:
            lane.context.clear_sequence(slot.seq)
            lane.context.copy_prefix(donor.seq, slot.seq, shared)
            self.metrics.reused(shared - slot.n_past)
            slot.cached, slot.n_past, slot.pending = list(prompt[:shared]), shared, list(prompt[shared:])
        return True

    def _step(self, lane: Lane) -> None:
        for slot in lane.busy():
            if slot.job.cancelled:
                self._release(lane, slot, None)
        # before any row is added: a donor's cells exist only for tokens already decoded
        waiting = {slot.seq for slot in lane.busy() if slot.borrow is not None and not self._settle_borrow(lane, slot)}
        active = lane.busy()
        if not active:
            return
        context = lane.context
        rows: list[tuple[int, int, int, bool]] = []
        outputs: list[tuple[Slot, int]] = []  # slot, its row in the batch
        for slot in active:
            if slot.next_token is not None:
                outputs.append((slot, len(rows)))
                rows.append((slot.next_token, slot.n_past, slot.seq, True))
                slot.cached.append(slot.next_token)
                slot.n_past += 1
                slot.next_token = None
        budget = context.n_batch - len(rows) if not rows else min(self.prefill_chunk, context.n_batch - len(rows))
        for slot in active:
            if not slot.pending or budget <= 0 or slot.seq in waiting:
                continue
            chunk, slot.pending = slot.pending[:budget], slot.pending[budget:]
            budget -= len(chunk)
            for i, token in enumerate(chunk):
                last = not slot.pending and i == len(chunk) - 1
                if last:
                    outputs.append((slot, len(rows)))
                rows.append((token, slot.n_past + i, slot.seq, last))
            slot.cached.extend(chunk)
            slot.n_past += len(chunk)
        if not rows:
            return
        context.fill(rows)
        status = context.decode()
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} for {len(rows)} tokens")
        self.metrics.step(len({seq for _, _, seq, _ in rows}), len(rows), len(outputs))
        for slot, row in outputs:
            self._sample(lane, slot, row)

    def _sample(self, lane: Lane, slot: Slot, row: int) -> None:
        lib, model, job = self.model.lib, self.model, slot.job
        token = lib.llama_sampler_sample(slot.sampler, lane.context.ctx, row)
        params = job.params
        ended = (model.is_end_of_generation(token) and not params.ignore_eos) or token in params.stop_tokens
        if ended:
            return self._finish(lane, slot, "stop")
        slot.generated += 1
        # read before the next decode overwrites the logits
        entry = self._logprob(lane, row, token, params.logprobs) if params.logprobs is not None else None
        text = slot.stream.push(model.piece(token), entry)
        if slot.stream.stopped:
            return self._finish(lane, slot, "stop", text)
        if (params.max_tokens is not None and slot.generated >= params.max_tokens) or slot.n_past >= lane.context.n_ctx_seq:
            return self._finish(lane, slot, "length", text)
        entries = self._sent_logprobs(slot)
        if text or entries:
            job.emit(Delta(text, entries))
        slot.next_token = token

    def _logprob(self, lane: Lane, row: int, token: int, n_top: int) -> TokenLogprob:
        logprob, top = top_logprobs(lane.context.logits(row), token, n_top)
        piece = self.model.piece
        return TokenLogprob(token, piece(token, special=True), logprob,
                            tuple((i, piece(i, special=True), value) for i, value in top))

    def _sent_logprobs(self, slot: Slot) -> list[TokenLogprob]:
        """The entries of the tokens whose text has been released (see TextStream)."""
        return [replace(entry, offset=offset) for offset, entry in slot.stream.take()]

    def _finish(self, lane: Lane, slot: Slot, reason: str, text: str = "") -> None:
        text += slot.stream.finish(cut=reason == "length")
        slot.job.emit(Finished(reason, len(slot.job.prompt), slot.generated, text, self._sent_logprobs(slot)))
        self._release(lane, slot, slot.job)

    def _release(self, lane: Lane, slot: Slot, finished: Job | None, forget: bool = False) -> None:
        """Free the slot now for the next request; its KV cells stay as a prefix cache
        unless `forget` (after a failed decode their contents are unknown)."""
        job = slot.job
        self.model.lib.llama_sampler_free(slot.sampler)
        if forget:
            lane.context.clear_sequence(slot.seq)
            slot.cached = []
        slot.job = None
        self.metrics.finished(len(job.prompt) if finished else 0, cancelled=finished is None and job.cancelled)

    def _report(self) -> None:
        lanes = self.lanes.values()
        self.metrics.occupancy(sum(len(lane.waiting) for lane in lanes), sum(len(lane.busy()) for lane in lanes))

    def status(self) -> dict:
        return {"models": list(self.lanes), "slots_per_model": self.spec.parallel,
                "context_per_slot": self.n_ctx_seq, "slots_busy": self.metrics.busy_slots,
                "queue_length": self.metrics.queue_length}
