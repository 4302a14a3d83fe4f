"""`loraforge serve`: load a model once, start the decode thread, run uvicorn.

A GGUF is served with continuous batching (serve/batching.py): one llama.cpp context per
served name — the base, and one per `--adapter name=path` — all on one loaded model.
A HF model or adapter directory is served through the transformers engine one request
at a time (serve/serial.py): for trying a run; export a GGUF to serve it for real.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from loraforge.errors import LoraforgeError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")


@dataclass
class ServeOptions:
    model: Path  # a .gguf file (batched), or a HF model / peft adapter dir (one request at a time)
    adapters: dict[str, Path] = field(default_factory=dict)  # served name → LoRA adapter .gguf
    name: str | None = None  # the base model's id in /v1/models (default: the file stem)
    host: str = "127.0.0.1"  # loopback only unless asked: the API has no key by default
    port: int = 8000
    api_key: str | None = None
    parallel: int = 4  # slots (sequences decoded together) per served name
    ctx_size: int | None = None  # tokens per slot, prompt + answer (default: the model's trained context)
    # most llama.cpp threads for one token (default: every usable CPU); also for batches unless
    # threads_batch is given. Fewer while other processes keep cores busy (serve/threads.py).
    threads: int | None = None
    threads_batch: int | None = None
    prefill_chunk: int = 128  # prompt tokens per step while other requests are decoding
    chat_template: str | None = None  # NAME|FILE: replaces the model's template; for adapters that carry none


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """`name=path` pairs from the command line."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LoraforgeError(f"--adapter {spec}: write it as NAME=PATH (the name clients send as \"model\")")
        if not _NAME.match(name):
            raise LoraforgeError(f"--adapter {spec}: the name may hold letters, digits and . _ : / - only")
        if name in adapters:
            raise LoraforgeError(f"--adapter {name}=…: the name is given twice")
        adapters[name] = Path(path)
    return adapters


def open_scheduler(options: ServeOptions):
    """The loaded model, its contexts and the running decode thread."""
    from loraforge.models import resolve_model
    from loraforge.serve.batching import Scheduler
    from loraforge.serve.gguf_model import ContextSpec, GgufModel, default_threads
    from loraforge.serve.threads import ThreadGovernor

    if options.parallel < 1:
        raise LoraforgeError(f"--parallel {options.parallel}: need at least one slot")
    ref = resolve_model(options.model)
    base_name = options.name or ref.name
    if base_name in options.adapters:
        raise LoraforgeError(f"--adapter {base_name}=…: that is the base model's name; choose another")
    if ref.kind != "gguf":
        from loraforge.serve.serial import open_hf_scheduler

        return open_hf_scheduler(options.model, options.adapters, base_name, options.ctx_size)
    model = GgufModel(options.model)
    adapters = {name: model.load_adapter(name, path) for name, path in options.adapters.items()}
    threads, threads_batch = default_threads()
    ctx = options.ctx_size or model.n_ctx_train
    if ctx < 8:
        raise LoraforgeError(f"--ctx-size {ctx}: too small to hold a prompt and an answer")
    spec = ContextSpec(parallel=options.parallel, ctx_per_slot=ctx, n_batch=max(512, options.parallel),
                       threads=options.threads or threads,
                       threads_batch=options.threads_batch or options.threads or threads_batch)
    scheduler = Scheduler(model, adapters, base_name, spec, prefill_chunk=options.prefill_chunk)
    # between steps, on the decode thread: fewer llama.cpp threads while other processes keep
    # cores busy (a thread that shares its core stalls every barrier of every step: 20x slower)
    scheduler.threads = ThreadGovernor(model.lib, [lane.context.ctx for lane in scheduler.lanes.values()],
                                       spec.threads, spec.threads_batch)
    scheduler.after_step.append(scheduler.threads.step)
    return scheduler


def http_server(options: ServeOptions, scheduler, ready: Callable[[str, list[str]], None] | None = None):
    """A uvicorn server for the scheduler's models; `ready(url, names)` once its socket listens."""
    import uvicorn

    from loraforge.serve.app import build_app
    from loraforge.serve.prompts import ChatRenderer

    app = build_app(scheduler, lane_renderers(options, scheduler, ChatRenderer), options.api_key)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=2)
    host = f"[{options.host}]" if ":" in options.host else options.host

    class Server(uvicorn.Server):
        url = f"http://{host}:{options.port}"

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and ready is not None:
                ready(self.url, list(scheduler.lanes))

    return Server(config)


def lane_templates(options: ServeOptions, scheduler) -> dict[str, str | None]:
    """Each served name's chat template: an adapter's own (what it was trained with: an adapter
    GGUF's `tokenizer.chat_template` from `export lora-gguf`, a peft dir's tokenizer), else
    --chat-template, else the model's own. llama.cpp itself never applies an adapter's template."""
    from loraforge.export.chat_template import chat_template_text, gguf_chat_template

    given = chat_template_text(options.chat_template) if options.chat_template else None
    names = list(scheduler.lanes)
    templates = {names[0]: given or scheduler.model.chat_template}
    engines = getattr(scheduler, "engines", {})  # HF serving: one engine per name, each with its tokenizer's
    for name, path in options.adapters.items():
        if name in engines:
            own = engines[name].chat_template
            own = None if own == scheduler.model.chat_template else own
        else:
            own = gguf_chat_template(path)
        templates[name] = own or templates[names[0]]
    return templates


def lane_renderers(options: ServeOptions, scheduler, renderer_class) -> dict:
    """A ChatRenderer per served name: its template on its own vocabulary (an HF adapter's tokenizer)."""
    templates = lane_templates(options, scheduler)
    return {name: renderer_class(scheduler.vocab(name), templates[name]) for name in scheduler.lanes}


def serve(options: ServeOptions, ready: Callable[[str, list[str]], None] | None = None) -> None:
    """Serve until interrupted."""
    scheduler = open_scheduler(options)
    try:
        server = http_server(options, scheduler, ready)
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind; its log line says why
            raise LoraforgeError(f"could not listen on {server.url} (in use? pick another --port)") from None
    finally:
        scheduler.close()


@contextmanager
def background_server(options: ServeOptions, timeout: float = 60.0) -> Iterator[str]:
    """The server in a thread of this process (the demo, benchmarks); yields its base URL."""
    if options.port == 0:
        options = replace(options, port=free_port())
    scheduler = open_scheduler(options)
    listening = threading.Event()
    server = http_server(options, scheduler, lambda url, names: listening.set())
    thread = threading.Thread(target=server.run, name="loraforge-http", daemon=True)
    try:
        thread.start()
        while not listening.wait(0.05):
            if not thread.is_alive() or (timeout := timeout - 0.05) <= 0:
                raise LoraforgeError(f"the server did not start listening on {server.url}")
        yield server.url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        scheduler.close()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
