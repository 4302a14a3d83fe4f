"""`eval choice`: C-Eval/CMMLU layouts, the letter scores against transformers by hand, HF = GGUF,
a model taught to answer "A" scores higher, and the errors."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from loraforge.cli import main
from loraforge.errors import LoraforgeError
from loraforge.eval.choice import evaluate_choice, load_split, read_questions
from loraforge.export.gguf_writer import export_gguf

SUBJECTS = {  # subject → (question, options, answer); "always_a" answers A everywhere
    "always_a": [(f"第{i}题：下面哪一个是正确的说法？", ("春天", "夏天", "秋天", "冬天"), "A") for i in range(1, 7)],
    "mixed": [("长城位于哪个国家？", ("日本", "中国", "法国", "美国"), "B"),
              ("一年有几个季节？", ("两个", "三个", "四个", "五个"), "C"),
              ("竹子生长得怎么样？", ("很慢", "不长", "只在冬天", "很快"), "D"),
              ("太阳从哪边升起？", ("东边", "西边", "南边", "北边"), "A")],
}


def write_ceval(root, subjects=SUBJECTS):
    """C-Eval's layout: val/{s}_val.csv and dev/{s}_dev.csv (with explanation)."""
    for split in ("val", "dev"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject, rows in subjects.items():
            with open(root / split / f"{subject}_{split}.csv", "w", encoding="utf-8", newline="") as handle:
                out = csv.writer(handle)
                out.writerow(["id", "question", "A", "B", "C", "D", "answer"] + (["explanation"] if split == "dev" else []))
                for i, (q, options, answer) in enumerate(rows if split == "val" else rows[:2]):
                    out.writerow([i, q, *options, answer] + (["因为如此。"] if split == "dev" else []))
    return root


def write_cmmlu(root):
    """CMMLU's layout: dev/{s}.csv and test/{s}.csv, a leading unnamed index column, capitalized names."""
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True)
        with open(root / split / "mixed.csv", "w", encoding="utf-8", newline="") as handle:
            out = csv.writer(handle)
            out.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
            for i, (q, options, answer) in enumerate(SUBJECTS["mixed"]):
                out.writerow([i, q, *options, answer])
    return root


@pytest.fixture(scope="module")
def ceval(tmp_path_factory):
    return write_ceval(tmp_path_factory.mktemp("ceval"))


@pytest.fixture(scope="module")
def pretrained_f32(pretrained_llama, tmp_path_factory):
    return export_gguf(pretrained_llama, [], tmp_path_factory.mktemp("choice-gguf") / "pretrained-f32.gguf", "f32")


def test_both_layouts_read_alike(ceval, tmp_path):
    split, questions = load_split(ceval, None)
    assert split == "val" and sorted(questions) == ["always_a", "mixed"]
    cmmlu_split, cmmlu = load_split(write_cmmlu(tmp_path / "cmmlu"), None)
    assert cmmlu_split == "test"
    strip = [(q.question, q.options, q.answer) for q in questions["mixed"]]
    assert [(q.question, q.options, q.answer) for q in cmmlu["mixed"]] == strip
    assert cmmlu["mixed"][1].where.endswith("mixed.csv:3")


def _by_hand(model_dir, ceval, k):
    """Chinese-LLaMA-Alpaca's rule, written out: logit('A' alone) + logit('：A'[-1]) at the prompt's end."""
    from transformers import AutoModelForCausalLM

    from loraforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = {c: (tokenizer.encode(c, add_special_tokens=False)[0], tokenizer.encode("：" + c)[-1]) for c in "ABCD"}
    out = []
    for subject, rows in SUBJECTS.items():
        shots = "".join(f"{q}\nA. {o[0]}\nB. {o[1]}\nC. {o[2]}\nD. {o[3]}\n答案：{a}\n\n" for q, o, a in rows[:k])
        header = f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n" if k else ""
        for q, o, _ in rows:
            prompt = f"{header}{shots}{q}\nA. {o[0]}\nB. {o[1]}\nC. {o[2]}\nD. {o[3]}\n答案："
            with torch.no_grad():
                logits = model(torch.tensor([tokenizer.encode(prompt)])).logits[0, -1]
            probs = torch.softmax(logits.double(), -1)
            score = {c: float(logits[a] + logits[b]) for c, (a, b) in ids.items()}
            out.append((max(score, key=score.get), {c: float(probs[a] + (probs[b] if b != a else 0))
                                                    for c, (a, b) in ids.items()}))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("k", [0, 2])
def test_choices_equal_a_hand_computation_with_transformers(pretrained_llama, ceval, k):
    report = evaluate_choice(pretrained_llama, ceval, k=k)
    expected = _by_hand(pretrained_llama, ceval, k)
    assert [r["choice"] for r in report["predictions"]] == [c for c, _ in expected]
    for row, (_, probs) in zip(report["predictions"], expected):
        assert row["probs"] == pytest.approx(probs, rel=1e-4, abs=1e-9)
        assert row["shots"] == k
    correct = sum(r["correct"] for r in report["predictions"])
    assert report["overall"]["accuracy"] == correct / 10


