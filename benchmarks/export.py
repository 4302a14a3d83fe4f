"""Export speed and memory: the classic merge → convert → quantize chain against one streaming pass.

Model (change nothing without saying so in RESULTS.md): a synthetic TinyLlama-shaped
LLaMA — 22 layers, hidden 2048, ffn 5632, 32 heads / 4 kv heads, vocab 32000, bf16,
random weights (std 0.02), ~1.1B parameters — and a rank-16 LoRA (alpha 32, random A
and B) on q, k, v, o, gate, up and down of every layer.

  (a) the chain people run today, with the same libraries: peft `merge_and_unload` +
      `save_pretrained` (a merged checkpoint on disk), an F16 GGUF of it (written by
      loraforge's own F16 writer, standing in for llama.cpp's convert_hf_to_gguf.py,
      which is not installed here), then `llama_cpp.llama_model_quantize` to each scheme;
  (b) `loraforge export gguf --quant …` straight from base + adapter.

Every step runs in its own child process, which reports its wall time and its peak RSS
(VmHWM of itself: the merged model, llama.cpp's buffers, memory-mapped
files, everything). The chain's
peak is the largest of its steps; its intermediate bytes are the merged checkpoint plus
the F16 GGUF. Both paths quantize on every CPU this process may use.

    python benchmarks/export.py [--layers 22] [--quants q8_0,q4_k_m] [--keep DIR] [--append]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
FTYPES = {"q8_0": 7, "q4_k_m": 15, "q4_0": 2, "q5_k_m": 17, "q6_k": 18}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def du(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- the synthetic model -------------------------------------------------------------

def build(work: Path, args) -> tuple[Path, Path]:
    """Base (bf16 safetensors, written tensor by tensor) + peft-layout LoRA adapter."""
    import torch
    from safetensors.torch import save_file

    from loraforge.tiny import TinyShape, build_spm_tokenizer, model_config

    base, adapter = work / "base", work / "adapter"
    if (base / "done").exists() and (adapter / "done").exists():
        return base, adapter
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(adapter, ignore_errors=True)
    print("building the synthetic base model and adapter …", flush=True)
    build_spm_tokenizer([ROOT / "examples" / "data" / "zh_corpus.txt"], base)  # 2000 pieces; rows past it are pads
    shape = TinyShape(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                      ffn=args.intermediate, max_positions=2048)
    config = model_config(shape, args.vocab)
    config.dtype, config.architectures = "bfloat16", ["LlamaForCausalLM"]
    config.save_pretrained(base)
    gen = torch.Generator().manual_seed(0)
    head_dim = args.hidden // args.heads
    kv = args.kv_heads * head_dim
    linear = {"self_attn.q_proj": (args.hidden, args.hidden), "self_attn.k_proj": (kv, args.hidden),
              "self_attn.v_proj": (kv, args.hidden), "self_attn.o_proj": (args.hidden, args.hidden),
              "mlp.gate_proj": (args.intermediate, args.hidden), "mlp.up_proj": (args.intermediate, args.hidden),
              "mlp.down_proj": (args.hidden, args.intermediate)}

    def randn(*size, std=0.02, dtype=torch.bfloat16):
        return (torch.randn(*size, generator=gen) * std).to(dtype)

    index, lora = {}, {}
    shards = [{"model.embed_tokens.weight": randn(args.vocab, args.hidden), "model.norm.weight": torch.ones(
        args.hidden, dtype=torch.bfloat16), "lm_head.weight": randn(args.vocab, args.hidden)}]
    for i in range(args.layers):
        layer = {f"model.layers.{i}.input_layernorm.weight": torch.ones(args.hidden, dtype=torch.bfloat16),
                 f"model.layers.{i}.post_attention_layernorm.weight": torch.ones(args.hidden, dtype=torch.bfloat16)}
        for module, (rows, cols) in linear.items():
            layer[f"model.layers.{i}.{module}.weight"] = randn(rows, cols)
            key = f"base_model.model.model.layers.{i}.{module}"
            lora[f"{key}.lora_A.weight"] = randn(args.rank, cols, std=0.01, dtype=torch.float32)
            lora[f"{key}.lora_B.weight"] = randn(rows, args.rank, std=0.01, dtype=torch.float32)
        shards.append(layer)
    # shards of ~2 GB, as save_pretrained would write them
    groups, size = [[]], 0
    for part in shards:
        part_size = sum(t.numel() * 2 for t in part.values())
        if size and size + part_size > 2 * 1024**3:
            groups.append([])
            size = 0
        groups[-1].append(part)
        size += part_size
    for n, group in enumerate(groups, start=1):
        name = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: v for part in group for k, v in part.items()}
        save_file(tensors, base / name, metadata={"format": "pt"})
        index.update({k: name for k in tensors})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    adapter.mkdir(parents=True)
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": args.rank, "lora_alpha": 2 * args.rank,
        "lora_dropout": 0.0, "bias": "none", "target_modules": TARGETS, "base_model_name_or_path": str(base)}))
    (base / "done").touch()
    (adapter / "done").touch()
    return base, adapter


# ---- the measured steps (each one in a child process) --------------------------------

def step_merge(base: str, adapter: str, out: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
        if (Path(base) / name).exists():
            shutil.copy(Path(base) / name, Path(out) / name)


def step_convert(merged: str, out: str) -> None:
    from loraforge.export.gguf_writer import export_gguf

    export_gguf(Path(merged), [], Path(out), "f16")


def step_quantize(source: str, out: str, quant: str) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = FTYPES[quant], cpus()
    if llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed for {quant}")


def step_loraforge(base: str, adapter: str, out: str, quant: str) -> None:
    from loraforge.export.gguf_writer import export_gguf

    export_gguf(Path(base), [Path(adapter)], Path(out), quant)


STEPS = {"merge": step_merge, "convert": step_convert, "quantize": step_quantize, "loraforge": step_loraforge}


def peak_rss() -> int:
    """This process's high-water resident set (VmHWM), mapped file pages included.

    Not getrusage's ru_maxrss: Linux carries that across fork and exec, so every child
    would report at least the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status: this benchmark needs Linux")


