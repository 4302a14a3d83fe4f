"""LoRA SFT throughput: tokens/s and peak RSS on a fixed small config.

Fixed config (change nothing without saying so in RESULTS.md):
  model   tiny LLaMA built here: hidden 256, 4 layers, 8 heads / 4 kv heads, ffn 640,
          SentencePiece BPE vocab 2000 trained on examples/data/zh_corpus.txt (random weights)
  data    alpaca_zh_demo + sharegpt_zh_demo, template chinese-alpaca, cutoff_len 256
  method  LoRA r=8 alpha=16 on all linear layers, fp32, CPU
  train   batch 8, 60 optimizer steps, lr 2e-4
It runs once with length-grouped batches (our default) and once with random batches,
prints a table, and appends it to benchmarks/RESULTS.md.

    python benchmarks/train_throughput.py [--steps 60]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def one_run(base: Path, out: Path, steps: int, grouped: bool) -> dict:
    """Train in a child process so peak RSS belongs to this run alone."""
    code = f"""
import json, resource, time
from loraforge.config import load_config
from loraforge.train.callbacks import read_log
from loraforge.train.run import train
cfg = load_config(None, ["model.path={base}", "train.output_dir={out}", "data.dir={ROOT / 'examples' / 'data'}",
    "data.datasets=alpaca_zh_demo,sharegpt_zh_demo", "data.template=chinese-alpaca", "data.cutoff_len=256",
    "lora.r=8", "lora.alpha=16", "train.batch_size=8", "train.max_steps={steps}", "train.lr=2e-4",
    "train.logging_steps=5", "train.save_steps=100000", "train.group_by_length={str(grouped).lower()}"])
start = time.perf_counter()
result = train(cfg)
wall = time.perf_counter() - start
rows = read_log(result.output_dir / "trainer_log.jsonl")
tokens = rows[-1]["tokens_seen"]
print("RESULT", json.dumps({{"wall_s": wall, "tokens": tokens,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
                               "LORAFORGE_CACHE": str(out.parent / "cache"), "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        sys.exit(done.stderr[-4000:])
    line = next(row for row in done.stdout.splitlines() if row.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    from loraforge.tiny import TinyShape, build_spm_tokenizer, build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = build_spm_tokenizer([ROOT / "examples" / "data" / "zh_corpus.txt"], tmp / "tok", 2000)
        base = build_tiny_model(tok, tmp / "base", TinyShape(hidden=256, layers=4, heads=8, kv_heads=4, ffn=640))
        rows = []
        for grouped in (True, False):
            start = time.perf_counter()
            stats = one_run(base, tmp / f"run-{grouped}", args.steps, grouped)
            rows.append((grouped, stats, time.perf_counter() - start))

    table = ["| batches | steps | non-pad tokens | train wall s | tokens/s | peak RSS MB |",
             "|---|---|---|---|---|---|"]
    for grouped, stats, _ in rows:
        table.append(f"| {'length-grouped' if grouped else 'random'} | {args.steps} | {stats['tokens']} | "
                     f"{stats['wall_s']:.1f} | {stats['tokens'] / stats['wall_s']:.0f} | {stats['peak_rss_mb']:.0f} |")
    text = "\n".join(table)
    print(text)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    with (ROOT / "benchmarks" / "RESULTS.md").open("a", encoding="utf-8") as fh:
        fh.write(f"\n## train_throughput.py — {stamp} — {platform.processor() or platform.machine()}, "
                 f"{__import__('os').cpu_count()} cores\n\n"
                 "LoRA r=8 all-linear SFT, tiny LLaMA (h256 L4, vocab 2000), batch 8, cutoff 256, fp32 CPU. "
                 "tokens/s counts non-padding tokens over the whole train() call (incl. model load and save).\n\n"
                 f"{text}\n")


if __name__ == "__main__":
    main()
