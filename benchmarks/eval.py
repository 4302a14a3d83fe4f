"""`loraforge eval` time on the serving benchmark's 107M shape: the same examples through the transformers
engine (HF dir) and llama.cpp (its F16 GGUF), side by side in one run.

Model (as benchmarks/serve.py): a synthetic ~107M-parameter LLaMA — hidden 768, 12 layers, 12/4 heads,
ffn 3072, the 2,000-piece SentencePiece tokenizer of the bundled corpus, random weights. Random weights
answer nonsense, so the scores mean nothing here; the figure is time per 100 examples of `eval generate`
(greedy, max 32 new tokens, EOS disabled by a random model only by chance) and tokens/s of `eval ppl`.

    python benchmarks/eval.py [--examples 20] [--append]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20, help="alpaca_zh_demo examples to generate for")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()

    from serve import SHAPES

    from loraforge.data.templates import get_template, jinja_template
    from loraforge.eval.generate import ModelSpec, eval_generate, load_eval_data, seconds_per_100
    from loraforge.eval.ppl import open_scorer, token_logprobs
    from loraforge.export.gguf_writer import export_gguf
    from loraforge.infer.engine import GenerationConfig
    from loraforge.tiny import TinyShape, build_spm_tokenizer, build_tiny_model

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    tok = build_spm_tokenizer([ROOT / "examples" / "data" / "zh_corpus.txt"], work / "tok", 2000)
    base = build_tiny_model(tok, work / "base-107m", TinyShape(**SHAPES["107m"]))
    (base / "chat_template.jinja").write_text(jinja_template(get_template("chinese-alpaca")), encoding="utf-8")
    gguf = export_gguf(base, [], work / "bench-107m-f16.gguf", "f16")
    data = load_eval_data(["alpaca_zh_demo"], dataset_dir=str(ROOT / "examples" / "data"), template="chinese-alpaca",
                          limit=args.examples)
    config = GenerationConfig(temperature=0.0, max_new_tokens=32)
    rows = []
    for label, ref in (("transformers (HF dir, fp32)", base), ("llama.cpp (F16 GGUF)", gguf)):
        load = os.getloadavg()[0]
        result = eval_generate([ModelSpec(str(ref))], data, work / f"out-{len(rows)}", config).models[0]
        rows.append((label, "eval generate", f"{seconds_per_100(result, len(data.examples)):.1f} s / 100 examples",
                     f"{result.completion_tokens / max(result.seconds, 1e-9):.1f} generated tokens/s", f"{load:.1f}"))
    text = (ROOT / "examples" / "data" / "zh_heldout.txt").read_text(encoding="utf-8")
    for label, ref in (("transformers (HF dir, fp32)", base), ("llama.cpp (F16 GGUF)", gguf)):
        load = os.getloadavg()[0]
        scorer = open_scorer(str(ref), n_ctx=512)
        try:
            ids = scorer.tokenize(text)
            began = time.time()
            token_logprobs(scorer, ids, 512, 256)
            seconds = time.time() - began
        finally:
            scorer.close()
        rows.append((label, "eval ppl (window 512, stride 256)", f"{len(ids)} tokens in {seconds:.1f} s",
                     f"{len(ids) / seconds:.0f} tokens/s", f"{load:.1f}"))
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    table = ["| engine | command | time | rate | load avg before |", "|---|---|---|---|---|"]
    table += [f"| {' | '.join(r)} |" for r in rows]
    report = (f"## eval.py — {stamp} — {platform.machine()}, {os.cpu_count()} cores\n\n"
              f"Synthetic 107M LLaMA (hidden 768, 12 layers), {len(data.examples)} alpaca_zh_demo examples, greedy, "
              f"max 32 new tokens; eval ppl on zh_heldout.txt. Run took {time.time() - started:.0f} s.\n\n"
              + "\n".join(table) + "\n")
    print(report)
    if args.append:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as handle:
            handle.write("\n" + report)


if __name__ == "__main__":
    main()
