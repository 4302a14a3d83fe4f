"""Serving throughput: `loraforge serve` against llama.cpp's llama-server, llama-cpp-python's server, llama.cpp direct.

One GGUF, built here: a synthetic ~107M-parameter LLaMA (hidden 768, 12 layers, 12/4
heads, ffn 3072, SentencePiece vocab 2000, random weights, the llama2-zh chat template;
`--shape 360m` for a bigger one) exported to Q8_0, so a decode step costs what a real
model of that size costs. Then, one after the other on the same file with the same
per-sequence context and threads (default: every usable core):

  direct        llama_cpp.Llama.create_chat_completion in this process, one stream
  llama_cpp     python -m llama_cpp.server --model FILE           (one sequence at a time)
  llama-server  llama.cpp's own server, -np 8 -kvu --poll P       (continuous batching, C++)
  loraforge     python -m loraforge serve FILE --parallel 8       (continuous batching)

llama-server is built once from the llama.cpp sources vendored in the installed
llama-cpp-python's sdist (pip download, then CMake: ~6 minutes on 2 cores, more on a busy
machine) into ~/.cache/loraforge-bench/llama-server-<version>/; it is never a test or CI
dependency. --background runs every target again beside a CPU-bound process (`pinned`:
`python -c "while True: pass"` under `taskset -c 0`; `free`: the same, unpinned), so a
busy machine's cost is measured, not guessed.

For each server, N concurrent clients (1, then 8) each send M streamed chat requests with
a fixed max_tokens and the end-of-sequence token disabled (`ignore_eos` for ours, an EOS
logit bias of -inf for llama-cpp-python), so every answer is max_tokens long. Measured:
aggregate generated tokens/s (all tokens / wall time of the phase), p50/p95 time to first
token, p50/p95 total latency, errors, and for the two batching servers the llama_decode
calls of the phase from their /metrics (ms per step, generated tokens per step: where the
time goes). Prints a table; --append adds it to RESULTS.md.

    python benchmarks/serve.py [--clients 1,8] [--requests 4] [--max-tokens 64] [--threads auto|1,2]
                               [--background none,pinned] [--poll 50] [--shape 107m|360m] [--append]
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
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
    threads: str  # "2", or "≤2" where loraforge picks fewer while other processes use the cores
    background: str = "none"
    calls: list[Call] = field(default_factory=list)
    wall: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before and after
    steps: float | None = None  # llama_decode calls in the phase, from the server's /metrics

    def row(self) -> dict:
        ok = [c for c in self.calls if c.error is None]
        ttft = [c.first - c.sent for c in ok if c.first is not None]
        latency = [c.end - c.sent for c in ok]
        tokens = sum(c.tokens for c in ok)
        pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
        return {"target": self.target, "clients": self.clients, "threads": self.threads,
                "background": self.background, "requests": len(self.calls), "tokens": tokens,
                "ms_step": 1000 * self.wall / self.steps if self.steps else None,
                "tok_step": tokens / self.steps if self.steps else None,
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


def decode_calls(port: int, target: str) -> float | None:
    """llama_decode calls so far, as the server counts them (None: no such counter)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return None
    name = "loraforge_decode_steps_total" if target == "loraforge" else "llamacpp:n_decode_total"
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name) and line[len(name)] in " {"]
    return sum(values) if values else None


def load_phase(target: str, port: int, clients: int, requests: int, max_tokens: int, eos: int,
               threads: str, background: str = "none", counter: str | None = None) -> Phase:
    phase = Phase(target, clients, threads, background)
    steps_before = decode_calls(port, counter) if counter else None
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
    if steps_before is not None and (steps_after := decode_calls(port, counter)) is not None:
        phase.steps = steps_after - steps_before
    return phase


