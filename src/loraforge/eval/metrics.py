"""Text-similarity metrics for generated answers: BLEU-4, ROUGE-1/2/L, exact match, length, BERTScore.

BLEU and ROUGE follow LLaMA-Factory's `compute_metrics` for `do_predict`
(src/llamafactory/train/sft/metric.py, `ComputeSimilarity`), so a number here means what
it means there and in the Chinese fine-tuning notes that quote it:

- ROUGE-1/2/L: the F score of `rouge_chinese.Rouge` on both texts cut by jieba and joined
  by spaces. jieba cuts Chinese into words and other text at spaces and punctuation (the
  spaces themselves vanish in the join), so English is scored word by word. When either
  cut text is empty, all three are 0 (rouge-chinese would raise).
- BLEU-4: nltk's `sentence_bleu` on the *characters* of both texts (LLaMA-Factory passes
  `list(label)`, `list(pred)` — spaces count as characters), uniform 4-gram weights,
  `SmoothingFunction().method3` (NIST geometric sequence smoothing).
- each score ×100 and rounded to 4 places per example, then the plain mean.

Exact match compares the texts with surrounding whitespace stripped. BERTScore is the
`bert-score` package's own `BERTScorer` on a local model folder; nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import LoraforgeError

SIMILARITY_KEYS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)  # "Building prefix dict…" on every first cut otherwise
    return jieba


def word_cut(text: str) -> list[str]:
    """The words ROUGE counts: jieba's cut (Chinese words; other text split at spaces and punctuation)."""
    return " ".join(_jieba().cut(text)).split()


def similarity(prediction: str, reference: str) -> dict[str, float]:
    """BLEU-4 and ROUGE-1/2/L F of one prediction against its reference, ×100, rounded to 4 places."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hypothesis, gold = word_cut(prediction), word_cut(reference)
    if not hypothesis or not gold:
        rouge = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        scores = Rouge().get_scores(" ".join(hypothesis), " ".join(gold))[0]
        rouge = {key: scores[key]["f"] for key in ("rouge-1", "rouge-2", "rouge-l")}
    bleu = float(sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3))
    return {"bleu-4": round(bleu * 100, 4), **{key: round(value * 100, 4) for key, value in rouge.items()}}


def exact_match(prediction: str, reference: str) -> float:
    return 100.0 if prediction.strip() == reference.strip() else 0.0


def example_metrics(prediction: str, reference: str) -> dict[str, float]:
    """Every per-example text metric: BLEU-4, ROUGE-1/2/L, exact match, lengths in characters."""
    return {**similarity(prediction, reference), "exact_match": exact_match(prediction, reference),
            "prediction_chars": float(len(prediction)), "reference_chars": float(len(reference))}


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """The plain mean of each key over the examples (LLaMA-Factory's np.mean of the rounded scores)."""
    if not rows:
        raise LoraforgeError("no examples to average")
    return {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}


# ---------------------------------------------------------------- BERTScore


@dataclass(frozen=True)
class BertScoreOptions:
    model_dir: Path  # a local HF encoder folder (config.json, weights, tokenizer), e.g. bert-base-chinese
    num_layers: int | None = None  # the hidden layer whose embeddings are matched; None: default_layer()
    baseline: Path | None = None  # a bert-score baseline .tsv to rescale with; None: raw scores
    batch_size: int = 32
    device: str | None = None


def default_layer(model_dir: Path) -> tuple[int, str]:
    """(layer, why) for a local model: bert-score's own table when the folder is named like a model it
    knows (bert-base-chinese → 8), otherwise two thirds of the way up (its choice for BERT-base, 8 of 12)."""
    from bert_score.utils import model2layers

    config = _read_config(model_dir)
    for name in (model_dir.name, str(config.get("_name_or_path", "")).rstrip("/").rsplit("/", 1)[-1]):
        if name in model2layers:
            return model2layers[name], f"bert-score's layer for {name}"
    layers = config.get("num_hidden_layers") or config.get("n_layers") or config.get("num_layers")
    if not isinstance(layers, int) or layers < 1:
        raise LoraforgeError(f"{model_dir / 'config.json'}: no num_hidden_layers to choose a BERTScore layer from "
                             "— pass --bertscore-layers N")
    return max(1, round(layers * 2 / 3)), f"2/3 of its {layers} layers (bert-score's ratio for BERT-base)"


def _read_config(model_dir: Path) -> dict:
    import json

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise LoraforgeError(f"--bertscore-model {model_dir}: no config.json there — pass a local model folder "
                             "(e.g. a bert-base-chinese you downloaded); nothing is downloaded at run time")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LoraforgeError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def check_bertscore(options: BertScoreOptions) -> tuple[BertScoreOptions, dict]:
    """The options with the layer chosen, and what to record about them; every mistake found
    before any model loads (no folder, a layer it does not have, a missing baseline file)."""
    model_dir = Path(options.model_dir).expanduser().resolve()
    config = _read_config(model_dir)
    if options.num_layers is not None:
        layer, why = options.num_layers, "--bertscore-layers"
    else:
        layer, why = default_layer(model_dir)
    most = config.get("num_hidden_layers")
    if layer < 0 or (isinstance(most, int) and layer > most):
        raise LoraforgeError(f"--bertscore-layers {layer}: {model_dir} has layers 0–{most}")
    if options.baseline is not None and not Path(options.baseline).is_file():
        raise LoraforgeError(f"--bertscore-baseline {options.baseline}: no such file (bert-score's baseline .tsv, "
                             "one row per layer: P, R, F)")
    chosen = BertScoreOptions(model_dir, layer, options.baseline, options.batch_size, options.device)
    return chosen, {"model": str(model_dir), "layer": layer, "layer_from": why,
                    "baseline": str(options.baseline) if options.baseline else None}


def bert_scorer(options: BertScoreOptions):
    """bert-score's BERTScorer on the local folder, at the chosen layer, offline."""
    options, _ = check_bertscore(options)
    model_dir, layer, config = options.model_dir, options.num_layers, _read_config(options.model_dir)
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder only: never reach the hub
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from bert_score import BERTScorer

    try:
        scorer = BERTScorer(model_type=str(model_dir), num_layers=layer, batch_size=options.batch_size,
                            device=options.device, rescale_with_baseline=options.baseline is not None,
                            # lang only satisfies bert-score's check; the baseline comes from the file
                            lang="custom" if options.baseline is not None else None,
                            baseline_path=str(options.baseline) if options.baseline is not None else None)
    except (OSError, ValueError, AssertionError) as exc:
        raise LoraforgeError(f"--bertscore-model {model_dir}: bert-score could not load it ({exc})") from None
    # bert-score truncates at tokenizer.model_max_length; a tokenizer_config.json without one reads as
    # 10^30, which the fast tokenizer cannot take: use the model's position limit instead
    tokenizer = scorer._tokenizer
    if tokenizer.model_max_length > 1_000_000 and isinstance(config.get("max_position_embeddings"), int):
        tokenizer.model_max_length = config["max_position_embeddings"]
    return scorer


def bert_scores(scorer, predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    """Per-example BERTScore precision, recall and F1 (×100, like the other metrics)."""
    precision, recall, f1 = scorer.score(predictions, references)
    return [{"bertscore-p": float(p) * 100, "bertscore-r": float(r) * 100, "bertscore-f1": float(f) * 100}
            for p, r, f in zip(precision.tolist(), recall.tolist(), f1.tolist())]
