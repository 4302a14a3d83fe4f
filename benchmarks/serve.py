"""Serving throughput: `loraforge serve` against llama-cpp-python's own server and llama.cpp direct.

One GGUF, built here: a synthetic ~107M-parameter LLaMA (hidden 768, 12 layers, 12/4
heads, ffn 3072, SentencePiece vocab 2000, random weights, the llama2-zh chat template;
`--shape 360m` for a bigger one) exported to Q8_0, so a decode step costs what a real
model of that size costs. Then, one after the other on the same file with the same
per-sequence context and threads (1, then all cores):

  direct     llama_cpp.Llama.create_chat_completion in this process, one stream
  llama.cpp  python -m llama_cpp.server --model FILE           (one sequence at a time)
  loraforge  python -m loraforge serve FILE --parallel 8       (continuous batching)

For each server, N concurrent clients (1, then 8) each send M streamed chat requests with
a fixed max_tokens and the end-of-sequence token disabled (`ignore_eos` for ours, an EOS
logit bias of -inf for llama-cpp-python), so every answer is max_tokens long. Measured:
aggregate generated tokens/s (all tokens / wall time of the phase), p50/p95 time to first
token, p50/p95 total latency, errors. Prints a table; --append adds it to RESULTS.md.

    python benchmarks/serve.py [--clients 1,8] [--requests 4] [--max-tokens 64] [--threads 1,2]
                               [--shape 107m|360m] [--append]
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
NAME = "bench"  # the served model id, for every target
# --shape: 107m is the "~100M at Q8_0"; 360m shows a step bound by reading weights
SHAPES = {"107m": dict(hidden=768, layers=12, heads=12, kv_heads=4, ffn=3072),
          "360m": dict(hidden=1536, layers=14, heads=12, kv_heads=4, ffn=4096)}
QUESTIONS = ["请介绍一下春天的公园。", "怎样才能学好一门外语？", "写一首关于大海的短诗。", "为什么天空是蓝色的？",
             "给我讲一个关于猫的故事。", "如何做一碗西红柿鸡蛋面？", "长城有多长？", "推荐几本适合周末读的书。"]


def build_model(cache: Path, shape: str) -> Path:
    """The Q8_0 GGUF, built once into `cache` (seconds, then reused)."""
    out = cache / f"{NAME}-{shape}-q8_0.gguf"
    if out.exists():
        return out
    from loraforge.data.templates import get_template, jinja_template
    from loraforge.export.gguf_writer import export_gguf
    from loraforge.tiny import TinyShape, build_spm_tokenizer, build_tiny_model

    tok = build_spm_tokenizer([ROOT / "examples" / "data" / "zh_corpus.txt"], cache / "tok", 2000)
    base = build_tiny_model(tok, cache / f"base-{shape}", TinyShape(**SHAPES[shape]))
    (base / "chat_template.jinja").write_text(jinja_template(get_template("llama2-zh")), encoding="utf-8")
    export_gguf(base, [], out, "q8_0")
    shutil.rmtree(base)  # the fp32 checkpoint (0.4–1.4 GB) is not needed once the GGUF exists
    return out


@dataclass
class Call:
    """One request as a client saw it."""

    sent: float
    first: float | None = None  # first answer text
    end: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Phase:
    target: str
    clients: int
    threads: int
    calls: list[Call] = field(default_factory=list)
    wall: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before and after

    def row(self) -> dict:
        ok = [c for c in self.calls if c.error is None]
        ttft = [c.first - c.sent for c in ok if c.first is not None]
        latency = [c.end - c.sent for c in ok]
        tokens = sum(c.tokens for c in ok)
        pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
        return {"target": self.target, "clients": self.clients, "threads": self.threads,
                "requests": len(self.calls), "tokens": tokens,
                "wall_s": self.wall, "tok_s": tokens / self.wall if self.wall else 0.0,
                "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95),
                "lat_p50": pct(latency, 50), "lat_p95": pct(latency, 95),
                "errors": len(self.calls) - len(ok), "load": self.load,
                "first_error": next((c.error for c in self.calls if c.error), None)}


def request_body(i: int | None, max_tokens: int, eos: int) -> dict:
    """Request i's body; None is the warm-up, a question no measured request asks (a cached
    whole prompt would make the first measured answer look faster than any other)."""
    question = "你好" if i is None else QUESTIONS[i % len(QUESTIONS)]
    return {"model": NAME, "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            # every answer runs to max_tokens: ours reads ignore_eos, llama-cpp-python the bias;
            # each ignores the other's field
            "ignore_eos": True, "logit_bias": {str(eos): -100}}


def stream_chat(port: int, body: dict, max_tokens: int) -> Call:
    call = Call(sent=time.perf_counter())
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            call.error = f"{response.status}: {response.read()[:300]!r}"
            return call
        pieces, usage, finish = 0, None, None
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event.get("error"):
                call.error = str(event["error"])
                return call
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    pieces += 1
                    if call.first is None:
                        call.first = time.perf_counter()
                finish = choice.get("finish_reason") or finish
        call.end = time.perf_counter()
        # usage when the server reports it; otherwise an answer cut at max_tokens is max_tokens
        # long (pieces can hold several tokens: a Chinese character held back until whole)
        call.tokens = usage["completion_tokens"] if usage else (max_tokens if finish == "length" else pieces)
        if finish != "length":
            call.error = f"finish_reason {finish!r}: the answer ended before max_tokens"
        conn.close()
    except (OSError, http.client.HTTPException, ValueError) as exc:
        call.error = f"{type(exc).__name__}: {exc}"
    return call


def load_phase(target: str, port: int, clients: int, requests: int, max_tokens: int, eos: int,
               threads: int) -> Phase:
    phase = Phase(target, clients, threads)
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            call = stream_chat(port, request_body(c * requests + r, max_tokens, eos), max_tokens)
            with lock:
                phase.calls.append(call)

    workers = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    before = os.getloadavg()[0]
    start = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    phase.wall = time.perf_counter() - start
    phase.load = (before, os.getloadavg()[0])
    return phase


def direct_phase(model: Path, requests: int, max_tokens: int, ctx: int, threads: int) -> Phase:
    """llama.cpp itself, one stream, no HTTP: the ceiling for a single client."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    eos = llm.token_eos()
    phase = Phase("direct llama.cpp", 1, threads)
    before, start = os.getloadavg()[0], time.perf_counter()
    for i in [None, *range(requests)]:  # the warm-up is not counted
        if i == 0:
            before, start = os.getloadavg()[0], time.perf_counter()
        call = Call(sent=time.perf_counter())
        for chunk in llm.create_chat_completion(request_body(i, max_tokens, eos)["messages"], max_tokens=max_tokens,
                                                temperature=0, logit_bias={eos: -float("inf")}, stream=True):
            choice = chunk["choices"][0]
            if choice["delta"].get("content") and call.first is None:
                call.first = time.perf_counter()
            if choice.get("finish_reason"):
                call.tokens = max_tokens if choice["finish_reason"] == "length" else 0
        call.end = time.perf_counter()
        if i is not None:
            phase.calls.append(call)
    phase.wall = time.perf_counter() - start
    phase.load = (before, os.getloadavg()[0])
    del llm
    return phase


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server subprocess, ready once `probe` answers 200."""

    def __init__(self, command: list[str], port: int, probe: str, timeout: float = 180):
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{probe}", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"{command[2]} did not start: {self.proc.stderr.read()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def server_command(target: str, model: Path, port: int, ctx: int, threads: int, parallel: int) -> tuple[list[str], str]:
    if target == "loraforge":
        return [sys.executable, "-m", "loraforge", "serve", str(model), "--name", NAME, "--port", str(port),
                "--parallel", str(parallel), "--ctx-size", str(ctx), "--threads", str(threads)], "/health"
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", NAME,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(ctx), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--verbose", "false",
            # by default a new request aborts the one streaming; queue them instead, as ours does
            "--interrupt_requests", "false"], "/v1/models"


def run_server(target: str, model: Path, args, eos: int, threads: int) -> list[Phase]:
    port = free_port()
    command, probe = server_command(target, model, port, args.ctx, threads, max(args.clients))
    server = Server(command, port, probe)
    try:
        warm = stream_chat(port, request_body(None, 4, eos), 4)  # first-request costs are not the steady state
        if warm.error:
            sys.exit(f"{target}: the warm-up request failed: {warm.error}")
        label = "loraforge serve" if target == "loraforge" else "llama_cpp.server"
        phases = []
        for clients in args.clients:
            phases.append(load_phase(label, port, clients, args.requests, args.max_tokens, eos, threads))
            print(f"  {label}, {clients} client(s), {threads} thread(s): {phases[-1].row()['tok_s']:.1f} tokens/s",
                  file=sys.stderr)
        return phases
    finally:
        server.stop()


def table(rows: list[dict]) -> str:
    lines = ["| target | threads | clients | requests | tokens | wall s | tokens/s | TTFT p50 s | TTFT p95 s | latency p50 s "
             "| latency p95 s | errors | load avg before→after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['threads']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.1f} | "
                     f"{r['tok_s']:.1f} | {r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} | {r['lat_p50']:.2f} | "
                     f"{r['lat_p95']:.2f} | {r['errors']} | {r['load'][0]:.1f}→{r['load'][1]:.1f} |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for threads in dict.fromkeys(r["threads"] for r in rows):
        out += verdicts_at(threads, [r for r in rows if r["threads"] == threads])
    errors = sum(r["errors"] for r in rows)
    out.append(f"- errors: {errors} (target 0)" + (f"; first: {next(r['first_error'] for r in rows if r['errors'])}"
                                                   if errors else ""))
    return out


def verdicts_at(threads: int, rows: list[dict]) -> list[str]:
    find = lambda target, clients: next((r for r in rows if r["target"] == target and r["clients"] == clients), None)  # noqa: E731
    out = []
    ours8, theirs8 = find("loraforge serve", 8), find("llama_cpp.server", 8)
    if ours8 and theirs8:
        out.append(f"- {threads} thread(s), 8 clients: loraforge serve {ours8['tok_s'] / theirs8['tok_s']:.2f}× llama_cpp.server's "
                   f"aggregate tokens/s (target ≥ 2×); p50 TTFT {ours8['ttft_p50']:.3f} s vs "
                   f"{theirs8['ttft_p50']:.3f} s (target: no worse)")
    ours1, direct = find("loraforge serve", 1), find("direct llama.cpp", 1)
    if ours1 and direct:
        out.append(f"- {threads} thread(s), 1 client: loraforge serve at {ours1['tok_s'] / direct['tok_s']:.1%} of direct llama.cpp's "
                   f"tokens/s (target ≥ 90%)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8", help="comma-separated concurrent client counts")
    parser.add_argument("--requests", type=int, default=4, help="chat requests per client")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="107m", help="the synthetic model's size")
    parser.add_argument("--ctx", type=int, default=512, help="context per sequence, for every target")
    # one thread, then every core: on a busy machine llama.cpp's spinning worker threads
    # oversubscribe the cores and every target slows down by several times, erratically,
    # while one thread stays steady; the load average printed per phase tells which it was
    cores = os.cpu_count() or 1
    parser.add_argument("--threads", default="1" if cores == 1 else f"1,{cores}",
                        help="llama.cpp threads for every target; a list runs each (default 1 and all cores)")
    parser.add_argument("--targets", default="direct,llama_cpp,loraforge", help="which of them to run")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench-serve", help="where the GGUF is kept")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    targets = args.targets.split(",")
    if unknown := set(targets) - {"direct", "llama_cpp", "loraforge"}:
        sys.exit(f"--targets: unknown {', '.join(sorted(unknown))} (direct, llama_cpp, loraforge)")

    args.cache.mkdir(parents=True, exist_ok=True)
    model = build_model(args.cache, args.shape)
    from gguf import GGUFReader

    reader = GGUFReader(str(model))
    eos = int(reader.fields["tokenizer.ggml.eos_token_id"].parts[-1][0])
    started = time.perf_counter()
    phases: list[Phase] = []
    for threads in args.threads:
        if "direct" in targets:
            phases.append(direct_phase(model, args.requests, args.max_tokens, args.ctx, threads))
            print(f"  direct llama.cpp, {threads} thread(s): {phases[-1].row()['tok_s']:.1f} tokens/s", file=sys.stderr)
        for target in ("llama_cpp", "loraforge"):
            if target in targets:
                phases.extend(run_server(target, model, args, eos, threads))
    rows = [p.row() for p in phases]
    text = table(rows)
    notes = verdicts(rows)
    print(text)
    print("\n".join(notes))
    if args.append:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        with (ROOT / "benchmarks" / "RESULTS.md").open("a", encoding="utf-8") as fh:
            fh.write(f"\n## serve.py — {stamp} — {platform.machine()}, {os.cpu_count()} cores\n\n"
                     f"{model.name} ({model.stat().st_size / 1e6:.0f} MB: synthetic LLaMA "
                     f"{' '.join(f'{k} {v}' for k, v in SHAPES[args.shape].items())}, vocab 2000, random weights), "
                     f"{args.requests} streamed chat requests per client, "
                     f"max_tokens {args.max_tokens} with EOS disabled, temperature 0, context {args.ctx} per "
                     f"sequence, the same llama.cpp threads for every target; loraforge serve --parallel "
                     f"{max(args.clients)}; llama_cpp.server --interrupt_requests false (by default a new "
                     f"request aborts the one streaming). tokens/s = all generated tokens / wall time of the phase. "
                     f"Run took {time.perf_counter() - started:.0f} s; the machine is shared, so the 1-minute "
                     f"load average is given per phase.\n\n{text}\n\n" + "\n".join(notes) + "\n")


if __name__ == "__main__":
    main()