def direct_phase(model: Path, requests: int, max_tokens: int, ctx: int, threads: int, background: str) -> Phase:
    """llama.cpp itself, one stream, no HTTP: the ceiling for a single client."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    eos = llm.token_eos()
    phase = Phase("direct llama.cpp", 1, str(threads), background)
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
    """A server subprocess, ready once `probe` answers 200; its log goes to a file (a pipe
    nobody reads would fill and stop llama-server, which logs every request)."""

    def __init__(self, command: list[str], port: int, probe: str, log: Path, timeout: float = 180):
        self.log = log
        with log.open("w") as sink:
            self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sink, text=True,
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
                sys.exit(f"{Path(command[0]).name} {command[1:3]} did not start: {log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


LABELS = {"loraforge": "loraforge serve", "llama-server": "llama-server", "llama_cpp": "llama_cpp.server"}


def server_command(target: str, model: Path, port: int, args, threads: int) -> tuple[list[str], str]:
    parallel, ctx = max(args.clients), args.ctx
    if target == "loraforge":
        return [sys.executable, "-m", "loraforge", "serve", str(model), "--name", NAME, "--port", str(port),
                "--parallel", str(parallel), "--ctx-size", str(ctx), "--threads", str(threads)], "/health"
    if target == "llama-server":
        # as loraforge serves: one unified KV cache of parallel × ctx cells, flash attention
        # off, every slot decoded in one llama_decode (continuous batching is its default)
        return [str(args.llama_server), "-m", str(model), "-a", NAME, "--host", "127.0.0.1", "--port", str(port),
                "-np", str(parallel), "-c", str(parallel * ctx), "-kvu", "-t", str(threads), "-tb", str(threads),
                "--poll", str(args.poll), "-fa", "off", "--metrics", "--no-webui"], "/health"
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", NAME,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(ctx), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--verbose", "false",
            # by default a new request aborts the one streaming; queue them instead, as ours does
            "--interrupt_requests", "false"], "/v1/models"


def run_server(target: str, model: Path, args, eos: int, threads: int, background: str) -> list[Phase]:
    port = free_port()
    command, probe = server_command(target, model, port, args, threads)
    server = Server(command, port, probe, args.cache / f"{target}.log")
    # loraforge takes `threads` as its most: fewer while other processes use the cores
    label = f"≤{threads}" if target == "loraforge" else str(threads)
    try:
        warm = stream_chat(port, request_body(None, 4, eos), 4)  # first-request costs are not the steady state
        if warm.error:
            sys.exit(f"{target}: the warm-up request failed: {warm.error}")
        phases = []
        for clients in args.clients:
            phases.append(load_phase(LABELS[target], port, clients, args.requests, args.max_tokens, eos, label,
                                     background, target if target != "llama_cpp" else None))
            progress(phases[-1])
        return phases
    finally:
        server.stop()


def progress(phase: Phase) -> None:
    r = phase.row()
    step = f", {r['ms_step']:.1f} ms/step" if r["ms_step"] else ""
    print(f"  {r['target']}, {r['clients']} client(s), {r['threads']} thread(s), background {r['background']}: "
          f"{r['tok_s']:.1f} tokens/s, TTFT p50 {r['ttft_p50']:.3f} s{step}, {r['errors']} errors; "
          f"load average {r['load'][0]:.1f}→{r['load'][1]:.1f}", file=sys.stderr)


class Background:
    """A CPU-bound process beside the servers: `pinned` to core 0, or `free` to roam."""

    def __init__(self, kind: str):
        self.kind, self.proc = kind, None

    def __enter__(self) -> Background:
        if self.kind != "none":
            spin = [sys.executable, "-c", "while True: pass"]
            self.proc = subprocess.Popen(["taskset", "-c", "0", *spin] if self.kind == "pinned" else spin)
            time.sleep(1)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # the Makefile's LLAMA_CFLAGS


def llama_server_binary(cache: Path) -> tuple[Path, str]:
    """llama.cpp's llama-server from the sources vendored in the installed llama-cpp-python's
    sdist: built once (CMake, minutes), then reused. Returns the binary and the version."""
    version = importlib.metadata.version("llama_cpp_python")
    home = cache / f"llama-server-noamx-{version}"
    binary = home / "src" / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary, version
    home.mkdir(parents=True, exist_ok=True)
    sdist = home / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        print(f"downloading the llama-cpp-python {version} sdist for its llama.cpp sources", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(home)], check=True)
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = "src/" + m.name[len(prefix):]
        tar.extractall(home, members, filter="data")
    src, jobs = home / "src", str(len(os.sched_getaffinity(0)))
    print(f"building llama-server in {src}/build (once; ~6 min on 2 cores)", file=sys.stderr)
    # the same build as the Makefile's llama-cpp-python: native, without the AMX kernels (LLAMA_CFLAGS)
    flags = {"CFLAGS": NO_AMX, "CXXFLAGS": NO_AMX}
    subprocess.run(["cmake", "-B", "build", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_SERVER=ON",
                    "-DCMAKE_BUILD_TYPE=Release"], cwd=src, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, **flags})
    subprocess.run(["cmake", "--build", "build", "--target", "llama-server", "-j", jobs], cwd=src, check=True)
    return binary, version


def table(rows: list[dict]) -> str:
    lines = ["| background | target | threads | clients | requests | tokens | wall s | tokens/s | TTFT p50 s | TTFT p95 s "
             "| latency p50 s | latency p95 s | ms/step | tokens/step | errors | load avg before→after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        step = f"{r['ms_step']:.1f} | {r['tok_step']:.2f}" if r["ms_step"] else "– | –"
        lines.append(f"| {r['background']} | {r['target']} | {r['threads']} | {r['clients']} | {r['requests']} | "
                     f"{r['tokens']} | {r['wall_s']:.1f} | {r['tok_s']:.1f} | {r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} | "
                     f"{r['lat_p50']:.2f} | {r['lat_p95']:.2f} | {step} | {r['errors']} | "
                     f"{r['load'][0]:.1f}→{r['load'][1]:.1f} |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for background, threads in dict.fromkeys((r["background"], r["threads"].lstrip("≤")) for r in rows):
        out += verdicts_at(f"{threads} thread(s), background {background}",
                           [r for r in rows if (r["background"], r["threads"].lstrip("≤")) == (background, threads)])
    out += robustness(rows)
    errors = sum(r["errors"] for r in rows)
    out.append(f"- errors: {errors} (target 0)" + (f"; first: {next(r['first_error'] for r in rows if r['errors'])}"
                                                   if errors else ""))
    return out


def verdicts_at(where: str, rows: list[dict]) -> list[str]:
    find = lambda target, clients: next((r for r in rows if r["target"] == target and r["clients"] == clients), None)  # noqa: E731
    out = []
    for clients in sorted({r["clients"] for r in rows}):
        ours, cpp = find("loraforge serve", clients), find("llama-server", clients)
        if ours and cpp:
            target = "≥ 1×, TTFT no worse" if clients > 1 else "≥ 0.95×"
            out.append(f"- {where}, {clients} client(s): loraforge serve {ours['tok_s'] / cpp['tok_s']:.2f}× "
                       f"llama-server's tokens/s (target {target}); p50 TTFT {ours['ttft_p50']:.3f} s vs "
                       f"{cpp['ttft_p50']:.3f} s" + (f"; {ours['ms_step']:.1f} vs {cpp['ms_step']:.1f} ms per "
                                                     f"llama_decode, {ours['tok_step']:.2f} vs {cpp['tok_step']:.2f} "
                                                     "tokens per step" if ours["ms_step"] and cpp["ms_step"] else ""))
    ours8, theirs8 = find("loraforge serve", 8), find("llama_cpp.server", 8)
    if ours8 and theirs8:
        out.append(f"- {where}, 8 clients: loraforge serve {ours8['tok_s'] / theirs8['tok_s']:.2f}× llama_cpp.server's "
                   f"aggregate tokens/s (target ≥ 2×)")
    ours1, direct = find("loraforge serve", 1), find("direct llama.cpp", 1)
    if ours1 and direct:
        out.append(f"- {where}, 1 client: loraforge serve at {ours1['tok_s'] / direct['tok_s']:.1%} of direct "
                   f"llama.cpp's tokens/s (target ≥ 90%)")
    return out


def robustness(rows: list[dict]) -> list[str]:
    """Each server's tokens/s beside the background process, against its own on the quiet run."""
    quiet = {(r["target"], r["threads"], r["clients"]): r for r in rows if r["background"] == "none"}
    out = []
    for r in rows:
        base = quiet.get((r["target"], r["threads"], r["clients"]))
        if r["background"] != "none" and base and base["tok_s"]:
            goal = " (target ≥ 50%)" if r["target"] == "loraforge serve" else ""
            out.append(f"- background {r['background']}: {r['target']} ({r['threads']} threads, {r['clients']} "
                       f"client(s)) keeps {r['tok_s'] / base['tok_s']:.0%} of its quiet tokens/s{goal}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8", help="comma-separated concurrent client counts")
    parser.add_argument("--requests", type=int, default=4, help="chat requests per client")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="107m", help="the synthetic model's size")
    parser.add_argument("--ctx", type=int, default=512, help="context per sequence, for every target")
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--threads", default=str(cores),
                        help="llama.cpp threads for every target, a list runs each (default: every usable core, "
                             "llama-server's own default; loraforge takes it as its most)")
    parser.add_argument("--background", default="none,pinned",
                        help="beside which CPU-bound process to run everything: none, pinned (taskset -c 0), free")
    parser.add_argument("--poll", type=int, default=50,
                        help="llama-server --poll (its default 50; ignored by an OpenMP build of ggml, as these are)")
    parser.add_argument("--targets", default="direct,llama_cpp,llama-server,loraforge", help="which of them to run")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench-serve", help="where the GGUF is kept")
    parser.add_argument("--build-cache", type=Path, default=Path.home() / ".cache" / "loraforge-bench",
                        help="where llama-server is built, once")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    backgrounds = args.background.split(",")
    targets = args.targets.split(",")
    if unknown := set(targets) - {"direct", *LABELS}:
        sys.exit(f"--targets: unknown {', '.join(sorted(unknown))} (direct, {', '.join(LABELS)})")
    if unknown := set(backgrounds) - {"none", "pinned", "free"}:
        sys.exit(f"--background: unknown {', '.join(sorted(unknown))} (none, pinned, free)")

    args.cache.mkdir(parents=True, exist_ok=True)
    model = build_model(args.cache, args.shape)
    versions = [f"llama-cpp-python {importlib.metadata.version('llama_cpp_python')}"]
    if "llama-server" in targets:
        args.llama_server, version = llama_server_binary(args.build_cache)
        versions.append(f"llama-server from its vendored llama.cpp ({version}, GGML_NATIVE without AMX, OpenMP)")
    from gguf import GGUFReader

    reader = GGUFReader(str(model))
    eos = int(reader.fields["tokenizer.ggml.eos_token_id"].parts[-1][0])
    started = time.perf_counter()
    phases: list[Phase] = []
    for background in backgrounds:
        with Background(background):
            for threads in args.threads:
                if "direct" in targets:
                    phases.append(direct_phase(model, args.requests, args.max_tokens, args.ctx, threads, background))
                    progress(phases[-1])
                for target in LABELS:
                    if target in targets:
                        phases.extend(run_server(target, model, args, eos, threads, background))
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
                     f"sequence, the same llama.cpp threads for every target (loraforge: at most that many); "
                     f"loraforge serve --parallel {max(args.clients)}; llama-server -np {max(args.clients)} "
                     f"-c {max(args.clients) * args.ctx} -kvu -fa off --poll {args.poll}; llama_cpp.server "
                     f"--interrupt_requests false (by default a new request aborts the one streaming). "
                     f"{'; '.join(versions)}. Background `pinned`: `python -c \"while True: pass\"` under "
                     f"`taskset -c 0`; `free`: the same unpinned. tokens/s = all generated tokens / wall time of "
                     f"the phase; ms/step = wall time / llama_decode calls in the phase (the servers' /metrics). "
                     f"Run took {time.perf_counter() - started:.0f} s; the machine is shared, so the 1-minute "
                     f"load average is given per phase.\n\n{text}\n\n" + "\n".join(notes) + "\n")


if __name__ == "__main__":
    main()
