"""`loraforge eval ppl MODEL --text FILE`: perplexity of a text file, the same rule for both engines.

The rule is transformers' "perplexity of fixed-length models" (strided sliding window):

- the whole file is one text, tokenized once (BOS at its start where the model adds one);
- windows of `window` tokens start every `stride` tokens (default: half the window);
- each window scores only the tokens no earlier window scored, so (with stride < window)
  every token but the first (BOS, or the first word with no BOS) is predicted exactly
  once, and after the first window each one sees at least `window - stride` tokens of
  context (stride == window: non-overlapping windows, each window's first token unscored);
- perplexity = exp(mean negative log-likelihood over those tokens).

llama.cpp's `llama-perplexity` instead cuts non-overlapping chunks and scores their second
halves only (half the text is never scored); we count every token, so the number here is
a little lower than llama-perplexity's for the same window.

Both engines are fed the same ids: a HF model (or adapter) is tokenized with the tokenizer
it was trained with, a bare .gguf with llama.cpp's own (they agree: `export gguf --verify`).
`token_logprobs` / `window_logprobs` are the reusable part (`eval quant` scores KL on them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraforge.env import usable_cpus
from loraforge.errors import LoraforgeError

DEFAULT_WINDOW = 512  # llama-perplexity's default context; the model's own when that is shorter


# ---------------------------------------------------------------- scorers: logits for a sequence of ids


class HFScorer:
    """transformers (+ peft adapters, loaded as the `hf` engine loads them), fp32 on CPU."""

    engine = "hf"

    def __init__(self, ref, adapters: Sequence[str | Path] = (), device: str | None = None):
        from loraforge.infer.hf import HFEngine

        self._engine = HFEngine(ref, adapters=adapters, device=device)
        self.model, self.tokenizer = self._engine.model, self._engine.tokenizer
        self.n_ctx = self._engine.n_ctx
        self.device = self._engine.device

    def tokenize(self, text: str, bos: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=bos)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """[len(ids), vocab] float32: row i is the distribution of the token after ids[i]."""
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([list(ids)], device=self.device))
        # a prompt-learning adapter prepends virtual tokens: the last len(ids) rows are the text's
        return out.logits[0, -len(ids):].float().cpu().numpy()

    def last_logits(self, ids: Sequence[int]) -> np.ndarray:
        return self.logits(ids)[-1]

    def close(self) -> None:
        self._engine.close()


class GGUFScorer:
    """llama.cpp (llama-cpp-python) with `logits_all`, as `export gguf --verify` reads logits."""

    engine = "llamacpp"

    def __init__(self, path: Path, n_ctx: int = 0, lora: str | Path | None = None):
        import llama_cpp

        threads = usable_cpus()
        try:
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=max(n_ctx, 512), logits_all=True,
                                       n_threads=threads, n_threads_batch=threads, lora_path=str(lora) if lora else None,
                                       verbose=False)
        except ValueError as exc:  # "Failed to load model from file"
            raise LoraforgeError(f"{path}: llama.cpp cannot load it ({exc})") from None
        # llama.cpp rounds the context up; llama-cpp-python's token buffer keeps the size asked for
        self.n_ctx = min(self.llm.n_ctx(), len(self.llm.input_ids))
        self.trained_ctx = self.llm._model.n_ctx_train()

    def tokenize(self, text: str, bos: bool = True) -> list[int]:
        # special=False: a "</s>" written in the text is text, not the end-of-sequence token
        return self.llm.tokenize(text.encode("utf-8"), add_bos=bos, special=False)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        self._eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def last_logits(self, ids: Sequence[int]) -> np.ndarray:
        self._eval(ids)
        return np.array(self.llm.scores[len(ids) - 1], dtype=np.float32)

    def _eval(self, ids: Sequence[int]) -> None:
        if len(ids) > self.n_ctx:
            raise LoraforgeError(f"{len(ids)} tokens do not fit llama.cpp's context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(ids))

    def close(self) -> None:
        self.llm.close()


Scorer = HFScorer | GGUFScorer


def open_scorer(model: str | Path, engine: str = "auto", adapters: Sequence[str | Path] = (),
                base: str | Path | None = None, n_ctx: int | None = None, device: str | None = None) -> Scorer:
    """A scorer for a model reference: llama.cpp for a .gguf, transformers (+peft) for a directory.

    `n_ctx`: the llama.cpp context to allocate (logits for every position are kept, so not more
    than needed; default the file's trained context)."""
    from loraforge.models import resolve_model

    ref = resolve_model(model, base=base)
    choice = engine if engine != "auto" else ("llamacpp" if ref.kind == "gguf" else "hf")
    if choice == "hf":
        return HFScorer(ref, adapters=adapters, device=device)
    if choice == "llamacpp":
        if ref.kind != "gguf":
            raise LoraforgeError(f"{ref.path} is a HF directory: llama.cpp needs a .gguf — export it first "
                                 "(loraforge export gguf), or use --engine hf")
        if len(adapters) > 1:
            raise LoraforgeError("llama.cpp applies one LoRA adapter .gguf here; merge the others first")
        return GGUFScorer(ref.path, n_ctx=n_ctx or 0, lora=adapters[0] if adapters else None)
    raise LoraforgeError(f"unknown engine '{engine}': choose auto, llamacpp or hf")


def model_context(scorer: Scorer) -> int:
    """The context the model was trained with."""
    return scorer.trained_ctx if isinstance(scorer, GGUFScorer) else scorer.n_ctx


# ---------------------------------------------------------------- the strided rule


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def windows(n_tokens: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first_scored) of each window over `n_tokens` ids: tokens first_scored..end-1
    are scored in it (token 0 never is: nothing predicts it)."""
    if window < 2 or not 0 < stride <= window:
        raise LoraforgeError(f"window {window} / stride {stride}: need window >= 2 and 0 < stride <= window")
    scored_to = 1
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + window, n_tokens)
        # a window's first token has nothing before it in the window: with stride == window
        # (no overlap) it goes unscored, as in transformers' loop
        first = max(scored_to, begin + 1)
        if end > first:
            yield begin, end, first
            scored_to = end
        if end == n_tokens:
            return


def window_logprobs(scorer: Scorer, ids: Sequence[int], window: int, stride: int,
                    progress: Callable[[int], None] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per window: (positions t of the tokens it scores, [len(t), vocab] float64 log-softmax rows,
    row j the model's distribution for ids[t[j]] given what came before it in the window).

    Every token but the first is in exactly one window's positions (see the module docstring)."""
    for begin, end, first in windows(len(ids), window, stride):
        logits = scorer.logits(ids[begin:end])
        positions = np.arange(first, end)
        yield positions, log_softmax(logits[positions - 1 - begin])
        if progress:
            progress(len(positions))


def token_logprobs(scorer: Scorer, ids: Sequence[int], window: int, stride: int,
                   progress: Callable[[int], None] | None = None) -> np.ndarray:
    """log p(ids[t] | context), float64, for the tokens the strided rule scores, in text order
    (t = 1 … len(ids)-1 when stride < window)."""
    target = np.asarray(list(ids))
    parts = [rows[np.arange(len(positions)), target[positions]]
             for positions, rows in window_logprobs(scorer, list(ids), window, stride, progress)]
    return np.concatenate(parts) if parts else np.empty(0)


def scored_count(n_tokens: int, window: int, stride: int) -> int:
    return sum(end - first for _, end, first in windows(n_tokens, window, stride))


# ---------------------------------------------------------------- the command


@dataclass
class PerplexityResult:
    report: dict
    json_path: Path
    md_path: Path


def read_text_file(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise LoraforgeError(f"--text {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise LoraforgeError(f"{path}:{line}: not UTF-8 text (byte {exc.start}) — convert it, e.g. "
                             "iconv -f GB18030 -t UTF-8") from None
    if not text.strip():
        raise LoraforgeError(f"{path} is empty: perplexity needs some text — pass a held-out text file")
    return text


def perplexity(model: str | Path, text_file: Path, window: int | None = None, stride: int | None = None,
               engine: str = "auto", adapters: Sequence[str | Path] = (), base: str | Path | None = None,
               device: str | None = None) -> dict:
    """Perplexity of `text_file` under `model` (a report dict; nothing written)."""
    from tqdm import tqdm

    text = read_text_file(text_file)
    if window is not None and window < 2:
        raise LoraforgeError(f"--window {window}: a window needs at least 2 tokens")
    # llama.cpp keeps logits for every position: allocate the window, not the trained context
    scorer = open_scorer(model, engine, adapters, base, n_ctx=window or DEFAULT_WINDOW, device=device)
    try:
        trained = model_context(scorer)
        window = window or min(DEFAULT_WINDOW, trained)
        if window > trained:
            raise LoraforgeError(f"--window {window} is longer than the {trained} tokens the model was trained "
                                 f"on: choose --window {trained} or less")
        stride = stride or max(window // 2, 1)
        started = time.perf_counter()
        ids = scorer.tokenize(text)
        if len(ids) < 2:
            raise LoraforgeError(f"{text_file} has {len(ids)} token: perplexity needs at least 2")
        with tqdm(total=scored_count(len(ids), window, stride), desc="perplexity", unit="tok") as bar:
            logprobs = token_logprobs(scorer, ids, window, stride, bar.update)
        seconds = time.perf_counter() - started
        engine_name = scorer.engine
    finally:
        scorer.close()
    nll = float(-logprobs.mean())
    return {"command": "eval ppl", "model": str(model), "adapters": [str(a) for a in adapters],
            "engine": engine_name, "text": str(text_file), "characters": len(text),
            "tokens": len(ids), "scored_tokens": int(len(logprobs)),
            "window": window, "stride": stride, "windows": sum(1 for _ in windows(len(ids), window, stride)),
            "rule": "strided sliding window (transformers' perplexity of fixed-length models): each token "
                    "after the first scored once, with at least window - stride tokens of context after the "
                    "first window",
            "nll_mean": nll, "perplexity": math.exp(nll),
            # tokens per character differ between vocabularies: bits per character compare across them
            "bits_per_character": float(-logprobs.sum() / math.log(2) / len(text)),
            "seconds": seconds, "tokens_per_second": len(ids) / seconds if seconds else None}


def format_perplexity(report: dict) -> str:
    """eval.md: the table a user reads."""
    return "\n".join([
        f"# Perplexity of {Path(report['text']).name}", "",
        "| model | engine | tokens | window / stride | perplexity | bits/char | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| {Path(report['model']).name} | {report['engine']} | {report['scored_tokens']} | "
        f"{report['window']} / {report['stride']} | {report['perplexity']:.3f} | "
        f"{report['bits_per_character']:.3f} | {report['tokens_per_second']:.0f} |", "",
        f"Rule: {report['rule']}.", ""])


def write_report(report: dict, out_dir: Path, markdown: str) -> tuple[Path, Path]:
    """A new folder `out_dir` with eval.json and eval.md; it appears whole (built under a
    temporary name, renamed when both files are written)."""
    import json

    from loraforge.outputs import new_dir

    out_dir = Path(out_dir)
    with new_dir(out_dir) as tmp:
        (tmp / "eval.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
        (tmp / "eval.md").write_text(markdown, encoding="utf-8")
    return out_dir / "eval.json", out_dir / "eval.md"


def default_out_dir(model: str | Path, kind: str) -> Path:
    """Beside the model: runs/sft → runs/sft.eval-ppl, model.gguf → model.eval-ppl."""
    path = Path(model).expanduser().resolve()
    return path.with_name(f"{path.stem if path.is_file() else path.name}.eval-{kind}")
