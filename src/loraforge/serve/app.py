"""The HTTP side of `loraforge serve`: OpenAI routes, auth, errors, SSE, the chat page.

Handlers validate and tokenize, hand a Job to the scheduler's decode thread, and turn its
events into OpenAI JSON or server-sent events (logprobs included, in the chat or the
legacy completions shape). /v1/embeddings runs on a worker thread, off the event loop and
off the decode thread (`Scheduler.embed`). Every failure a client can cause is an
OpenAI-style error body with a 4xx status; nothing a request sends can stop the decode
thread. A client that goes away cancels its job: a closed stream at once, a dropped
non-streaming request at its next check (every DISCONNECT_POLL_S); the decode thread then
frees the slot before its next step.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.requests import ClientDisconnect

from loraforge import __version__
from loraforge.errors import LoraforgeError
from loraforge.serve.batching import Delta, Failed, Finished, Job, Scheduler
from loraforge.serve.prompts import ChatRenderer, prompt_ids
from loraforge.serve.reply_split import ReplyPlan, ReplyStream, split_reply
from loraforge.serve.sampling import TokenLogprob
from loraforge.serve.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    openapi_schema,
    parse_body,
)

WEB_PAGE = Path(__file__).parent / "web" / "index.html"
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def error_body(message: str, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class EventPost:
    """Events from the decode thread to handlers' queues, one event-loop wake-up per decode
    step for all requests (call_soon_threadsafe per token per request is a syscall each)."""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[tuple[asyncio.Queue, object]] = []
        self._lock = threading.Lock()

    def put(self, queue: asyncio.Queue, event) -> None:
        with self._lock:
            self._pending.append((queue, event))

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if pending and self.loop is not None:
            self.loop.call_soon_threadsafe(_deliver, pending)


def _deliver(pending: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, event in pending:
        queue.put_nowait(event)


def build_app(scheduler: Scheduler, renderer: ChatRenderer | dict[str, ChatRenderer],
              api_key: str | None = None) -> FastAPI:
    """`renderer`: one for every served name, or one per name (adapters with their own template)."""
    renderers = renderer if isinstance(renderer, dict) else dict.fromkeys(scheduler.lanes, renderer)
    app = FastAPI(title="loraforge", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    post = EventPost()
    scheduler.after_step.append(post.flush)

    def authorize(request: Request) -> None:
        # A plain check in each /v1 handler rather than an HTTP middleware: Starlette's
        # BaseHTTPMiddleware wraps streaming responses and hides client disconnects.
        if api_key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' with the key "
                                    "the server was started with (--api-key)", code="invalid_api_key")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        scheduler.metrics.request(request.url.path, exc.status)
        return JSONResponse(error_body(exc.message, exc.kind, exc.code), status_code=exc.status)

    @app.exception_handler(LoraforgeError)
    async def bad_request(request: Request, exc: LoraforgeError):
        scheduler.metrics.request(request.url.path, 400)
        return JSONResponse(error_body(str(exc), "invalid_request_error"), status_code=400)

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, exc: ClientDisconnect):
        # the client left before its body arrived: nobody to answer, nothing to log
        scheduler.metrics.request(request.url.path, 499)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        scheduler.metrics.request(request.url.path, 500)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        if not WEB_PAGE.is_file():
            return PlainTextResponse(f"the chat page is missing: {WEB_PAGE} is not installed "
                                     "(reinstall loraforge); the API under /v1 works without it", status_code=500)
        return HTMLResponse(WEB_PAGE.read_bytes(), headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        return {"status": "ok", **scheduler.status()}

    @app.get("/openapi.json")
    async def openapi():
        return openapi_schema(__version__)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(scheduler.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        scheduler.metrics.request("/v1/models", 200)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "loraforge"} for name in scheduler.lanes]}

    def lane_of(name: str) -> str:
        if name not in scheduler.lanes:
            raise ApiError(404, f"model '{name}' does not exist on this server; it serves "
                                f"{', '.join(scheduler.lanes)} (GET /v1/models)", code="model_not_found")
        return name

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = parse_body(ChatCompletionRequest, await request.body())
        lane = lane_of(body.model)
        choice = body.tool_choice if isinstance(body.tool_choice, str) else None
        prompt = renderers[lane].render(body.message_dicts(), body.tool_dicts(), choice, body.forced_function())
        params = body.sampling(body.max_completion_tokens or body.max_tokens, prompt.stop, prompt.stop_tokens)
        return await answer(request, "/v1/chat/completions", lane, prompt.ids, params, body, chat=True,
                            plan=prompt.plan)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = parse_body(CompletionRequest, await request.body())
        lane = lane_of(body.model)
        ids = prompt_ids(renderers[lane].model, body.prompt_text())
        return await answer(request, "/v1/completions", lane, ids, body.sampling(body.max_tokens), body, chat=False,
                            prompt_chars=len(body.prompt_text()))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        authorize(request)
        body = parse_body(EmbeddingRequest, await request.body())
        lane = lane_of(body.model)
        embed = getattr(scheduler, "embed", None)
        if embed is None:
            raise LoraforgeError("/v1/embeddings: computed by llama.cpp, which the HF engine (a model directory, "
                                 "served through transformers) does not use: export the model (loraforge export "
                                 "gguf) and serve the .gguf")
        model = scheduler.vocab(lane)
        if body.dimensions is not None and body.dimensions != model.n_embd:
            raise LoraforgeError(f"dimensions: this model's embeddings have {model.n_embd} dimensions and cannot "
                                 f"be shortened here: omit dimensions (or send {model.n_embd})")
        inputs = [model.tokenize(item) if isinstance(item, str) else item for item in body.inputs()]
        vectors = await asyncio.to_thread(embed, lane, inputs)  # never on the event loop: other requests go on
        tokens = sum(len(ids) for ids in inputs)
        scheduler.metrics.request("/v1/embeddings", 200)
        data = [{"object": "embedding", "index": i, "embedding": encode_embedding(vector, body.encoding_format)}
                for i, vector in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": lane,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def answer(request: Request, endpoint: str, lane: str, ids: list[int], params, body, *, chat: bool,
                     plan: ReplyPlan | None = None, prompt_chars: int = 0):
        if not ids:
            raise LoraforgeError("the prompt is empty: send some text to continue")
        scheduler.check_prompt(ids)
        post.loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(lane, ids, params, lambda event: post.put(events, event))
        scheduler.submit(job)
        scheduler.metrics.request(endpoint, 200)
        reply = Reply(chat, lane, plan, logprobs=params.logprobs is not None, prompt_chars=prompt_chars)
        if body.stream:
            return StreamingResponse(stream(job, events, reply, body.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await collect(request, job, events, reply)

    async def collect(request: Request, job: Job, events: asyncio.Queue, reply: Reply):
        parts: list[str] = []
        entries: list[TokenLogprob] = []
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    event = None
                # by the clock, not on a quiet queue: a busy answer never lets the queue go quiet
                if loop.time() - checked >= DISCONNECT_POLL_S:
                    checked = loop.time()
                    if await request.is_disconnected():
                        job.cancel()
                        return Response(status_code=499)
                if event is None:
                    continue
                if isinstance(event, Delta):
                    parts.append(event.text)
                    entries.extend(event.logprobs)
                elif isinstance(event, Finished):
                    parts.append(event.text)
                    entries.extend(event.logprobs)
                    return reply.whole("".join(parts), event, entries)
                else:
                    raise ApiError(500, event.message, "server_error")
        finally:
            job.cancel()  # a no-op once finished; frees the slot if this handler was interrupted

    async def stream(job: Job, events: asyncio.Queue, reply: Reply, include_usage: bool):
        # One chunk per decode step's text, as OpenAI streams one per token: clients and
        # benchmarks count chunks. A chunk carries the logprobs of its tokens; a reasoning /
        # tool-call reply's held-back text carries them on its next chunk.
        pending: list[TokenLogprob] = []

        def chunk(content, finish_reason: str | None = None) -> str:
            entries = pending[:]
            pending.clear()
            return sse(reply.chunk(content, finish_reason, entries))

        try:
            if reply.chat:
                yield sse(reply.chunk({"role": "assistant", "content": ""}))
            parts = ReplyStream(reply.plan) if reply.plan else None  # reasoning / tool calls to read
            while True:
                event = await events.get()
                if isinstance(event, Delta):
                    pending.extend(event.logprobs)
                    if parts is None:
                        yield chunk(event.text)
                    for delta in parts.push(event.text) if parts else ():
                        yield chunk(delta)
                    continue
                if isinstance(event, Failed):
                    yield sse(error_body(event.message, "server_error"))
                    break
                pending.extend(event.logprobs)
                finish = event.finish_reason
                if parts is None and event.text:
                    yield chunk(event.text)
                elif parts is not None:
                    for delta in parts.push(event.text):
                        yield chunk(delta)
                    deltas, called = parts.finish()
                    for delta in deltas:
                        yield chunk(delta)
                    finish = called or finish
                yield chunk(None, finish)
                if include_usage:
                    yield sse(reply.usage_chunk(event))
                break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()

    return app


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def encode_embedding(vector, encoding_format: str):
    if encoding_format == "base64":  # OpenAI's: little-endian float32, base64 (what its clients ask for by default)
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def usage(event: Finished) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


class Reply:
    """OpenAI's response shapes for one request (chat or text completion)."""

    def __init__(self, chat: bool, model: str, plan: ReplyPlan | None = None, logprobs: bool = False,
                 prompt_chars: int = 0):
        self.chat, self.model = chat, model
        self.logprobs = logprobs  # asked for: every choice carries them
        self.prompt_chars = prompt_chars  # the legacy text_offset counts from the prompt's start
        # None: the reply is plain text (no thought to split, no tools offered)
        self.plan = plan if plan and (plan.tool_format or plan.thought_words) else None
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, text: str, event: Finished, entries: list[TokenLogprob] = ()) -> dict:
        logprobs = self._logprobs(entries) if self.logprobs else None
        if self.chat:
            parts = split_reply(self.plan, text) if self.plan else None
            choice = {"index": 0, "message": parts.message() if parts else {"role": "assistant", "content": text},
                      "finish_reason": (parts and parts.finish_reason) or event.finish_reason, "logprobs": logprobs}
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text, "finish_reason": event.finish_reason, "logprobs": logprobs}
            body = self._envelope("text_completion", [choice])
        return {**body, "usage": usage(event)}

    def chunk(self, content, finish_reason: str | None = None, entries: list[TokenLogprob] = ()) -> dict:
        logprobs = self._logprobs(entries) if self.logprobs and entries else None
        if self.chat:
            delta = content if isinstance(content, dict) else ({} if content is None else {"content": content})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": content or "", "finish_reason": finish_reason, "logprobs": logprobs}
        return self._envelope("text_completion", [choice])

    def _logprobs(self, entries: list[TokenLogprob]) -> dict:
        """OpenAI's chat shape (`content`: token, logprob, bytes, top_logprobs per token), or the
        legacy completions one (parallel lists; each place's top tokens plus the chosen one)."""
        if self.chat:
            return {"content": [{**_token(e.data, e.logprob),
                                 "top_logprobs": [_token(data, value) for _, data, value in e.top]}
                                for e in entries], "refusal": None}
        return {"tokens": [_text(e.data) for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{**{_text(data): value for _, data, value in e.top}, _text(e.data): e.logprob}
                                 for e in entries],
                "text_offset": [self.prompt_chars + e.offset for e in entries]}

    def usage_chunk(self, event: Finished) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(kind, []), "usage": usage(event)}


def _text(data: bytes) -> str:
    # a byte-fallback token may hold part of a UTF-8 character: shown with U+FFFD, as OpenAI does;
    # `bytes` keeps the raw bytes
    return data.decode("utf-8", errors="replace")


def _token(data: bytes, logprob: float) -> dict:
    return {"token": _text(data), "logprob": logprob, "bytes": list(data)}
