"""`loraforge eval quant`: which quantization to ship — what each type costs and what it loses.

For each type, base + adapters go through the same streaming exporter as `export gguf`
(into a temporary folder; the files are deleted unless `keep` names a folder), and the file
is measured under llama.cpp against a reference GGUF of the same model (F16 by default, the
reference llama.cpp's own scoreboards use; F32 on request — F16 rounding alone costs a KL
around 1e-5, far below any quantization):

- size, and bits per weight = tensor bytes × 8 / parameters (as `gguf inspect`);
- KL divergence, top-1 agreement and perplexity by llama.cpp's definition
  (`llama-perplexity --kl-divergence`, tools/perplexity/perplexity.cpp):
  the text is tokenized once (BOS first) and cut into non-overlapping chunks of `n_ctx`
  tokens, the remainder dropped; each chunk's first token is replaced by BOS (where the model
  adds one); only the second half of each chunk is scored — the logits at positions
  n_ctx/2 … n_ctx-2, predicting tokens n_ctx/2+1 … n_ctx-1, so every scored token has at
  least half a chunk of context; per token, KL = Σ_v p_ref(v) · (log p_ref(v) − log q(v))
  with p_ref the reference's softmax; "mean KLD" is the mean over scored tokens, the 99th
  percentile interpolates the sorted per-token values linearly at 0.99 × (n − 1);
  "same top p" (top-1 here) is the fraction of tokens where both models' argmax agree;
  perplexity is exp(mean −log q(next token)) over the same tokens. Two details differ on
  purpose: llama.cpp stores the reference log-probabilities as 16-bit integers and skips
  vocabulary entries with log p_ref ≤ −16, we keep them in float32 and sum every entry.
- generation speed: a fixed greedy decode of `GEN_TOKENS` tokens after a short prompt
  from the text (end-of-sequence ignored), after a few warm-up steps; tokens per second =
  1 / the median time of one decoding step on one thread (the prompt is not counted) — a
  figure that compares the types; more threads decode faster on an idle machine.

The recommendation is the smallest file whose mean KL is within `max_kl`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraforge.errors import LoraforgeError

DEFAULT_QUANTS = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k")
DEFAULT_CTX = 512  # llama-perplexity's default; the model's own context when that is shorter
# nats: about Q4_K_M on LLaMA-3-8B against F16 (0.031) with room to spare, well under Q3_K_M's 0.10
# (llama.cpp tools/perplexity README, "LLaMA 3 8b Scoreboard")
DEFAULT_MAX_KL = 0.05
GEN_TOKENS = 64
PROMPT_TOKENS = 8
WARMUP_TOKENS = 8
REFERENCES = ("f16", "f32")


@dataclass
class QuantResult:
    report: dict
    json_path: Path
    md_path: Path
    png_path: Path


def kl_statistics(ref_logprobs: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> dict:
    """Per-token KL(P_ref ‖ Q), top-1 agreement and −log q(target) for [tokens, vocab] arrays:
    `ref_logprobs` the reference's log-softmax, `logits` the quantized model's raw logits."""
    from loraforge.eval.ppl import log_softmax

    log_q = log_softmax(logits)
    ref = ref_logprobs.astype(np.float64)
    kl = (np.exp(ref) * (ref - log_q)).sum(-1)
    same_top = logits.argmax(-1) == ref.argmax(-1)
    nll = -log_q[np.arange(len(targets)), targets]
    return {"kl": kl, "same_top": same_top, "nll": nll}


def summarize(kl: np.ndarray, same_top: np.ndarray, nll: np.ndarray) -> dict:
    """llama.cpp's summary: mean, 99th percentile (linear between sorted values) and maximum KL,
    same-top fraction, perplexity."""
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99, method="linear")),
            "kl_median": float(np.median(kl)), "kl_max": float(kl.max()),
            "top1": float(same_top.mean()), "perplexity": float(math.exp(nll.mean())), "scored_tokens": int(len(kl))}


def recommend(rows: list[dict], max_kl: float) -> dict | None:
    """The smallest file whose mean KL is within the budget."""
    within = [r for r in rows if r["kl_mean"] <= max_kl]
    return min(within, key=lambda r: r["file_bytes"]) if within else None


def _check_quants(quants: list[str], imatrix: Path | None) -> list[str]:
    from loraforge.export.schemes import SCHEMES

    if not quants:
        raise LoraforgeError(f"--quants is empty: name one or more of {', '.join(SCHEMES)}")
    names = [q.strip().lower() for q in quants]
    unknown = [q for q in names if q not in SCHEMES]
    if unknown:
        raise LoraforgeError(f"--quants {','.join(unknown)}: not a llama.cpp quantization loraforge writes; "
                             f"choose from {', '.join(SCHEMES)}")
    if imatrix is not None and not Path(imatrix).is_file():
        raise LoraforgeError(f"--imatrix {imatrix}: no such file — compute one with `loraforge export imatrix`")
    return list(dict.fromkeys(names))


def _chunks(scorer, text: str, n_ctx: int, max_chunks: int, text_file: Path) -> tuple[list[list[int]], list[int]]:
    from loraforge.export.imatrix_compute import text_chunks

    ids = scorer.tokenize(text, bos=True)
    bos = scorer.llm.token_bos() if ids and ids[0] == scorer.llm.token_bos() else None  # the model adds one
    chunks = text_chunks(ids, n_ctx, bos, max_chunks)
    if not chunks:
        raise LoraforgeError(f"{text_file} is {len(ids)} tokens, shorter than one chunk of --ctx {n_ctx}: pass more "
                             f"text or a smaller --ctx (e.g. {max(8, len(ids) // 2)})")
    return chunks, ids


def _generation_speed(path: Path, prompt: list[int]) -> float:
    """Tokens per second of a fixed greedy decode (EOS ignored: the same work for every type)."""
    import llama_cpp

    from loraforge.env import usable_cpus

    # one thread: llama.cpp's threads wait for each other at every step, so on a busy machine (other
    # jobs on the cores) a multi-threaded figure measures the neighbours; one thread compares the types
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + WARMUP_TOKENS + GEN_TOKENS + 8, n_threads=1,
                          n_threads_batch=usable_cpus(), verbose=False)
    try:
        llm.eval(prompt)
        for _ in range(WARMUP_TOKENS):  # the first decodes pay for allocation, not for the type
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        seconds = []
        for _ in range(GEN_TOKENS):
            started = time.perf_counter()
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            seconds.append(time.perf_counter() - started)
        # the median step: on a shared machine one stalled step would otherwise decide a small model's figure
        return 1.0 / float(np.median(seconds))
    finally:
        llm.close()


def _bits_per_weight(path: Path) -> float:
    from loraforge.export.inspect import read_gguf, tensor_summary

    _, tensor_bytes, params = tensor_summary(read_gguf(path))
    return tensor_bytes * 8 / params


def evaluate_quants(model: str | Path, text_file: Path, quants: list[str] = DEFAULT_QUANTS,
                    adapters: list[Path] = (), imatrix: Path | None = None, out_dir: Path | None = None,
                    keep: Path | None = None, max_kl: float = DEFAULT_MAX_KL, n_ctx: int | None = None,
                    max_chunks: int = 0, reference: str = "f16") -> QuantResult:
    """Export `model` (+ `adapters`) at each of `quants`, measure each against the `reference`
    export on `text_file`; write eval.json, eval.md and kl_vs_size.png into `out_dir`."""
    from tqdm import tqdm

    from loraforge.eval.ppl import GGUFScorer, default_out_dir, log_softmax, read_text_file
    from loraforge.export.gguf_writer import export_gguf
    from loraforge.models import context_length, resolve_model
    from loraforge.outputs import check_new_dir

    ref = resolve_model(model)
    if ref.kind == "gguf":
        raise LoraforgeError(f"{ref.path}: eval quant exports each type itself — pass the HF model (or adapter) "
                             "directory the GGUF came from, not a .gguf")
    adapter_dirs = [*ref.adapter_dirs, *[Path(a) for a in adapters]]
    names = _check_quants(list(quants), imatrix)
    if reference not in REFERENCES:
        raise LoraforgeError(f"--reference {reference}: choose f16 or f32")
    if max_kl <= 0:
        raise LoraforgeError(f"--max-kl {max_kl}: the KL budget is a positive number of nats, e.g. {DEFAULT_MAX_KL}")
    text = read_text_file(text_file)
    trained = context_length(ref) or DEFAULT_CTX
    n_ctx = n_ctx or min(DEFAULT_CTX, trained)
    if n_ctx > trained:
        raise LoraforgeError(f"--ctx {n_ctx} is longer than the {trained} tokens the model was trained on")
    if n_ctx < 4:
        raise LoraforgeError(f"--ctx {n_ctx}: a chunk needs at least 4 tokens (its second half is scored)")
    out_dir = Path(out_dir) if out_dir else default_out_dir(ref.path, "quant")
    if out_dir.exists() and not out_dir.is_dir():
        raise LoraforgeError(f"-o {out_dir} is a file: pass a folder for eval.json, eval.md and the plot")
    if keep:
        keep = Path(keep)
        check_new_dir(keep)
    first = n_ctx // 2

    if keep:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
    # beside --keep the kept files are renamed, not copied; otherwise the system's temporary folder
    work = Path(tempfile.mkdtemp(prefix="loraforge-quant-", dir=Path(keep).parent if keep else None))
    try:
        ref_path = export_gguf(ref.base_dir, adapter_dirs, work / f"reference-{reference}.gguf", reference)
        scorer = GGUFScorer(ref_path, n_ctx=n_ctx)
        try:
            chunks, ids = _chunks(scorer, text, n_ctx, max_chunks, text_file)
            scored = n_ctx - 1 - first
            # the reference's log-probabilities, on disk as llama-perplexity keeps its base logits
            store = np.lib.format.open_memmap(work / "reference-logprobs.npy", mode="w+", dtype=np.float32,
                                              shape=(len(chunks), scored, scorer.llm.n_vocab()))
            ref_nll = []
            with tqdm(total=(len(names) + 1) * len(chunks), desc=f"chunks {reference}", unit="chunk") as bar:
                for i, chunk in enumerate(chunks):
                    logprobs = log_softmax(scorer.logits(chunk)[first:n_ctx - 1])
                    store[i] = logprobs
                    ref_nll.append(-logprobs[np.arange(scored), chunk[first + 1:]])
                    bar.update()
                store.flush()
                ref_row = {"type": reference, "reference": True, "file_bytes": ref_path.stat().st_size,
                           "bpw": _bits_per_weight(ref_path),
                           "perplexity": float(math.exp(np.concatenate(ref_nll).mean())),
                           "kl_mean": 0.0, "kl_p99": 0.0, "kl_median": 0.0, "kl_max": 0.0, "top1": 1.0,
                           "tokens_per_second": None}
                scorer.close()
                scorer = None
                ref_row["tokens_per_second"] = _generation_speed(ref_path, ids[:PROMPT_TOKENS])
                rows = [_measure(q, export_gguf, ref, adapter_dirs, imatrix, work, chunks, store, n_ctx, bar)
                        for q in names]
        finally:
            if scorer is not None:
                scorer.close()
        if keep:
            keep.mkdir(parents=True, exist_ok=True)
            for path in work.glob("*.gguf"):
                shutil.move(str(path), keep / path.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best = recommend(rows, max_kl)
    report = {"command": "eval quant", "model": str(ref.path), "base": str(ref.base_dir),
              "adapters": [str(a) for a in adapter_dirs], "text": str(text_file),
              "imatrix": str(imatrix) if imatrix else None, "reference": reference, "n_ctx": n_ctx,
              "chunks": len(chunks), "scored_tokens": len(chunks) * scored, "max_kl": max_kl,
              "rule": "llama-perplexity --kl-divergence: non-overlapping chunks of n_ctx tokens, BOS first, "
                      "the second half of each chunk scored; KL(P_ref || Q) per token; p99 by linear "
                      "interpolation; top-1 = same argmax",
              "generation_tokens": GEN_TOKENS, "reference_row": ref_row, "rows": rows,
              "recommendation": best["type"] if best else None,
              "recommendation_text": recommendation_text(best, max_kl, rows),
              "kept": str(keep) if keep else None}
    return _write(report, out_dir)


def _measure(quant, export_gguf, ref, adapter_dirs, imatrix, work, chunks, store, n_ctx, bar) -> dict:
    from loraforge.eval.ppl import GGUFScorer

    first = n_ctx // 2
    path = export_gguf(ref.base_dir, adapter_dirs, work / f"{ref.path.name}-{quant}.gguf", quant, imatrix=imatrix)
    bar.set_description(f"chunks {quant}")
    scorer = GGUFScorer(path, n_ctx=n_ctx)
    parts = []
    try:
        for i, chunk in enumerate(chunks):
            logits = scorer.logits(chunk)[first:n_ctx - 1]
            parts.append(kl_statistics(np.asarray(store[i]), logits, np.array(chunk[first + 1:])))
            bar.update()
    finally:
        scorer.close()
    stats = summarize(*(np.concatenate([p[key] for p in parts]) for key in ("kl", "same_top", "nll")))
    return {"type": quant, "file": path.name, "file_bytes": path.stat().st_size, "bpw": _bits_per_weight(path),
            **stats, "tokens_per_second": _generation_speed(path, chunks[0][:PROMPT_TOKENS])}


def recommendation_text(best: dict | None, max_kl: float, rows: list[dict]) -> str:
    if best is None:
        closest = min(rows, key=lambda r: r["kl_mean"])
        return (f"no type is within the KL budget of {max_kl:g} nats; the closest is {closest['type']} "
                f"(mean KL {closest['kl_mean']:.4f}) — raise --max-kl, or add a larger type to --quants")
    return (f"ship {best['type']}: the smallest file ({_mib(best['file_bytes'])}, {best['bpw']:.2f} bpw) with mean "
            f"KL {best['kl_mean']:.4f} ≤ {max_kl:g} nats, top-1 agreement {best['top1']:.1%}")


def _kl(x: float) -> str:
    return "0" if x == 0 else f"{x:.4f}" if x >= 1e-3 else f"{x:.1e}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_quant_table(report: dict) -> str:
    """eval.md: the table and the recommendation."""
    lines = [f"# Quantization quality: {Path(report['model']).name} on {Path(report['text']).name}", "",
             f"Against the {report['reference'].upper()} export, {report['chunks']} chunks of {report['n_ctx']} "
             f"tokens, {report['scored_tokens']} scored (llama-perplexity --kl-divergence rule)"
             + (f", imatrix {Path(report['imatrix']).name}" if report["imatrix"] else "") + ".", "",
             "| type | size | bpw | ppl | KL mean | KL p99 | top-1 | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in [report["reference_row"], *report["rows"]]:
        label = f"{row['type']} (reference)" if row.get("reference") else row["type"]
        lines.append(f"| {label} | {_mib(row['file_bytes'])} | {row['bpw']:.2f} | {row['perplexity']:.3f} | "
                     f"{_kl(row['kl_mean'])} | {_kl(row['kl_p99'])} | {row['top1']:.1%} | "
                     f"{row['tokens_per_second']:.0f} |")
    lines += ["", report["recommendation_text"], ""]
    return "\n".join(lines)


def plot_kl_vs_size(report: dict, png_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loraforge.outputs import new_file

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [r["file_bytes"] / 2**20 for r in rows]
    kls = [max(r["kl_mean"], 1e-6) for r in rows]
    ax.plot(sizes, kls, "o")
    for r, x, y in zip(rows, sizes, kls):
        ax.annotate(r["type"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(report["max_kl"], color="grey", linestyle="--", linewidth=0.8, label=f"--max-kl {report['max_kl']:g}")
    ax.set_yscale("log")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel(f"mean KL vs {report['reference'].upper()} (nats)")
    ax.set_title(f"{Path(report['model']).name}: size against KL divergence")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with new_file(Path(png_path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(png_path)


def _write(report: dict, out_dir: Path) -> QuantResult:
    from loraforge.outputs import write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_kl_vs_size(report, out_dir / "kl_vs_size.png")
    report["plot"] = str(png)
    json_path = write_text(out_dir / "eval.json", json.dumps(report, ensure_ascii=False, indent=2))
    md_path = write_text(out_dir / "eval.md", format_quant_table(report))
    return QuantResult(report, json_path, md_path, png)