@pytest.mark.slow
@pytest.mark.parametrize("k", [0, 2])
def test_hf_and_gguf_engines_choose_alike(pretrained_llama, pretrained_f32, ceval, k):
    hf = evaluate_choice(pretrained_llama, ceval, k=k)
    gguf = evaluate_choice(pretrained_f32, ceval, k=k)
    assert (hf["engine"], gguf["engine"]) == ("hf", "llamacpp")
    assert hf["letter_ids"] == gguf["letter_ids"]
    assert [r["tokens"] for r in hf["predictions"]] == [r["tokens"] for r in gguf["predictions"]]
    assert [r["choice"] for r in hf["predictions"]] == [r["choice"] for r in gguf["predictions"]]
    for a, b in zip(hf["predictions"], gguf["predictions"]):
        assert a["probs"] == pytest.approx(b["probs"], rel=2e-3, abs=1e-6)
    assert hf["subjects"] == gguf["subjects"]


@pytest.fixture(scope="module")
def taught_a(pretrained_llama, ceval, tmp_path_factory):
    """pretrained_llama fine-tuned a few seconds to answer A after 答案： on always_a's prompts."""
    from transformers import AutoModelForCausalLM

    from loraforge.eval.choice import render_choice_prompt
    from loraforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(pretrained_llama)
    model = AutoModelForCausalLM.from_pretrained(pretrained_llama, dtype=torch.float32)
    _, questions = load_split(ceval, None, ["always_a"])
    target = tokenizer.encode("：A")[-1]
    batch = [tokenizer.encode(render_choice_prompt(q, [])) for q in questions["always_a"]]
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(15):
        loss = sum(torch.nn.functional.cross_entropy(model(torch.tensor([ids])).logits[0, -1:], torch.tensor([target]))
                   for ids in batch) / len(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = tmp_path_factory.mktemp("taught") / "taught-a"
    model.save_pretrained(out)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (pretrained_llama / name).exists():
            shutil.copyfile(pretrained_llama / name, out / name)
    return out


@pytest.mark.slow
def test_a_model_taught_to_answer_a_scores_higher_on_that_subject(pretrained_llama, taught_a, ceval, tmp_path):
    before = evaluate_choice(pretrained_llama, ceval, subjects=["always_a"])
    out = tmp_path / "out"
    assert main(["eval", "choice", str(taught_a), "--data", str(ceval), "--subjects", "always_a", "-o", str(out)]) == 0
    after = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert after["subjects"]["always_a"]["accuracy"] == 1.0 > before["subjects"]["always_a"]["accuracy"]
    assert "| always_a | 6 | 6 | 100.0% |" in (out / "eval.md").read_text(encoding="utf-8")


def _bad(tmp_path, header, rows):
    folder = tmp_path / "bad" / "val"
    folder.mkdir(parents=True)
    with open(folder / "s_val.csv", "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return tmp_path / "bad", folder / "s_val.csv"


@pytest.mark.parametrize("header,rows,message", [
    (["id", "question", "A", "B", "C", "answer"], [[0, "q", "a", "b", "c", "A"]], r"s_val\.csv:1: no column 'D'"),
    (["id", "question", "A", "B", "C", "D", "answer"], [[0, "q", "a", "b", "c", "d", "A"], [1, "q", "a", "b", "c", "d", "E"]],
     r"s_val\.csv:3: answer 'E'"),
    (["id", "question", "A", "B", "C", "D", "answer"], [[0, "q", "a", "b", "c", "d", ""]],
     r"s_val\.csv:2: no answer .*--split val"),
    (["id", "question", "A", "B", "C", "D", "answer"], [[0, "q", "a", "b"]], r"s_val\.csv:2: 4 fields .*'C', 'D', 'answer'"),
])
def test_bad_csv_names_file_line_and_column(tmp_path, header, rows, message):
    data, path = _bad(tmp_path, header, rows)
    with pytest.raises(LoraforgeError, match=message):
        read_questions(path, "s")


def test_cli_errors_exit_2_and_write_nothing(tiny_llama, ceval, tmp_path, capsys):
    data, _ = _bad(tmp_path, ["id", "question", "A", "B", "C", "answer"], [[0, "q", "a", "b", "c", "A"]])
    out = tmp_path / "out"
    cases = [([str(tiny_llama), "--data", str(data)], "no column 'D'"),
             ([str(tmp_path / "nope"), "--data", str(ceval)], "no such model directory"),
             ([str(tiny_llama), "--data", str(tmp_path / "none")], "no such folder"),
             ([str(tiny_llama), "--data", str(ceval), "--subjects", "physics"], "no val file for physics"),
             ([str(tiny_llama), "--data", str(ceval), "--split", "test"], "no test CSV files")]
    for args, message in cases:
        assert main(["eval", "choice", *args, "-o", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_one_shot_run_on_a_random_model_writes_both_files(tiny_llama, ceval, tmp_path):
    out = tmp_path / "out"
    assert main(["eval", "choice", str(tiny_llama), "--data", str(ceval), "-k", "1", "-o", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert report["overall"]["questions"] == 10 and report["k"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md"]
