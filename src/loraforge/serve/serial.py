"""HF models and adapter directories: served through the transformers engine, one
request at a time.

Continuous batching is llama.cpp's (serve/batching.py); a HF model directory or a peft
adapter run is served as it is, for trying a run before exporting it, by a worker
thread that answers queued requests in order with `infer.engine`'s HF engine. It offers
the Scheduler's interface to the HTTP side, so routes, errors, cancellation and
metrics are the same; throughput is one request's.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import LoraforgeError
from loraforge.serve.batching import Delta, Failed, Finished, Job
from loraforge.serve.metrics import Metrics


@dataclass
class EngineVocab:
    """What the HTTP side asks of a model (prompt ids, template, special-token text)."""

    engine: object
    path: Path

    @property
    def chat_template(self) -> str | None:
        return self.engine.chat_template

    @property
    def bos_text(self) -> str:
        return self.engine.bos_token

    @property
    def eos_text(self) -> str:
        return self.engine.eos_token

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        # the engine adds BOS unless the text has it; a one-segment list is a slot, encoded with nothing added
        return self.engine.tokenize(text if add_special else [text])


class SerialScheduler:
    def __init__(self, engines: dict[str, object], path: Path):
        self.engines = engines
        self.lanes = dict.fromkeys(engines)  # served names, in /v1/models order
        self.model = EngineVocab(next(iter(engines.values())), path)
        self.n_ctx_seq = self.model.engine.n_ctx
        self.metrics = Metrics(1)
        self.after_step: list = []
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="loraforge-hf", daemon=True)
        self._thread.start()

    def vocab(self, lane: str) -> EngineVocab:
        """What a served name's prompts are tokenized with: its own engine (an adapter may extend the vocabulary)."""
        return EngineVocab(self.engines[lane], self.model.path)

    def check_prompt(self, prompt: list[int]) -> None:
        if len(prompt) >= self.n_ctx_seq:
            raise LoraforgeError(f"the prompt is {len(prompt)} tokens but the model's context holds "
                                 f"{self.n_ctx_seq} tokens (prompt + answer): shorten it")

    def submit(self, job: Job) -> None:
        if job.lane not in self.engines:
            raise LoraforgeError(f"unknown model '{job.lane}': this server has {', '.join(self.engines)}")
        self.check_prompt(job.prompt)
        if job.params.grammar is not None:
            # transformers has no grammar sampler here; an unconstrained answer would be a
            # silent lie about the format
            raise LoraforgeError("response_format: json_object and json_schema are enforced with llama.cpp's "
                                 "grammar sampler, which the HF engine does not have: export the model "
                                 "(loraforge export gguf) and serve the .gguf, or ask for JSON in the prompt "
                                 "with response_format text")
        if job.params.logprobs is not None:
            raise LoraforgeError("logprobs: the HF engine (a model directory, served through transformers) does "
                                 "not report them: export the model (loraforge export gguf) and serve the .gguf, "
                                 "whose llama.cpp engine answers logprobs and top_logprobs")
        with self._wake:
            self._waiting.append(job)
            self.metrics.occupancy(len(self._waiting), self.metrics.busy_slots)
            self._wake.notify()

    def status(self) -> dict:
        return {"models": list(self.lanes), "slots_per_model": 1, "context_per_slot": self.n_ctx_seq,
                "slots_busy": self.metrics.busy_slots, "queue_length": self.metrics.queue_length,
                "engine": "hf (one request at a time)"}

    def close(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        self._thread.join(timeout=10)
        for engine in self.engines.values():
            engine.close()

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._running and not self._waiting:
                    self._wake.wait()
                if not self._running:
                    return
                job = self._waiting.popleft()
                self.metrics.occupancy(len(self._waiting), 1)
            try:
                self._answer(job)
            except Exception as exc:  # a failed request must not stop the worker
                job.emit(Failed(f"generation failed: {exc}"))
            self.metrics.occupancy(len(self._waiting), 0)
            self._flush()

    def _flush(self) -> None:
        for hook in self.after_step:
            hook()

    def _answer(self, job: Job) -> None:
        from loraforge.infer.engine import GenerationConfig

        if job.cancelled:
            self.metrics.finished(0, cancelled=True)
            return
        engine, params = self.engines[job.lane], job.params
        budget = min(params.max_tokens or self.n_ctx_seq, self.n_ctx_seq - len(job.prompt))
        config = GenerationConfig(max_new_tokens=max(budget, 1), temperature=params.temperature, top_k=params.top_k,
                                  top_p=params.top_p, min_p=params.min_p, typical_p=params.typical_p,
                                  repetition_penalty=params.repeat_penalty, presence_penalty=params.presence_penalty,
                                  frequency_penalty=params.frequency_penalty, stop=params.stop, seed=params.seed)
        chunks = engine.stream(job.prompt, config)  # the ids the HTTP side rendered (tools, forced call included)
        generated = 0
        try:
            for chunk in chunks:
                if job.cancelled:
                    self.metrics.finished(0, cancelled=True)
                    return
                ends_on_stop_id = chunk.finish_reason == "stop" and chunk.token_id in engine.stop_ids
                generated += chunk.token_id is not None and not ends_on_stop_id
                self.metrics.step(1, 1, 1)
                if chunk.finish_reason is not None:
                    job.emit(Finished(chunk.finish_reason, len(job.prompt), generated, chunk.text))
                    self.metrics.finished(len(job.prompt), cancelled=False)
                    return
                if chunk.text:
                    job.emit(Delta(chunk.text))
                    self._flush()
        finally:
            chunks.close()


def open_hf_scheduler(model: Path, adapters: dict[str, Path], base_name: str,
                      n_ctx: int | None = None) -> SerialScheduler:
    """One transformers engine per served name: the reference itself, and each extra adapter on it."""
    from loraforge.infer.engine import open_engine

    engines = {base_name: open_engine(str(model), engine="hf", n_ctx=n_ctx)}
    for name, path in adapters.items():
        if not (Path(path) / "adapter_config.json").exists():
            raise LoraforgeError(f"--adapter {name}={path}: a HF model is served with peft adapter directories "
                                 "(adapter_config.json); a .gguf adapter needs a .gguf model")
        engines[name] = open_engine(str(model), engine="hf", adapters=[path], n_ctx=n_ctx)
    return SerialScheduler(engines, Path(model))
