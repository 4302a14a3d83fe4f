"""`loraforge board`: the training workflow in a browser, over the same FastAPI stack as `serve`.

The page (board/web/index.html, one offline file) builds a YAML config from a form, shows it
(editable) with the equivalent command, checks it with `read_config` (the CLI's own errors),
previews the data with `loraforge data check` itself, and starts `loraforge train` on it as a
subprocess (board/jobs.py). While it runs, /api/run/events streams trainer_log.jsonl's new lines
as server-sent events. Every path is confined to the roots (board/roots.py): paths in a YAML are
relative to the first root, which is also the jobs' working directory.
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

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse

from loraforge import __version__
from loraforge.board.jobs import LOG_FILE, YAML_FILE, Busy, Jobs, read_lines, read_new, run_state
from loraforge.board.roots import Outside, Roots, data_folder_info, is_run_dir, model_info
from loraforge.errors import LoraforgeError

PAGE = Path(__file__).parent / "web" / "index.html"
CHECK_TIMEOUT_S = 600
EVENT_POLL_S = 0.5
LOG_TAIL_LINES = 30


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _defaults() -> dict:
    """The form's defaults and choices, from the config schema (one home for both)."""
    from typing import get_args

    from loraforge.config import Config, DataConfig, LoraConfig, TrainConfig
    from loraforge.data.templates import TEMPLATES

    fields = Config.model_fields
    return {"stages": list(get_args(fields["stage"].annotation)), "methods": list(get_args(fields["method"].annotation)),
            "templates": sorted(TEMPLATES),
            "train": {k: TrainConfig.model_fields[k].default for k in ("epochs", "batch_size", "grad_accum", "lr",
                                                                       "logging_steps", "save_steps", "max_steps")},
            "data": {k: DataConfig.model_fields[k].default for k in ("cutoff_len", "max_samples", "val_size")},
            "lora": {k: LoraConfig.model_fields[k].default for k in ("r", "alpha", "dropout")}}


def build_app(roots: Roots, token: str | None = None, jobs: Jobs | None = None) -> FastAPI:
    jobs = jobs or Jobs(roots.paths[0])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(jobs.stop)  # a job does not outlive its board

    app = FastAPI(title="loraforge board", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.jobs = jobs
    workdir = roots.paths[0]

    def state_of(folder: Path) -> dict:
        return run_state(folder, active=jobs.running() == folder)

    def authorize(request: Request) -> None:
        if not token:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ") or request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
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
        running = jobs.running()
        return {"version": __version__, "roots": [str(r) for r in roots.paths], "defaults": _defaults(),
                "running": roots.shown(running) if running else None}

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

    async def body_yaml(request: Request) -> str:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise HttpError(400, "the request body is not JSON: send {\"yaml\": \"…\"}") from None
        if not isinstance(body, dict) or not isinstance(body.get("yaml"), str):
            raise HttpError(400, "send {\"yaml\": \"…\"}: the config as YAML text")
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
        try:
            command = jobs.start(run_dir, yaml_text)
        except Busy as exc:
            raise HttpError(409, str(exc).replace(str(jobs.running()), roots.shown(jobs.running()))) from None
        return {"run": roots.shown(run_dir), "command": " ".join(command).replace(str(run_dir), roots.shown(run_dir))}

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
        try:
            log = (folder / LOG_FILE).read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            log = []
        return {"path": roots.shown(folder), **state_of(folder), "rows": rows, "log": log}

    @app.get("/api/run/events")
    async def events(request: Request, path: str | None = None):
        """New trainer_log.jsonl lines as `row` events, then the final `state`; ends when the run is not running."""
        authorize(request)
        folder = run_dir_of(path)

        async def stream():
            offset, log_offset = 0, 0
            while True:
                rows, offset = read_lines(folder / "trainer_log.jsonl", offset)
                for row in rows:
                    yield f"event: row\ndata: {json.dumps(row)}\n\n"
                lines, log_offset = read_new(folder / LOG_FILE, log_offset)
                for line in lines:
                    text = line.decode("utf-8", errors="replace")
                    yield f"event: log\ndata: {json.dumps(text, ensure_ascii=False)}\n\n"
                # this board's own job needs no look at the disk; anything else is read from it
                state = None if jobs.running() == folder else state_of(folder)
                if state is not None and state["state"] != "running":
                    rows, offset = read_lines(folder / "trainer_log.jsonl", offset)
                    for row in rows:
                        yield f"event: row\ndata: {json.dumps(row)}\n\n"
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

    @app.post("/api/run/stop")
    async def stop(request: Request, path: str | None = None):
        authorize(request)
        folder = run_dir_of(path)
        if not await asyncio.to_thread(jobs.stop, folder):
            raise HttpError(409, f"run {path} is not running here")
        return {"path": roots.shown(folder), **state_of(folder)}

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
        try:
            command = jobs.start(folder, yaml_file.read_text(encoding="utf-8"), overrides)
        except Busy as exc:
            raise HttpError(409, str(exc)) from None
        return {"run": roots.shown(folder), "command": " ".join(command)}

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
