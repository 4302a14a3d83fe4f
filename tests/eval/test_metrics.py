"""eval/metrics.py against the packages LLaMA-Factory's compute_metrics calls, and bert-score's own scorer."""

from __future__ import annotations

import json
from pathlib import Path

import jieba
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from loraforge.errors import LoraforgeError
from loraforge.eval.metrics import (
    BertScoreOptions,
    bert_scorer,
    bert_scores,
    default_layer,
    example_metrics,
    mean_metrics,
    similarity,
)

# (prediction, reference)
CASES = {
    "chinese": ("今天天气很好，我们去公园散步吧。", "今天天气不错，我们去公园走走。"),
    "english": ("The cat sat on the mat.", "The cat is sitting on the mat."),
    "mixed": ("用 Python 写一个排序函数", "用Python写一个快速排序的函数"),
    "empty prediction": ("", "北京是中国的首都。"),
    "whitespace prediction": ("  \n", "北京是中国的首都。"),
    "identical": ("北京是中国的首都。", "北京是中国的首都。"),
    "disjoint": ("苹果香蕉", "汽车飞机"),
    "punctuation only": ("。，！", "好的"),
    "short": ("好", "好"),
}


def reference_scores(prediction: str, reference: str) -> dict[str, float]:
    """LLaMA-Factory's ComputeSimilarity body for one pair, written out against the packages."""
    hypothesis, gold = list(jieba.cut(prediction)), list(jieba.cut(reference))
    if len(" ".join(hypothesis).split()) == 0 or len(" ".join(gold).split()) == 0:
        result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        result = Rouge().get_scores(" ".join(hypothesis), " ".join(gold))[0]
    scores = {k: round(v["f"] * 100, 4) for k, v in result.items()}
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores


@pytest.mark.parametrize("case", list(CASES))
def test_similarity_equals_llama_factory_definition(case):
    prediction, reference = CASES[case]
    assert similarity(prediction, reference) == pytest.approx(reference_scores(prediction, reference), abs=0)


def test_table_shape():
    scores = {case: similarity(*pair) for case, pair in CASES.items()}
    assert scores["identical"]["rouge-l"] == 100.0 and scores["identical"]["bleu-4"] == 100.0
    assert all(v == 0.0 for v in scores["empty prediction"].values())
    assert all(v == 0.0 for v in scores["disjoint"].values())
    assert 0 < scores["chinese"]["rouge-1"] < 100 and 0 < scores["english"]["bleu-4"] < 100


def test_exact_match_and_lengths_and_mean():
    rows = [example_metrics(" 好的\n", "好的"), example_metrics("不好", "好的")]
    assert [r["exact_match"] for r in rows] == [100.0, 0.0]
    assert rows[0]["prediction_chars"] == 4 and rows[0]["reference_chars"] == 2
    mean = mean_metrics(rows)
    assert mean["exact_match"] == 50.0
    assert mean["bleu-4"] == pytest.approx((rows[0]["bleu-4"] + rows[1]["bleu-4"]) / 2)


# ---------------------------------------------------------------- BERTScore on a tiny BERT

CHARS = "今天天气很好不错我们去公园散步吧走北京是中国的首都苹果香蕉汽车飞机猫坐在垫子上"


def build_tiny_bert(folder: Path, layers: int = 3) -> Path:
    """A BERT with random weights and a character vocabulary, saved like a downloaded model."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(CHARS), "，", "。"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), tokenize_chinese_chars=True,
                      model_max_length=128).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


PAIRS = [CASES[c] for c in ("chinese", "identical", "disjoint", "mixed")]


@pytest.mark.parametrize("layer", [1, 3])
def test_bertscore_equals_bert_score_package(tiny_bert, layer):
    from bert_score import BERTScorer

    predictions, references = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    ours = bert_scores(bert_scorer(BertScoreOptions(tiny_bert, layer)), predictions, references)
    p, r, f = BERTScorer(model_type=str(tiny_bert), num_layers=layer).score(predictions, references)
    assert [row["bertscore-p"] for row in ours] == pytest.approx([x * 100 for x in p.tolist()], abs=1e-4)
    assert [row["bertscore-r"] for row in ours] == pytest.approx([x * 100 for x in r.tolist()], abs=1e-4)
    assert [row["bertscore-f1"] for row in ours] == pytest.approx([x * 100 for x in f.tolist()], abs=1e-4)
    assert ours[1]["bertscore-f1"] == pytest.approx(100.0, abs=1e-3)  # identical texts


def test_bertscore_rescaled_with_baseline_file(tiny_bert, tmp_path):
    """--bertscore-baseline: bert-score's rescaling, (raw − b) / (1 − b), with the file's row for the layer."""
    baseline = tmp_path / "baseline.tsv"
    baseline.write_text("LAYER,P,R,F\n0,0.1,0.1,0.1\n1,0.5,0.6,0.7\n2,0.2,0.2,0.2\n3,0.3,0.3,0.3\n", encoding="utf-8")
    predictions, references = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    raw = bert_scores(bert_scorer(BertScoreOptions(tiny_bert, 1)), predictions, references)
    rescaled = bert_scores(bert_scorer(BertScoreOptions(tiny_bert, 1, baseline=baseline)), predictions, references)
    for before, after in zip(raw, rescaled):
        for key, b in (("bertscore-p", 0.5), ("bertscore-r", 0.6), ("bertscore-f1", 0.7)):
            assert after[key] == pytest.approx((before[key] / 100 - b) / (1 - b) * 100, abs=1e-3)


def test_bertscore_default_layer(tiny_bert, tmp_path):
    assert default_layer(tiny_bert)[0] == 2  # 2/3 of 3
    named = tmp_path / "bert-base-chinese"
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"num_hidden_layers": 12}), encoding="utf-8")
    assert default_layer(named) == (8, "bert-score's layer for bert-base-chinese")


def test_bertscore_tokenizer_without_max_length(tiny_bert, tmp_path):
    """A tokenizer_config.json with no model_max_length: bert-score alone fails; ours truncates at the positions."""
    import shutil

    folder = tmp_path / "no-max"
    shutil.copytree(tiny_bert, folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    settings.pop("model_max_length")
    (folder / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    rows = bert_scores(bert_scorer(BertScoreOptions(folder, 2)), ["今天天气很好" * 40], ["今天天气不错"])
    assert 0 < rows[0]["bertscore-f1"] < 100


def test_bertscore_errors(tiny_bert, tmp_path):
    with pytest.raises(LoraforgeError, match="no config.json"):
        bert_scorer(BertScoreOptions(tmp_path / "missing"))
    with pytest.raises(LoraforgeError, match="has layers 0–3"):
        bert_scorer(BertScoreOptions(tiny_bert, 7))
    with pytest.raises(LoraforgeError, match="no such file"):
        bert_scorer(BertScoreOptions(tiny_bert, 1, baseline=tmp_path / "nope.tsv"))
