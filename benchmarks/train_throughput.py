"""LoRA SFT throughput, loraforge next to LLaMA-Factory 0.9.5: tokens/s, peak RSS, loss.

Same on both sides (change nothing without saying so in RESULTS.md):
  model   tiny LLaMA built here: hidden 256, 4 layers, 8 heads / 4 kv heads, ffn 640,
          SentencePiece BPE vocab 2000 trained on examples/data/zh_corpus.txt (random weights)
  data    alpaca_zh_demo (examples/data), template alpaca (LLaMA-Factory's), cutoff_len 256
  method  LoRA r=8 alpha=16 dropout 0 on all linear layers, fp32, CPU, no gradient checkpointing
  train   batch 8, no accumulation, --steps optimizer steps (60), lr 2e-4 cosine, no warmup, seed 0,
          random batches, no eval, no checkpoint in the loop, dataloader workers 0
Runs, each in its own child process: loraforge without and with packing, LLaMA-Factory without
packing, with neat_packing (no attention across examples: the like-for-like one) and with plain
packing (examples attend to each other), plus loraforge with its default length-grouped batches.
Both children carry the same instrumentation (PRELUDE): it counts non-padding tokens per step
from the batch itself and times the training loop from on_train_begin to the last step's end, so
model loading, tokenization and saving are outside the figure. A short profiled run per setting
then says where a step's time goes. Prints tables and appends them to benchmarks/RESULTS.md.

LLaMA-Factory is installed once into ~/.cache/loraforge-bench/llamafactory-0.9.5 (a venv of its own).

    python benchmarks/train_throughput.py [--steps 60] [--skip-llamafactory] [--profile-steps 4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"

LF_VERSION = "0.9.5"
LF_TORCH = "2.13.0"  # the CPU build this machine's pip installs from a local wheel; unpinned pulls CUDA wheels
LF_VENV = Path.home() / ".cache" / "loraforge-bench" / f"llamafactory-{LF_VERSION}"
STUB_TEXT = "loraforge benchmark stub"
LF_SKIP = {"torch", "torchaudio", "torchvision"}  # torch is pinned; the other two are media-only and need CUDA libs


def ensure_llamafactory(venv: Path = LF_VENV) -> tuple[Path, bool]:
    """LLaMA-Factory in its own virtualenv, installed once (torch first, then the package without deps,
    then its requirements under a torch pin). Returns that venv's python and whether a torchaudio stub
    had to be written."""
    python = venv / "bin" / "python"
    done_marker = venv / ".loraforge-bench-installed"
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    stub = site / "torchaudio" / "__init__.py"
    if done_marker.exists():
        return python, stub.exists() and STUB_TEXT in stub.read_text(encoding="utf-8")

    def step(n: int, what: str, cmd: list[str]) -> None:
        print(f"[llamafactory install {n}/4] {what}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)  # pip's own output stays visible

    if not python.exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        step(0, "virtualenv", [sys._base_executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "install"]
    step(1, "torch first, pinned", [*pip, f"torch=={LF_TORCH}"])
    step(2, "llamafactory without deps", [*pip, "--no-deps", f"llamafactory=={LF_VERSION}"])
    listed = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                             "print('\\n'.join(m.requires('llamafactory') or []))"],
                            check=True, capture_output=True, text=True).stdout.splitlines()
    wanted = [req for req in listed if "extra ==" not in req and requirement_name(req) not in LF_SKIP]
    constraints = venv / "constraints.txt"
    constraints.write_text(f"torch=={LF_TORCH}\n", encoding="utf-8")
    step(3, f"its {len(wanted)} requirements (no torchaudio/torchvision, torch=={LF_TORCH})",
         [*pip, "-c", str(constraints), *wanted])
    check = [str(python), "-c", "import llamafactory.train.tuner"]
    failed = subprocess.run(check, capture_output=True, text=True)
    stubbed = failed.returncode != 0 and "torchaudio" in failed.stderr
    if stubbed:
        print(f"[llamafactory install 4/4] the import needs torchaudio, whose wheels need CUDA libraries here: "
              f"writing an empty stub package {stub}", flush=True)
        stub.parent.mkdir(exist_ok=True)
        stub.write_text(f"# {STUB_TEXT}: no audio data is used\n", encoding="utf-8")
        failed = subprocess.run(check, capture_output=True, text=True)
    else:
        print("[llamafactory install 4/4] import check: no torchaudio stub needed", flush=True)
    if failed.returncode != 0:
        sys.exit(f"LLaMA-Factory {LF_VERSION} does not import in {venv}:\n{failed.stderr[-3000:]}\n"
                 f"fix it there, or delete {venv} to reinstall")
    done_marker.write_text("ok\n", encoding="utf-8")
    return python, stubbed


def requirement_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower().replace("_", "-")


# Run first in both children. Trainer.training_step and a callback are the only hooks: both sides
# run transformers' Trainer, so the same lines count and time both. The Trainer's own counter is
# kept for comparison only: with LLaMA-Factory's packing it adds up its attention_mask, which holds
# segment numbers (neat_packing, then a 4-D float mask) or marks padding as 1 (packing).
PRELUDE = r'''
import json, os, resource, sys, time
import torch
from transformers import Trainer, TrainerCallback

BENCH = {"tokens": [], "widths": [], "rows": [], "fwd_bwd_s": [], "step_s": [], "losses": []}
PROFILE = json.loads(os.environ.get("BENCH_PROFILE", "null"))  # [first, last] step, or null
TRAINER = None


def real_tokens(ids, mask, pos):
    """Tokens of the examples, not padding: attention_mask 0 (a 2-D mask), or the run of position 0 that
    ends a packed row (LLaMA-Factory pads packed rows with position 0 and, with plain packing, mask 1)."""
    real = torch.ones_like(ids, dtype=torch.bool)
    if mask is not None and mask.dim() == 2:
        real &= mask != 0
    if pos is not None and pos.dim() == 2:
        real &= ~(pos == 0).flip(-1).cumprod(-1).flip(-1).bool()
    return int(real.sum())


def row_tensor(row, key):
    return torch.tensor([row[key]]) if row.get(key) is not None else None


def dataset_stats(dataset):
    rows = [dataset[i] for i in range(len(dataset))]
    stats = {"rows": len(rows), "tokens": sum(real_tokens(row_tensor(r, "input_ids"), row_tensor(r, "attention_mask"),
                                                          row_tensor(r, "position_ids")) for r in rows)}
    if "position_ids" not in rows[0]:  # single examples: a fingerprint of their ids and labels, order-free
        import hashlib
        keys = sorted(json.dumps([list(r["input_ids"]), list(r["labels"])]) for r in rows)
        stats["ids_sha1"] = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:12]
    return stats


_step = Trainer.training_step


def training_step(self, model, inputs, *args, **kwargs):
    ids = inputs["input_ids"]
    BENCH["tokens"].append(real_tokens(ids, inputs.get("attention_mask"), inputs.get("position_ids")))
    BENCH["rows"].append(ids.shape[0])
    BENCH["widths"].append(ids.shape[1])
    start = time.perf_counter()
    loss = _step(self, model, inputs, *args, **kwargs)
    BENCH["fwd_bwd_s"].append(time.perf_counter() - start)
    return loss


class BenchClock(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        BENCH["dataset"] = dataset_stats(TRAINER.train_dataset)
        BENCH["setup"] = {"dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                          "attn": getattr(model.config, "_attn_implementation", None),
                          "grad_ckpt": bool(getattr(model, "is_gradient_checkpointing", False)),
                          "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                          "optim": str(args.optim), "scheduler": str(args.lr_scheduler_type),
                          "sampler": str(getattr(args, "train_sampling_strategy", None) or
                                         ("group_by_length" if getattr(args, "group_by_length", False) else "random")),
                          "threads": torch.get_num_threads()}
        BENCH["load_start"] = os.getloadavg()[0]
        BENCH["t0"] = BENCH["last"] = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        if PROFILE and state.global_step == PROFILE[0] - 1:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        BENCH["step_s"].append(now - BENCH["last"])
        BENCH["last"] = now
        if PROFILE and state.global_step == PROFILE[1]:
            self.prof.__exit__(None, None, None)
            steps = PROFILE[1] - PROFILE[0] + 1
            ops = sorted(self.prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            total = sum(e.self_cpu_time_total for e in ops)
            BENCH["profile"] = {"total_ms": total / 1000 / steps,
                                "ops": {e.key: e.self_cpu_time_total / 1000 / steps for e in ops[:12]}}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            BENCH["losses"].append((state.global_step, float(logs["loss"])))

    def on_train_end(self, args, state, control, **kwargs):
        BENCH["train_s"] = BENCH["last"] - BENCH["t0"]
        BENCH["load_end"] = os.getloadavg()[0]
        BENCH["steps"] = state.global_step
        BENCH["own_tokens"] = state.num_input_tokens_seen


_init = Trainer.__init__


def __init__(self, *args, **kwargs):
    global TRAINER
    _init(self, *args, **kwargs)
    TRAINER = self
    self.add_callback(BenchClock())


Trainer.training_step = training_step
Trainer.__init__ = __init__


def report():
    BENCH["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(BENCH), flush=True)
'''

LORAFORGE_CHILD = PRELUDE + r'''
from loraforge.config import load_config
from loraforge.train.callbacks import read_log
from loraforge.train.run import train

result = train(load_config(None, json.loads(os.environ["BENCH_ARGS"])))
last = read_log(result.output_dir / "trainer_log.jsonl")[-1]
BENCH["own_log"] = {"tokens_seen": last["tokens_seen"], "elapsed_s": last["elapsed_s"], "step": last["step"]}
report()
'''

LLAMAFACTORY_CHILD = PRELUDE + r'''
from pathlib import Path
from llamafactory.train.tuner import run_exp

run_exp(json.loads(os.environ["BENCH_ARGS"]))
results = json.loads((Path(json.loads(os.environ["BENCH_ARGS"])["output_dir"]) / "all_results.json").read_text())
BENCH["own_log"] = {"train_runtime": results.get("train_runtime")}
report()
'''


def loraforge_args(base: Path, out: Path, steps: int, packing: bool, grouped: bool) -> list[str]:
    return [f"model.path={base}", f"train.output_dir={out}", f"data.dir={DATA}", "data.datasets=alpaca_zh_demo",
            "data.template=alpaca", "data.cutoff_len=256", f"data.packing={str(packing).lower()}",
            "lora.r=8", "lora.alpha=16", "lora.dropout=0", "lora.target=all",
            "train.batch_size=8", "train.grad_accum=1", f"train.max_steps={steps}", "train.lr=2e-4",
            "train.scheduler=cosine", "train.warmup_steps=0", "train.seed=0", "train.precision=fp32",
            "train.gradient_checkpointing=false", f"train.group_by_length={str(grouped).lower()}",
            "train.logging_steps=5", "train.save_steps=100000", "train.dataloader_workers=0"]


def llamafactory_data(tmp: Path) -> Path:
    """A dataset_info.json for LLaMA-Factory naming the same file with its `system` and `history` columns:
    LLaMA-Factory reads those only when dataset_info.json maps them, loraforge reads them by default, and
    examples/data/dataset_info.json does not map them (20 of the 175 records have one)."""
    folder = tmp / "lf_data"
    folder.mkdir()
    columns = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
               "history": "history"}
    info = {"alpaca_zh_demo": {"file_name": str(DATA / "alpaca_zh_demo.json"), "columns": columns}}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return folder


def llamafactory_args(base: Path, data: Path, out: Path, steps: int, packing: str) -> dict:
    """`packing`: "none", "neat" (neat_packing: true) or "plain" (packing: true)."""
    return {"stage": "sft", "do_train": True, "model_name_or_path": str(base), "finetuning_type": "lora",
            "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target": "all",
            "dataset": "alpaca_zh_demo", "dataset_dir": str(data), "template": "alpaca", "cutoff_len": 256,
            "packing": packing != "none", "neat_packing": packing == "neat",
            "overwrite_cache": True, "preprocessing_num_workers": 1, "dataloader_num_workers": 0,
            "output_dir": str(out), "overwrite_output_dir": True, "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1, "learning_rate": 2e-4, "max_steps": steps,
            "lr_scheduler_type": "cosine", "warmup_steps": 0, "seed": 0, "bf16": False, "fp16": False,
            # LLaMA-Factory turns gradient checkpointing on by default; loraforge does not
            "disable_gradient_checkpointing": True,
            "logging_steps": 5, "logging_first_step": True, "save_steps": 100000, "report_to": "none",
            "plot_loss": False, "include_num_input_tokens_seen": "non_padding"}


def run_child(python: Path, code: str, args, tmp: Path, profile: list[int] | None = None) -> dict:
    """One training run in its own process (peak RSS is that run's alone)."""
    env = {"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONPATH": str(ROOT / "src"),
           "BENCH_ARGS": json.dumps(args), "BENCH_PROFILE": json.dumps(profile), "HF_HOME": str(tmp / "hf"),
           "LORAFORGE_CACHE": str(tmp / "cache"), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    if python != Path(sys.executable):
        env["PYTHONPATH"] = ""  # LLaMA-Factory's venv: nothing of loraforge's
    load = os.getloadavg()[0]
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd=tmp)
    if done.returncode != 0:
        sys.exit(f"run failed ({python}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    line = next(row for row in done.stdout.splitlines() if row.startswith("RESULT "))
    stats = json.loads(line[len("RESULT "):])
    stats["load_before"] = load
    return stats


def versions(python: Path) -> str:
    code = ("import importlib.metadata as m\nout=[]\nfor n in ('torch','transformers','peft','trl','llamafactory'):\n"
            "    try: out.append(f'{n} {m.version(n)}')\n    except m.PackageNotFoundError: pass\nprint(', '.join(out))")
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def rate(s: dict) -> float:
    """Non-padding tokens per second of training loop."""
    return sum(s["tokens"]) / s["train_s"]


def quiet_rate(runs: list[dict]) -> float:
    """tokens/s at the machine's quiet moments: the settings' non-padding share of the computed positions
    over the 25th percentile of seconds per computed position across all steps of all repeats. On a shared
    machine a few disturbed steps swing a run's total; this estimate shrugs them off."""
    steps = [(t, r * w) for s in runs for t, r, w in zip(s["step_s"], s["rows"], s["widths"])]
    tokens = sum(sum(s["tokens"]) for s in runs)
    positions = sum(p for _, p in steps)
    return tokens / positions / statistics.quantiles([t / p for t, p in steps], n=4)[0]


def summary_row(name: str, s: dict, runs: list[dict]) -> str:
    tokens = sum(s["tokens"])
    computed = sum(r * w for r, w in zip(s["rows"], s["widths"]))
    loss = s["losses"][-1][1] if s["losses"] else float("nan")
    fwd_bwd = sum(s["fwd_bwd_s"])
    return (f"| {name} | {s['steps']} | {tokens} | {computed / s['steps']:.0f} | {1 - tokens / computed:.0%} | "
            f"{s['train_s']:.1f} | **{rate(s):.0f}** | {' / '.join(f'{rate(r):.0f}' for r in runs)} | "
            f"{quiet_rate(runs):.0f} | "
            f"{1e6 * fwd_bwd / computed:.0f} | {1000 * (s['train_s'] - fwd_bwd) / s['steps']:.0f} | {loss:.4f} | "
            f"{s['peak_rss_mb']:.0f} | {s['load_start']:.1f} → {s['load_end']:.1f} |")


def check_row(name: str, s: dict) -> str:
    d, st, own = s["dataset"], s["setup"], s.get("own_log", {})
    own_time = own.get("elapsed_s", own.get("train_runtime"))
    return (f"| {name} | {d['rows']} | {d['tokens']} | {d.get('ids_sha1', '—')} | {s['own_tokens']} | "
            f"{own_time} | {st['dtype']} | {st['attn']} | {st['grad_ckpt']} | {st['trainable']} | "
            f"{st['optim']} | {st['scheduler']} | {st['sampler']} | {st['threads']} |")


def profile_table(profiles: dict[str, dict]) -> str:
    names = list(profiles)
    ops = list(dict.fromkeys(op for p in profiles.values() for op in list(p["ops"])[:8]))
    lines = ["| op (self CPU ms per step) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
             "| **all ops** | " + " | ".join(f"**{p['total_ms']:.0f}**" for p in profiles.values()) + " |"]
    for op in ops:
        lines.append(f"| `{op}` | " + " | ".join(f"{p['ops'][op]:.1f}" if op in p["ops"] else "·"
                                                for p in profiles.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (both sides)")
    parser.add_argument("--skip-llamafactory", action="store_true", help="loraforge runs only; installs nothing")
    parser.add_argument("--profile-steps", type=int, default=4,
                        help="steps profiled with torch.profiler in a separate short run per setting (0: none)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every setting this many times, interleaved; the tables show each one's fastest")
    parser.add_argument("--no-record", action="store_true", help="print the tables only; do not append to RESULTS.md")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from loraforge.tiny import TinyShape, build_spm_tokenizer, build_tiny_model

    lf_python, stubbed = (None, False) if args.skip_llamafactory else ensure_llamafactory()
    ours = Path(sys.executable)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = build_spm_tokenizer([DATA / "zh_corpus.txt"], tmp / "tok", 2000)
        base = build_tiny_model(tok, tmp / "base", TinyShape(hidden=256, layers=4, heads=8, kv_heads=4, ffn=640))
        lf_data = llamafactory_data(tmp)
        # (name, python, child code, args(out, steps)); interleaved so load drift hits both sides alike
        plan = [("loraforge, no packing", ours, LORAFORGE_CHILD,
                 lambda out, n: loraforge_args(base, out, n, packing=False, grouped=False))]
        if lf_python:
            plan.append(("LLaMA-Factory, no packing", lf_python, LLAMAFACTORY_CHILD,
                         lambda out, n: llamafactory_args(base, lf_data, out, n, "none")))
        plan.append(("loraforge, packing", ours, LORAFORGE_CHILD,
                     lambda out, n: loraforge_args(base, out, n, packing=True, grouped=False)))
        if lf_python:
            plan.append(("LLaMA-Factory, neat_packing", lf_python, LLAMAFACTORY_CHILD,
                         lambda out, n: llamafactory_args(base, lf_data, out, n, "neat")))
            plan.append(("LLaMA-Factory, packing (cross-attention)", lf_python, LLAMAFACTORY_CHILD,
                         lambda out, n: llamafactory_args(base, lf_data, out, n, "plain")))
        plan.append(("loraforge, no packing, length-grouped (its default)", ours, LORAFORGE_CHILD,
                     lambda out, n: loraforge_args(base, out, n, packing=False, grouped=True)))
        results: dict[str, list[dict]] = {name: [] for name, *_ in plan}
        profiles = {}
        for rep in range(1, args.repeats + 1):
            for i, (name, python, code, make) in enumerate(plan, 1):
                start = time.perf_counter()
                s = run_child(python, code, make(tmp / f"run{rep}-{i}", args.steps), tmp)
                results[name].append(s)
                print(f"[{rep}/{args.repeats} · {i}/{len(plan)}] {name}: {rate(s):.0f} tokens/s over {s['steps']} "
                      f"steps, {s['train_s']:.1f} s loop, {time.perf_counter() - start:.0f} s process, "
                      f"load {s['load_start']:.1f} → {s['load_end']:.1f}", flush=True)
        if args.profile_steps:
            first = 3  # steps 1-2 warm up allocators and caches
            for i, (name, python, code, make) in enumerate(plan[:4], 1):
                s = run_child(python, code, make(tmp / f"prof{i}", first + args.profile_steps), tmp,
                              profile=[first, first + args.profile_steps - 1])
                profiles[name] = s["profile"]
                print(f"[profile {i}/{min(4, len(plan))}] {name}: {s['profile']['total_ms']:.0f} ms self CPU per "
                      f"step, load {os.getloadavg()[0]:.1f}", flush=True)

    head = ("| run | steps | non-pad tokens | computed positions / step | pad % | train loop s | tokens/s | "
            "each repeat | quiet tokens/s | fwd+bwd ms / 1k positions | rest ms / step | final loss | peak RSS MB | "
            "load avg start → end |")
    table = [head, "|---" * (head.count("|") - 1) + "|"]
    best = {name: max(runs, key=rate) for name, runs in results.items()}  # the least disturbed of the repeats
    table += [summary_row(name, best[name], runs) for name, runs in results.items()]
    checks = ["| run | dataset rows | dataset non-pad tokens | ids+labels sha1 (unpacked) | Trainer's own tokens "
              "count | own log's train time s | dtype | attention | grad ckpt | trainable params | optim | "
              "scheduler | sampler | torch threads |", "|---" * 14 + "|"]
    checks += [check_row(name, s) for name, s in best.items()]

    ratios = []
    if lf_python:
        ratios = [("no packing", "loraforge, no packing", "LLaMA-Factory, no packing", 1.0),
                  ("packing vs neat_packing", "loraforge, packing", "LLaMA-Factory, neat_packing", 1.3),
                  ("packing vs plain packing", "loraforge, packing", "LLaMA-Factory, packing (cross-attention)", None)]
    ratio_lines = [f"- loraforge / LLaMA-Factory tokens/s, {label}: **{rate(best[a]) / rate(best[b]):.2f}×**"
                   + (f" (target ≥ {target}×)" if target else " (not like-for-like: no target)")
                   + f"; quiet tokens/s: {quiet_rate(results[a]) / quiet_rate(results[b]):.2f}×"
                   for label, a, b, target in ratios]
    text = "\n".join(table) + "\n\n" + "\n".join(ratio_lines)
    print(text + "\n\n" + "\n".join(checks))
    if profiles:
        print("\n" + profile_table(profiles))
    if args.no_record:
        return

    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    sides = f"loraforge side: {versions(ours)}"
    if lf_python:
        sides += f"; LLaMA-Factory side: {versions(lf_python)}" + (
            " (torchaudio is an empty stub package there: its wheels need CUDA libraries on this machine)"
            if stubbed else "")
    with (ROOT / "benchmarks" / "RESULTS.md").open("a", encoding="utf-8") as fh:
        fh.write(
            f"\n## train_throughput.py — {stamp} — {platform.processor() or platform.machine()}, {os.cpu_count()} "
            f"cores, load average {os.getloadavg()[0]:.1f} at the end\n\n"
            f"Versions — {sides}.\n\n"
            "Settings, identical on both sides: tiny LLaMA (h256, 4 layers, 8/4 heads, ffn 640, SentencePiece "
            "vocab 2000, random weights), alpaca_zh_demo, template alpaca, cutoff_len 256, LoRA r=8 alpha=16 "
            "dropout 0 on all linear layers, fp32 CPU, no gradient checkpointing (LLaMA-Factory: "
            "disable_gradient_checkpointing: true; its default is on), batch 8, no accumulation, "
            f"{args.steps} steps, lr 2e-4 cosine, no warmup, seed 0, random batches, no eval, no checkpoints, "
            "dataloader workers 0 (LLaMA-Factory: preprocessing_num_workers 1). LLaMA-Factory reads the same "
            "alpaca_zh_demo.json through a dataset_info.json that maps its system and history columns (the "
            "repo's does not map them, and LLaMA-Factory then ignores them in the 20 records that have one; "
            "loraforge reads them unmapped), so both sides train on the same token ids: the sha1 column below. "
            "Each run is its own process. tokens/s = non-padding tokens counted from each batch by the same "
            "hook on both sides, over the training loop only (on_train_begin → end of the last step: no model "
            "load, tokenization or save); "
            + (f"each setting ran {args.repeats} times, interleaved, and the row is its fastest run. "
               if args.repeats > 1 else "")
            + "computed positions = rows × padded width of a batch; pad % = their share that is padding; "
            "fwd+bwd = Trainer.training_step; rest = the loop minus fwd+bwd (optimizer step, data loading and "
            "collation, callbacks, logging); quiet tokens/s = the padding share of these settings over the 25th "
            "percentile of seconds per computed position across all steps (robust to a few disturbed steps); "
            "final loss = the Trainer's logged mean over the last 5 steps. "
            "The random-batch loraforge row of earlier sections is now the no-packing row; the length-grouped "
            "row is loraforge's default, not a like-for-like one.\n\n"
            f"{text}\n\nWhat each side built and counted (dataset = the rows the Trainer was given; the Trainer's "
            "own count is transformers' include_num_input_tokens_seen=non_padding, attention_mask.sum(): "
            "right for a 0/1 mask, not for LLaMA-Factory's packed rows, whose mask holds segment numbers turned "
            "into a 4-D float mask with neat_packing and marks padding 1 with packing):\n\n"
            + "\n".join(checks) + "\n")
        if profiles:
            fh.write(f"\nWhere a step's time goes: torch.profiler, steps 3–{2 + args.profile_steps} of a separate "
                     "short run per setting, top ops by self CPU time (on a loaded machine these include time the "
                     f"op waited for a core):\n\n{profile_table(profiles)}\n")


if __name__ == "__main__":
    main()
