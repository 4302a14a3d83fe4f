"""Does `loraforge export imatrix` help? KL on held-out text with and without an in-domain imatrix.

A 256-wide LLaMA (so the 256-value K-quant and i-quant blocks apply) is pre-trained briefly on
the bundled Chinese corpus; its importance matrix is computed from that corpus and the model
is quantized to IQ2_XS / Q2_K / Q3_K_S with it, without it (IQ2_XS cannot be written without
one: against an imatrix of ones, i.e. no information) and measured by `eval quant` on
examples/data/zh_heldout.txt.

A model this small trained this briefly has no outlier activation channels, which is what an
imatrix exploits in real LLMs (LLM.int8(), Dettmers et al. 2022). `--outliers` gives it some by
an exact reparameterization — 4% of each norm's channels × 8, the columns that read them ÷ 8:
the same function, the activation profile of a real model — and measures both.

    python benchmarks/imatrix_kl.py [--steps 150] [--outliers] [--append]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
TYPES = ["iq2_xs", "q2_k", "q3_k_s"]


def pretrained_wide(work: Path, steps: int) -> Path:
    from loraforge.config import load_config
    from loraforge.tiny import TinyShape, build_spm_tokenizer, build_tiny_model
    from loraforge.train.run import train

    tokenizer = build_spm_tokenizer([DATA / "zh_corpus.txt"], work / "spm", vocab_size=2000)
    base = build_tiny_model(tokenizer, work / "wide", TinyShape(hidden=256, ffn=512))
    out = work / "pre"
    train(load_config(None, [
        "stage=pt", "method=full", f"model.path={base}", f"train.output_dir={out}", f"data.dir={DATA}",
        "data.datasets=zh_corpus", "data.block_size=128", "train.batch_size=16", f"train.max_steps={steps}",
        "train.lr=3e-3", "train.logging_steps=10", "train.save_steps=100000", "train.overwrite_output_dir=true"]))
    return out


def measure(model: Path, work: Path) -> list[tuple[str, str, dict, dict]]:
    from loraforge.eval.quant_quality import evaluate_quants
    from loraforge.export.imatrix import load_imatrix
    from loraforge.export.imatrix_compute import compute_imatrix, write_imatrix

    imatrix = compute_imatrix(model, DATA / "zh_corpus.txt", work / f"{model.name}-im.gguf", n_ctx=128).path
    ones = write_imatrix(work / f"{model.name}-ones.gguf",
                         {k: (np.ones_like(v, dtype=np.float64), 1) for k, v in load_imatrix(imatrix).items()},
                         "ones", 1, 128)

    def rows(types, matrix, label):
        report = evaluate_quants(model, DATA / "zh_heldout.txt", types, imatrix=matrix, n_ctx=128,
                                 out_dir=work / f"{model.name}-eval-{label}").report
        return {r["type"]: r for r in report["rows"]}

    with_im = rows(TYPES, imatrix, "imatrix")
    without = {**rows(TYPES[1:], None, "none"), **rows(TYPES[:1], ones, "ones")}
    return [(model.name, t, without[t], with_im[t]) for t in TYPES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="pre-training steps")
    parser.add_argument("--outliers", action="store_true", help="also the same model with outlier channels")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    from loraforge.tiny import add_outlier_channels

    work = Path(tempfile.mkdtemp(prefix="imatrix-kl-"))
    try:
        model = pretrained_wide(work, args.steps)
        results = measure(model, work)
        if args.outliers:
            results += measure(add_outlier_channels(model, work / "outliers"), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = ["| model | type | KL mean without | KL mean with imatrix | change | KL p99 without | with |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, kind, a, b in results:
        label = f"{kind} (vs ones)" if kind.startswith("iq") else kind
        lines.append(f"| {name} | {label} | {a['kl_mean']:.4f} | {b['kl_mean']:.4f} | "
                     f"{(b['kl_mean'] / a['kl_mean'] - 1):+.0%} | {a['kl_p99']:.3f} | {b['kl_p99']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.append:
        with (ROOT / "benchmarks" / "RESULTS.md").open("a", encoding="utf-8") as f:
            f.write(f"\n## imatrix_kl.py (--steps {args.steps})\n\n{table}\n")


if __name__ == "__main__":
    main()
