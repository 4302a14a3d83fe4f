"""`loraforge eval generate` end to end on the trained tiny run: adapter dir, GGUF, --compare, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.cli import main
from loraforge.eval.generate import load_eval_data
from loraforge.eval.metrics import similarity


@pytest.fixture(scope="module")
def run(learned_run):
    """(sft run dir, its loraforge.yaml, the base it was trained on)."""
    config, result = learned_run
    run_dir = Path(result.output_dir)
    return run_dir, run_dir / "loraforge.yaml", Path(config.model.path)


@pytest.fixture(scope="module")
def learned_gguf(learned_run, tmp_path_factory) -> Path:
    from loraforge.export.gguf_writer import export_gguf

    config, result = learned_run
    return export_gguf(config.model.path, [result.output_dir], tmp_path_factory.mktemp("gguf") / "learned-f16.gguf",
                       "f16")


def read_eval(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text(encoding="utf-8"))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_bertscore_per_example_and_mean(tiny_llama, tmp_path):
    """--bertscore-model: P/R/F1 per example in the predictions, their mean in eval.json, the layer recorded."""
    from bert_score import BERTScorer
    from test_metrics import build_tiny_bert

    bert = build_tiny_bert(tmp_path / "tiny-bert")
    data = tmp_path / "questions.jsonl"
    data.write_text('{"instruction": "你好", "output": "今天天气很好"}\n{"instruction": "北京", "output": "北京是中国的首都"}\n',
                    encoding="utf-8")
    out = tmp_path / "eval"
    assert main(["eval", "generate", str(tiny_llama), "--data", str(data), "--template", "chinese-alpaca",
                 "--max-new-tokens", "8", "--bertscore-model", str(bert), "-o", str(out)]) == 0
    report = read_eval(out)
    assert report["bertscore"]["layer"] == 2 and "2/3" in report["bertscore"]["layer_from"]
    rows = lines(out / report["models"][0]["predictions"])
    p, r, f = BERTScorer(model_type=str(bert), num_layers=2).score([row["prediction"] for row in rows],
                                                                  [row["reference"] for row in rows])
    assert [row["metrics"]["bertscore-f1"] for row in rows] == pytest.approx([x * 100 for x in f.tolist()], abs=1e-3)
    assert report["models"][0]["metrics"]["bertscore-p"] == pytest.approx(p.mean().item() * 100, abs=1e-3)
    assert "| BERTScore F1 |" in (out / "eval.md").read_text(encoding="utf-8")


def test_bertscore_flags_need_a_model(tiny_llama, questions, tmp_path, capsys):
    code, err = run_cli(["eval", "generate", str(tiny_llama), "--data", str(questions), "--bertscore-layers", "3",
                         "-o", str(tmp_path / "eval")], capsys)
    assert code == 2 and "need --bertscore-model" in err


@pytest.mark.slow
def test_adapter_beats_base(run, tmp_path, capsys):
    run_dir, config_yaml, base = run
    out = tmp_path / "eval"
    assert main(["eval", "generate", str(run_dir), "--compare", str(base), "--data", str(config_yaml),
                 "--max-new-tokens", "48", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| metric | sft |" in printed and "Δ vs" in printed
    report = read_eval(out)
    tuned, untuned = (m["metrics"] for m in report["models"])
    assert report["data"]["examples"] == 16 and report["data"]["template"] == "chinese-alpaca"
    assert report["generation"]["temperature"] == 0.0
    for key in ("bleu-4", "rouge-1", "rouge-l", "exact_match"):
        assert tuned[key] > untuned[key], key
    assert tuned["exact_match"] >= 50  # it learned most answers by heart
    rows = lines(out / report["models"][0]["predictions"])
    assert len(rows) == 16 and all(":" in row["source"] for row in rows)
    for row in rows:  # the per-example numbers are the metric's own
        assert {k: row["metrics"][k] for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l")} == \
            pytest.approx(similarity(row["prediction"], row["reference"]))
    mean_bleu = sum(row["metrics"]["bleu-4"] for row in rows) / len(rows)
    assert tuned["bleu-4"] == pytest.approx(mean_bleu, abs=1e-4)
    markdown = (out / "eval.md").read_text(encoding="utf-8")
    assert "| BLEU-4 |" in markdown and "s per 100 examples" in markdown
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.slow
def test_gguf_matches_adapter_and_beats_base(run, learned_gguf, tmp_path):
    run_dir, config_yaml, base = run
    out = tmp_path / "eval"
    assert main(["eval", "generate", str(learned_gguf), "--compare", str(run_dir), str(base),
                 "--data", str(config_yaml), "--max-new-tokens", "48", "--n-ctx", "512", "-o", str(out)]) == 0
    report = read_eval(out)
    gguf, adapter, untuned = report["models"]
    assert (gguf["engine"], adapter["engine"]) == ("llamacpp", "hf")
    # greedy text is the same in both engines, so every score is
    assert [r["prediction"] for r in lines(out / gguf["predictions"])] == \
        [r["prediction"] for r in lines(out / adapter["predictions"])]
    assert gguf["metrics"] == adapter["metrics"]
    assert gguf["metrics"]["rouge-l"] > untuned["metrics"]["rouge-l"]
    assert gguf["metrics"]["bleu-4"] > untuned["metrics"]["bleu-4"]


def test_val_split_is_trains(tiny_llama, tmp_path):
    """With data.val_size the held-out examples are exactly those train held out, in its order."""
    from loraforge.config import dump_config
    from loraforge.data.dataset import build_examples, split_eval
    from loraforge.data.records import Conversation, Turn
    from loraforge.data.templates import get_template
    from loraforge.data.tokenize import encode_conversation
    from loraforge.train.run import load_tokenizer

    from conftest import sft_config

    config = sft_config(tiny_llama, tmp_path / "run", "data.val_size=0.25", "train.seed=7")
    config_yaml = tmp_path / "config.yaml"
    config_yaml.write_text(dump_config(config), encoding="utf-8")
    data = load_eval_data([str(config_yaml)])
    assert "val split" in data.description

    tokenizer = load_tokenizer(config)
    train_set, held_out = split_eval(build_examples(config, tokenizer)[0], config.data.val_size, config.train.seed)
    template = get_template(config.data.template)

    def ids(example):
        turns = [Turn(m["role"], m["content"]) for m in example.messages if m["role"] != "system"]
        system = next((m["content"] for m in example.messages if m["role"] == "system"), None)
        conversation = Conversation(tuple(turns) + (Turn("assistant", example.reference),), system)
        return encode_conversation(tokenizer, template, conversation, cutoff_len=config.data.cutoff_len).input_ids

    assert [ids(e) for e in data.examples] == held_out.input_ids
    assert [ids(e) for e in load_eval_data([str(config_yaml)], split="train").examples] == train_set.input_ids
    assert len(load_eval_data([str(config_yaml)], split="all", limit=3).examples) == 3


def run_cli(args, capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


@pytest.fixture()
def questions(tmp_path) -> Path:
    data = tmp_path / "questions.jsonl"
    data.write_text('{"instruction": "你好", "output": "你好！"}\n', encoding="utf-8")
    return data


def test_no_such_model(tiny_llama, questions, tmp_path, capsys):
    out = tmp_path / "eval"
    code, err = run_cli(["eval", "generate", str(tiny_llama), "--compare", str(tmp_path / "nope"),
                         "--data", str(questions), "-o", str(out)], capsys)
    assert code == 2 and "no such model directory" in err and str(tmp_path / "nope") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["questions.jsonl"]


def test_example_without_reference(tiny_llama, tmp_path, capsys):
    data = tmp_path / "questions.jsonl"
    data.write_text('{"instruction": "你好", "output": "你好！"}\n{"instruction": "再见"}\n', encoding="utf-8")
    out = tmp_path / "eval"
    code, err = run_cli(["eval", "generate", str(tiny_llama), "--data", str(data), "-o", str(out)], capsys)
    assert code == 2 and f"{data}:2" in err and "output" in err
    assert not out.exists()


def test_output_exists(tiny_llama, questions, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.json").write_text("{}", encoding="utf-8")
    code, err = run_cli(["eval", "generate", str(tiny_llama), "--data", str(questions), "-o", str(out)], capsys)
    assert code == 2 and "already exists" in err


def test_failure_mid_run_leaves_nothing(tiny_llama, tmp_path, capsys):
    """A prompt too long for the context fails at its file:line, after the first answer; no output."""
    data = tmp_path / "long.json"
    data.write_text(json.dumps([{"instruction": "你好", "output": "你好！"},
                                {"instruction": "很长的问题" * 200, "output": "好"}], ensure_ascii=False, indent=1),
                    encoding="utf-8")
    out = tmp_path / "eval"
    code, err = run_cli(["eval", "generate", str(tiny_llama), "--data", str(data), "--template", "chinese-alpaca",
                         "--n-ctx", "128", "--max-new-tokens", "8", "-o", str(out)], capsys)
    assert code == 2 and f"{data}:" in err and "context" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["long.json"]
