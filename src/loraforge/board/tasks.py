"""The Export and Evaluate tabs: which commands a request runs, and what a run has produced.

The board runs the CLI's own commands (`export gguf --verify`, `merge`, `export ollama`,
`eval generate --compare`, `eval quant`) as jobs (board/jobs.py), so the page shows what the
terminal would and a failure has the CLI's error text. Their outputs stay in the run
directory — `export/` for files, `eval-generate*/` and `eval-quant*/` for reports — and the
tabs read them back from there: the GGUF sizes and parity verdicts, each evaluation's table
(its eval.md) and plot.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.board.jobs import loraforge_command
from loraforge.errors import LoraforgeError
from loraforge.models import ModelRef, resolve_model

EXPORT_DIR = "export"
EVAL_KINDS = ("generate", "quant")


def run_model(run_dir: Path, workdir: Path) -> ModelRef:
    """What a finished run is as a model: its adapter chain on its base, or its full weights."""
    if not any((run_dir / name).is_file() for name in ("adapter_model.safetensors", "model.safetensors",
                                                      "model.safetensors.index.json")):
        raise LoraforgeError(f"{run_dir.name} has no trained weights yet (no adapter_model.safetensors or "
                             "model.safetensors): let it finish, or resume it")
    return resolve_model(run_dir, cwd=workdir)


def _chain(ref: ModelRef) -> list[str]:
    """`--base B [--adapter A1,A2]` for export and merge."""
    args = ["--base", str(ref.base_dir)]
    return args + ["--adapter", ",".join(map(str, ref.adapter_dirs))] if ref.adapter_dirs else args


def export_commands(run_dir: Path, ref: ModelRef, out_dir: Path, quants: list[str], verify: bool, merged: bool,
                    ollama: bool) -> list[list[str]]:
    """One `export gguf` per quant type (then `export ollama` on the first), and `merge` if asked."""
    from loraforge.export.schemes import scheme_of

    for quant in quants:
        scheme_of(quant)  # an unknown type is the CLI's own error, before anything runs
    if not quants and not merged:
        raise LoraforgeError("nothing to export: pick a GGUF quant type or merged safetensors")
    if ollama and not quants:
        raise LoraforgeError("an Ollama Modelfile points at a GGUF: pick a quant type too")
    commands = []
    for quant in quants:
        gguf = out_dir / f"{run_dir.name}-{quant.upper()}.gguf"
        commands.append(loraforge_command("export", "gguf", *_chain(ref), "--quant", quant.lower(), "-o", str(gguf),
                                          *(["--verify"] if verify else [])))
    if ollama:
        commands.append(loraforge_command("export", "ollama", str(out_dir / f"{run_dir.name}-{quants[0].upper()}.gguf")))
    if merged:
        if not ref.adapter_dirs:
            raise LoraforgeError(f"{run_dir.name} is a full fine-tune: its weights are already merged safetensors")
        if (out_dir / "merged").exists():
            raise LoraforgeError(f"{out_dir / 'merged'} exists: remove it to merge again")
        commands.append(loraforge_command("merge", *_chain(ref), "-o", str(out_dir / "merged")))
    return commands


def _new_folder(run_dir: Path, stem: str) -> Path:
    """RUN/stem, or RUN/stem-2, -3 …: each evaluation keeps its own report."""
    folder, n = run_dir / stem, 1
    while folder.exists():
        n += 1
        folder = run_dir / f"{stem}-{n}"
    return folder


def eval_commands(run_dir: Path, ref: ModelRef, generate: bool, limit: int | None, quant: bool,
                  quants: list[str], text: Path | None) -> list[list[str]]:
    """`eval generate RUN --compare BASE` on the run's own data, and `eval quant RUN` on a text."""
    commands = []
    if generate:
        config = run_dir / "loraforge.yaml"
        if not config.is_file():
            raise LoraforgeError(f"{run_dir.name} has no loraforge.yaml (the config it was trained with), so its "
                                 "data is unknown: run eval generate RUN --data DATASETS from the command line")
        # the model this run was trained on: the adapter run before it, or the base
        base = ref.adapter_dirs[-2] if len(ref.adapter_dirs) > 1 else ref.base_dir
        commands.append(loraforge_command("eval", "generate", str(run_dir), "--compare", str(base), "--data",
                                          str(config), *(["--limit", str(limit)] if limit else []),
                                          "-o", str(_new_folder(run_dir, "eval-generate"))))
    if quant:
        if text is None:
            raise LoraforgeError("eval quant measures on a held-out text: pick a .txt file")
        if not quants:
            raise LoraforgeError("eval quant: pick at least one quant type")
        commands.append(loraforge_command("eval", "quant", str(run_dir), "--text", str(text),
                                          "--quants", ",".join(q.lower() for q in quants),
                                          "-o", str(_new_folder(run_dir, "eval-quant"))))
    if not commands:
        raise LoraforgeError("nothing to evaluate: pick eval generate or eval quant")
    return commands


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def outputs(run_dir: Path) -> dict:
    """What the Export and Evaluate tabs show for a run, read from its folder."""
    from loraforge.eval.parity import format_parity

    exports = []
    folder = run_dir / EXPORT_DIR
    for gguf in sorted(folder.glob("*.gguf")) if folder.is_dir() else []:
        report = _read_json(gguf.with_name(gguf.stem + ".parity.json"))
        exports.append({"file": gguf.name, "bytes": gguf.stat().st_size,
                        "verdict": report.get("verdict") if report else None,
                        "parity": format_parity(report) if report and "overall" in report else None})
    merged = folder / "merged"
    extra = {"merged_bytes": sum(p.stat().st_size for p in merged.glob("*.safetensors")) if merged.is_dir() else None,
             "modelfile": (folder / "Modelfile").read_text(encoding="utf-8") if (folder / "Modelfile").is_file()
             else None}
    evals = []
    for kind in EVAL_KINDS:
        for report_dir in sorted(run_dir.glob(f"eval-{kind}*"), key=lambda p: p.stat().st_mtime):
            report = _read_json(report_dir / "eval.json")
            if report is None:
                continue
            markdown = (report_dir / "eval.md").read_text(encoding="utf-8") if (report_dir / "eval.md").is_file() \
                else ""
            plot = report_dir / "kl_vs_size.png"
            evals.append({"dir": report_dir.name, "command": report.get("command"), "markdown": markdown,
                          "models": [{"label": m["label"], "metrics": m["metrics"]} for m in report.get("models", [])],
                          "plot": f"{report_dir.name}/{plot.name}" if plot.is_file() else None})
    return {"exports": exports, **extra, "evals": evals}