def child(name: str, *args: str) -> None:
    start = time.perf_counter()
    STEPS[name](*args)
    wall = time.perf_counter() - start
    peak = peak_rss()
    print("RESULT " + json.dumps({"wall_s": wall, "peak_rss": peak}), flush=True)


def measure(name: str, *args: Path | str) -> dict:
    print(f"  {name} {' '.join(Path(str(a)).name for a in args)} …", flush=True)
    done = subprocess.run([sys.executable, __file__, "--child", name, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        sys.exit(f"step {name} failed:\n{done.stderr[-4000:]}")
    line = next(row for row in done.stdout.splitlines() if row.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    print(f"    {result['wall_s']:.1f} s, peak RSS {result['peak_rss'] / 1e9:.2f} GB", flush=True)
    return result


def run(args) -> list[dict]:
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lf-export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base, adapter = build(work, args)
        print(f"base: {du(base) / 1e9:.2f} GB on disk; adapter {du(adapter) / 1e6:.1f} MB", flush=True)
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        print("(a) classic chain", flush=True)
        merge = measure("merge", base, adapter, out / "merged")
        convert = measure("convert", out / "merged", out / "f16.gguf")
        intermediate = du(out / "merged") + du(out / "f16.gguf")
        rows = []
        for quant in args.quants:
            q = measure("quantize", out / "f16.gguf", out / f"chain-{quant}.gguf", quant)
            rows.append({"path": "(a) peft merge → F16 GGUF → llama_model_quantize", "quant": quant,
                         "wall_s": merge["wall_s"] + convert["wall_s"] + q["wall_s"], "quantize_s": q["wall_s"],
                         "peak_rss": max(merge["peak_rss"], convert["peak_rss"], q["peak_rss"]),
                         "output": du(out / f"chain-{quant}.gguf"), "intermediate": intermediate,
                         "steps": f"merge {merge['wall_s']:.1f} + convert {convert['wall_s']:.1f} + quantize "
                                  f"{q['wall_s']:.1f}"})
        shutil.rmtree(out / "merged")
        (out / "f16.gguf").unlink()
        print("(b) loraforge export gguf", flush=True)
        for quant in args.quants:
            r = measure("loraforge", base, adapter, out / f"ours-{quant}.gguf", quant)
            rows.append({"path": "(b) loraforge export gguf", "quant": quant, "wall_s": r["wall_s"],
                         "peak_rss": r["peak_rss"], "output": du(out / f"ours-{quant}.gguf"), "intermediate": 0,
                         "steps": "one pass"})
        return rows
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def table(rows: list[dict], args) -> str:
    lines = ["| path | quant | wall s | peak RSS GB | output bytes | intermediate bytes | steps |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['quant']} | {r['wall_s']:.1f} | {r['peak_rss'] / 1e9:.2f} | "
                     f"{r['output']:,} | {r['intermediate']:,} | {r['steps']} |")
    chain = {r["quant"]: r for r in rows if r["path"].startswith("(a)")}
    ours = {r["quant"]: r for r in rows if r["path"].startswith("(b)")}
    checks = []
    if "q8_0" in ours:
        speedup = chain["q8_0"]["wall_s"] / ours["q8_0"]["wall_s"]
        checks.append(f"Q8_0: {speedup:.1f}× faster than the chain (target ≥ 5×)")
    if "q4_k_m" in ours:
        ratio = ours["q4_k_m"]["wall_s"] / chain["q4_k_m"]["quantize_s"]
        checks.append(f"Q4_K_M: {ratio:.2f}× the chain's quantize step alone (target ≤ 1.15×)")
    rss = max(r["peak_rss"] for r in ours.values()) / max(r["peak_rss"] for r in chain.values())
    checks.append(f"peak RSS: {rss:.2f} of the chain's (target ≤ 0.25)")
    checks.append(f"intermediate bytes: {max(r['intermediate'] for r in ours.values())} (target 0)")
    shape = (f"{args.layers} layers, hidden {args.hidden}, ffn {args.intermediate}, {args.heads}/{args.kv_heads} "
             f"heads, vocab {args.vocab}, bf16; LoRA r={args.rank} on all linear layers; {cpus()} CPUs")
    return "\n".join([shape, "", *lines, "", *(f"- {c}" for c in checks)])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--quants", type=lambda s: s.split(","), default=["q8_0", "q4_k_m"])
    parser.add_argument("--keep", default="", help="work dir to keep (the synthetic model is reused next time)")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    report = table(run(args), args)
    print("\n" + report)
    if args.append:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        with open(ROOT / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(f"\n## export.py — {stamp} — {platform.machine()}, {cpus()} cores\n\n{report}\n")


if __name__ == "__main__":
    main()
