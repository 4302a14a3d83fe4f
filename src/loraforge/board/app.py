"""`loraforge board`: the whole workflow in a browser, over the same FastAPI stack as `serve`.

The page (board/web/index.html, one offline file) builds a YAML config from a form, shows it
(editable) with the equivalent command, checks it with `read_config` (the CLI's own errors),
previews the data with `loraforge data check` itself, and starts `loraforge train` on it as a
subprocess (board/jobs.py). While it runs, /api/run/events streams trainer_log.jsonl's new lines
as server-sent events. Chat loads a run or a .gguf into `loraforge serve` and proxies serve's
own page (board/chat.py); Export and Evaluate run the CLI's export and eval commands as jobs
and read their reports back (board/tasks.py). Every path is confined to the roots
(board/roots.py): paths in a YAML are relative to the first root, which is also the jobs'
working directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse

from loraforge import __version__
from loraforge.board import tasks
from loraforge.board.chat import ChatServer
from loraforge.board.jobs import (
    KINDS,
    YAML_FILE,
    Busy,
    Jobs,
    job_files,
    job_state,
    log_tail,
    read_lines,
    read_log,
    run_state,
)
from loraforge.board.roots import Outside, Roots, data_folder_info, is_run_dir, model_info
from loraforge.errors import LoraforgeError
from loraforge.models import ModelRef

PAGE = Path(__file__).parent / "web" / "index.html"
CHECK_TIMEOUT_S = 600
EVENT_POLL_S = 0.5
LOG_TAIL_LINES = 30
TOKEN_COOKIE = "loraforge_board_token"  # how the embedded chat page's own requests carry --token


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _defaults() -> dict:
    """The form's defaults and choices, from the config schema (one home for both)."""
    from typing import get_args

    from loraforge.config import Config, DataConfig, LoraConfig, TrainConfig
    from loraforge.data.templates import TEMPLATES
    from loraforge.eval.quant_quality import DEFAULT_QUANTS
    from loraforge.export.schemes import SCHEMES

    fields = Config.model_fields
    return {"stages": list(get_args(fields["stage"].annotation)), "methods": list(get_args(fields["method"].annotation)),
            "templates": sorted(TEMPLATES),
            "quants": [{"name": s.name, "about": s.about} for s in SCHEMES.values()],
            "eval_quants": list(DEFAULT_QUANTS),
            "train": {k: TrainConfig.model_fields[k].default for k in ("epochs", "batch_size", "grad_accum", "lr",
                                                                       "logging_steps", "save_steps", "max_steps")},
            "data": {k: DataConfig.model_fields[k].default for k in ("cutoff_len", "max_samples", "val_size")},
            "lora": {k: LoraConfig.model_fields[k].default for k in ("r", "alpha", "dropout")}}


def build_app(roots: Roots, token: str | None = None, jobs: Jobs | None = None) -> FastAPI:
    import httpx

    jobs = jobs or Jobs(roots.paths[0])
    chat = ChatServer(roots.paths[0])
    proxy = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(jobs.stop)  # a job does not outlive its board, nor does the chat model
        await asyncio.to_thread(chat.close)
        await proxy.aclose()

    app = FastAPI(title="loraforge board", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.jobs, app.state.chat = jobs, chat
    workdir = roots.paths[0]

    def state_of(folder: Path) -> dict:
        return run_state(folder, active=jobs.running("train") == folder)

    def authorize(request: Request) -> None:
        if not token:
            return
        given = [request.headers.get("authorization", "").removeprefix("Bearer "),
                 request.query_params.get("token", ""), unquote(request.cookies.get(TOKEN_COOKIE, ""))]
        if not any(value and hmac.compare_digest(value.encode(), token.encode()) for value in given):
            raise HttpError(401, "missing or wrong token: this board was started with --token")

    def inside(path: str | None, what: str) -> Path:
        if not path:
            raise HttpError(400, f"{what}: no path given")
        try:
            return roots.resolve(path)
        except Outside as exc:
            raise HttpError(403, f"{what}: {exc}") from None

    def existing(path: str | None, what: str) -> Path:
        full = inside(path, what)
        if not full.exists():
            raise HttpError(404, f"{what}: no such file or folder: {path}")
        return full

    @app.exception_handler(HttpError)
    async def http_error(request: Request, exc: HttpError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(LoraforgeError)
    async def bad_input(request: Request, exc: LoraforgeError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_bytes(), headers={"Cache-Control": "no-cache"})

    @app.get("/api/info")
    async def info(request: Request):
        authorize(request)
        current = jobs.current()
        return {"version": __version__, "roots": [str(r) for r in roots.paths], "defaults": _defaults(),
                "running": {"kind": current[0], "run": roots.shown(current[1])} if current else None}

    @app.get("/api/models")
    async def models(request: Request):
        authorize(request)
        found = []
        for folder in roots.walk():
            spec = model_info(folder)
            if spec is not None and not is_run_dir(folder):
                found.append({"path": roots.shown(folder), **spec})
        return {"models": found}

    @app.get("/api/data")
    async def data(request: Request):
        authorize(request)
        found = []
        for folder in roots.walk():
            names = data_folder_info(folder)
            if names is not None:
                found.append({"dir": roots.shown(folder), "datasets": names})
        return {"folders": found}

    def validated(yaml_text: str) -> tuple[Path, list[str], object]:
        """(the YAML saved to a temporary file, the notes, the config) — or the CLI's error."""
        from loraforge.config import read_config

        handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=workdir, delete=False, encoding="utf-8",
                                             prefix=".board-")
        with handle:
            handle.write(yaml_text)
        path = Path(handle.name)
        try:
            config, notes = read_config(path)
        except LoraforgeError as exc:
            path.unlink(missing_ok=True)
            raise HttpError(400, str(exc).replace(str(path), "board.yaml")) from None
        named = [("model.path", config.model.path), ("model.tokenizer", config.model.tokenizer),
                 ("data.dir", config.data.dir), ("data.cache_dir", config.data.cache_dir),
                 ("train.output_dir", config.train.output_dir), ("train.deepspeed", config.train.deepspeed)]
        # a dataset given as a file path (not a dataset_info.json name) is a path too
        named += [("data.datasets", name) for name in config.data.datasets
                  if "/" in name or "\\" in name or name.startswith("~")]
        for what, value in named:
            if value:
                try:
                    roots.resolve(workdir / Path(value).expanduser())
                except Outside as exc:
                    path.unlink(missing_ok=True)
                    raise HttpError(403, f"{what}: {exc}") from None
        return path, notes, config

    async def body_json(request: Request, shape: str = "a JSON object") -> dict:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise HttpError(400, f"the request body is not JSON: send {shape}") from None
        if not isinstance(body, dict):
            raise HttpError(400, f"send {shape}")
        return body

    async def body_yaml(request: Request) -> str:
        shape = "{\"yaml\": \"…\"}"
        body = await body_json(request, shape)
        if not isinstance(body.get("yaml"), str):
            raise HttpError(400, f"send {shape}: the config as YAML text")
        return body["yaml"]

    @app.post("/api/validate")
    async def validate(request: Request):
        authorize(request)
        path, notes, config = validated(await body_yaml(request))
        path.unlink(missing_ok=True)
        run_dir = roots.resolve(workdir / config.train.output_dir)
        return {"ok": True, "notes": notes, "output_dir": roots.shown(run_dir),
                "command": f"loraforge train {roots.shown(run_dir)}/{YAML_FILE}"}

    @app.post("/api/check")
    async def check(request: Request):
        """`loraforge data check` on the YAML, as a subprocess: its own output, whatever it says."""
        authorize(request)
        path, _, _ = validated(await body_yaml(request))
        try:
            done = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "loraforge", "data", "check", str(path)], cwd=workdir,
                capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
        finally:
            path.unlink(missing_ok=True)
        return {"returncode": done.returncode, "output": done.stdout,
                "error": done.stderr.replace(str(path), "board.yaml").strip()}

    @app.post("/api/train")
    async def train(request: Request):
        authorize(request)
        yaml_text = await body_yaml(request)
        path, _, config = validated(yaml_text)
        path.unlink(missing_ok=True)
        run_dir = roots.resolve(workdir / config.train.output_dir)
        command = start_job(lambda: jobs.start_train(run_dir, yaml_text))
        return {"run": roots.shown(run_dir), "command": command}

    def start_job(start) -> str:
        """Start a job; a second one while one runs is 409, naming it. The command, as shown."""
        try:
            return roots.shorten(start())
        except Busy as exc:
            raise HttpError(409, roots.shorten(str(exc))) from None

    @app.get("/api/runs")
    async def runs(request: Request):
        authorize(request)
        return {"runs": [{"path": roots.shown(folder), **state_of(folder)}
                         for folder in roots.walk() if is_run_dir(folder)]}

    def run_dir_of(path: str | None) -> Path:
        folder = existing(path, "run")
        if not is_run_dir(folder):
            raise HttpError(404, f"run: {path} is not a run directory (no loraforge.yaml or board.json)")
        return folder

    @app.get("/api/run")
    async def run(request: Request, path: str | None = None):
        authorize(request)
        folder = run_dir_of(path)
        rows, _ = read_lines(folder / "trainer_log.jsonl", 0)
        return {"path": roots.shown(folder), **state_of(folder), "rows": rows,
                "log": log_tail(job_files(folder, "train")[1], LOG_TAIL_LINES)}

    def kind_of(kind: str) -> str:
        if kind not in KINDS:
            raise HttpError(400, f"kind {kind!r}: one of {', '.join(KINDS)}")
        return kind

    def job_of(folder: Path, kind: str) -> dict | None:
        """A job's state; for training, the run's (steps, checkpoints) too."""
        if kind == "train":
            return state_of(folder)
        state = job_state(folder, kind, active=jobs.running(kind) == folder)
        return state and {**state, "command": roots.shorten(state["command"] or "")}

    @app.get("/api/run/job")
    async def job(request: Request, path: str | None = None, kind: str = "train"):
        """A run's export or eval job (or training): its state and the last lines it printed."""
        authorize(request)
        folder, kind = run_dir_of(path), kind_of(kind)
        return {"path": roots.shown(folder), "job": job_of(folder, kind),
                "log": [roots.shorten(line) for line in log_tail(job_files(folder, kind)[1], LOG_TAIL_LINES)]}

    @app.get("/api/run/events")
    async def events(request: Request, path: str | None = None, kind: str = "train"):
        """A job as it runs: trainer_log.jsonl's new lines as `row` events (training), what it prints
        as `log` lines and `progress` (a progress bar's newest state), then the final `state`."""
        authorize(request)
        folder, kind = run_dir_of(path), kind_of(kind)
        log_file = job_files(folder, kind)[1]

        offsets = {"rows": 0, "log": 0}

        def new_events() -> list[str]:
            """What was written since the last call, as server-sent events."""
            out = []
            if kind == "train":
                rows, offsets["rows"] = read_lines(folder / "trainer_log.jsonl", offsets["rows"])
                out += [f"event: row\ndata: {json.dumps(row)}\n\n" for row in rows]
            pieces, offsets["log"] = read_log(log_file, offsets["log"])
            out += [f"event: {'progress' if progress else 'log'}\ndata: "
                    f"{json.dumps(roots.shorten(text), ensure_ascii=False)}\n\n" for text, progress in pieces]
            return out

        async def stream():
            while True:
                for event in new_events():
                    yield event
                # this board's own job needs no look at the disk; anything else is read from it
                active = jobs.running(kind) == folder
                state = None if active else job_of(folder, kind) or {"kind": kind, "state": "none"}
                if state is not None and state["state"] != "running":
                    for event in new_events():  # what it wrote while ending
                        yield event
                    yield f"event: state\ndata: {json.dumps(state)}\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(EVENT_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/api/run/loss.png")
    async def loss_png(request: Request, path: str | None = None):
        authorize(request)
        png = run_dir_of(path) / "loss.png"
        if not png.is_file():
            raise HttpError(404, f"run {path}: no loss.png yet (it is drawn when training ends)")
        return FileResponse(png, media_type="image/png")

    @app.get("/api/run/file")
    async def run_file(request: Request, path: str | None = None, name: str = ""):
        """A plot an evaluation drew (a .png inside the run)."""
        authorize(request)
        folder = run_dir_of(path)
        png = inside(str(folder / name), "file")
        if png.suffix != ".png" or folder not in png.parents or not png.is_file():
            raise HttpError(404, f"run {path}: no plot {name}")
        return FileResponse(png, media_type="image/png")

    @app.post("/api/run/stop")
    async def stop(request: Request, path: str | None = None, kind: str = "train"):
        authorize(request)
        folder, kind = run_dir_of(path), kind_of(kind)
        if not await asyncio.to_thread(jobs.stop, folder, kind):
            raise HttpError(409, f"run {path} has no {kind} job running here")
        return {"path": roots.shown(folder), **(job_of(folder, kind) or {})}

    @app.post("/api/run/resume")
    async def resume(request: Request, path: str | None = None):
        authorize(request)
        folder = run_dir_of(path)
        yaml_file = folder / YAML_FILE
        if not yaml_file.is_file():
            raise HttpError(409, f"run {path} was not started from the board (no {YAML_FILE}): resume it with "
                                 f"loraforge train CONFIG train.resume_from_checkpoint=last")
        overrides = ["train.resume_from_checkpoint=last"] if state_of(folder)["last_checkpoint"] else \
            ["train.overwrite_output_dir=true"]
        command = start_job(lambda: jobs.start_train(folder, yaml_file.read_text(encoding="utf-8"), overrides))
        return {"run": roots.shown(folder), "command": command}

    def finished_run(path) -> tuple[Path, ModelRef]:
        folder = run_dir_of(path if isinstance(path, str) else None)
        if jobs.running("train") == folder:
            raise HttpError(409, f"run {path} is still training: wait for it to finish, or stop it")
        return folder, tasks.run_model(folder, workdir)

    def names(body: dict, key: str) -> list[str]:
        value = body.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise HttpError(400, f"{key}: a list of names")
        return value

    @app.post("/api/export")
    async def export(request: Request):
        """`export gguf --verify` per quant type, `export ollama`, `merge`: one job, in RUN/export/."""
        authorize(request)
        body = await body_json(request)
        folder, ref = finished_run(body.get("path"))
        out_dir = folder / tasks.EXPORT_DIR
        commands = tasks.export_commands(folder, ref, out_dir, names(body, "quants"), bool(body.get("verify", True)),
                                         bool(body.get("merged")), bool(body.get("ollama")))
        command = start_job(lambda: jobs.start("export", folder, commands))
        return {"run": roots.shown(folder), "command": command}

    @app.post("/api/eval")
    async def evaluate(request: Request):
        """`eval generate RUN --compare BASE` on the run's data and/or `eval quant RUN --text T`."""
        authorize(request)
        body = await body_json(request)
        text = existing(str(body["text"]), "text") if body.get("quant") and body.get("text") else None
        folder, ref = finished_run(body.get("path"))
        limit = body.get("limit")
        if limit not in (None, "") and (not str(limit).isdigit() or int(limit) < 1):
            raise HttpError(400, f"limit {limit!r}: a positive number of examples (or empty for all)")
        commands = tasks.eval_commands(folder, ref, bool(body.get("generate")), int(limit) if limit else None,
                                       bool(body.get("quant")), names(body, "quants"), text)
        command = start_job(lambda: jobs.start("eval", folder, commands))
        return {"run": roots.shown(folder), "command": command}

    @app.get("/api/run/outputs")
    async def run_outputs(request: Request, path: str | None = None):
        """The run's exports (sizes, parity verdicts) and evaluations (tables, plots)."""
        authorize(request)
        folder = run_dir_of(path)
        found = tasks.outputs(folder)
        for report in found["evals"]:
            report["markdown"] = roots.shorten(report["markdown"])
        for gguf in found["exports"]:
            gguf["parity"] = gguf["parity"] and roots.shorten(gguf["parity"])
        return {"path": roots.shown(folder), **found}

    @app.get("/api/texts")
    async def texts(request: Request):
        """The .txt files under the roots: held-out text for eval quant."""
        authorize(request)
        return {"texts": [roots.shown(p) for folder in roots.walk() for p in sorted(folder.glob("*.txt"))
                          if p.is_file()]}

    # ---------------------------------------------------------------- chat: serve's own page, proxied

    @app.get("/api/chat/models")
    async def chat_models(request: Request):
        """What the Chat tab can load: finished runs, base models and .gguf files under the roots."""
        authorize(request)
        found = []
        for folder in roots.walk():
            if is_run_dir(folder):
                if run_state(folder)["state"] == "finished":
                    found.append({"path": roots.shown(folder), "kind": "run"})
            elif model_info(folder) is not None:
                found.append({"path": roots.shown(folder), "kind": "model"})
            found += [{"path": roots.shown(p), "kind": "gguf", "bytes": p.stat().st_size}
                      for p in sorted(folder.glob("*.gguf")) if p.is_file()]
        return {"models": found, **chat.status()}

    @app.get("/api/chat")
    async def chat_status(request: Request):
        authorize(request)
        return chat.status()

    @app.post("/api/chat/load")
    async def chat_load(request: Request):
        """Serve a run (its base + adapters through transformers) or a .gguf (llama.cpp) for the chat page."""
        authorize(request)
        body = await body_json(request)
        target = existing(body.get("path"), "model")
        if target.is_dir() and is_run_dir(target):
            tasks.run_model(target, workdir)  # a run without weights is refused here, with the fix
        await asyncio.to_thread(chat.load, target, roots.shown(target))
        return chat.status()

    @app.post("/api/chat/unload")
    async def chat_unload(request: Request):
        authorize(request)
        await asyncio.to_thread(chat.stop)
        return chat.status()

    @app.api_route("/chat/{rest:path}", methods=["GET", "POST"])
    async def chat_proxy(request: Request, rest: str):
        """serve's page and API under /chat/, from the loaded model's loopback server."""
        authorize(request)
        base = chat.url
        if base is None:
            raise HttpError(503, "no chat model is loaded: pick a run or a .gguf in the Chat tab and press Load")
        params = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        upstream = proxy.build_request(
            request.method, f"{base}/{rest}", params=params, content=await request.body(),
            headers={"Authorization": f"Bearer {chat.key}",
                     "Content-Type": request.headers.get("content-type", "application/json")})
        try:
            response = await proxy.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            raise HttpError(502, f"the chat model's server did not answer: {exc}") from None
        passed = {k: v for k, v in response.headers.items() if k.lower() in ("content-type", "cache-control")}
        if "text/event-stream" not in response.headers.get("content-type", ""):
            content = await response.aread()
            await response.aclose()
            return Response(content, status_code=response.status_code, headers=passed)

        async def relay():
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:  # the page's Stop (or a closed tab) closes serve's stream too, which stops generating
                await response.aclose()

        return StreamingResponse(relay(), status_code=response.status_code, headers=passed)

    return app


def serve_board(roots: list[str], host: str, port: int, token: str | None) -> None:
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise LoraforgeError(f"--host {host} makes the board reachable from other machines: give --token T too "
                             "(every request must then carry it)")
    folders = Roots.of(roots or ["."])
    for folder in folders.paths:
        if not folder.is_dir():
            raise LoraforgeError(f"--root {folder}: no such folder")
    app = build_app(folders, token)
    print(f"loraforge board on http://{host}:{port}/ (roots: {', '.join(map(str, folders.paths))})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
