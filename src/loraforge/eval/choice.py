"""`loraforge eval choice MODEL --data DIR`: C-Eval / CMMLU-style multiple choice.

Layouts read (one CSV per subject, UTF-8, a header row):

- C-Eval: `DIR/{val,dev,test}/{subject}_{split}.csv` (or all in DIR), columns
  `id,question,A,B,C,D,answer` (+ `explanation` in dev; test has no answers);
- CMMLU: `DIR/{dev,test}/{subject}.csv`, columns `,Question,A,B,C,D,Answer` (a leading
  unnamed index column). Column names are matched without regard to case.

The prompt and the scoring follow Chinese-LLaMA-Alpaca's C-Eval script (its
`scripts/ceval/llama_evaluator.py`, "constrained decoding", without the Alpaca wrapper):

    以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\\n\\n   (k-shot only)
    {dev question}\\nA. …\\nB. …\\nC. …\\nD. …\\n答案：{answer}\\n\\n            (k times, from dev)
    {question}\\nA. …\\nB. …\\nC. …\\nD. …\\n答案：

and the choice is the letter whose next-token logits, summed over its two spellings —
the letter as a word start ("A" alone, SentencePiece's "▁A") and after "：" ("：A"'s last
token) — is highest. A spelling that is one token both ways counts twice, which changes no
argmax. The report also gives each letter's next-token probability (full-vocabulary softmax).
A prompt longer than the context drops dev examples, the last first, until it fits.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraforge.errors import LoraforgeError
from loraforge.textfiles import read_text

LETTERS = ("A", "B", "C", "D")
COLUMNS = ("question", *LETTERS, "answer")


@dataclass(frozen=True)
class Question:
    subject: str
    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str  # "" where the split has none (C-Eval test)
    where: str  # file:line


# ---------------------------------------------------------------- reading the data


def subject_files(data_dir: Path, split: str) -> dict[str, Path]:
    """subject → CSV of `split`: DIR/split/*.csv, DIR/split/*_split.csv or DIR/*_split.csv."""
    data_dir = Path(data_dir)
    found: dict[str, Path] = {}
    for folder in (data_dir / split, data_dir):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.csv")):
            stem = path.stem
            if stem.endswith(f"_{split}"):
                found.setdefault(stem[:-len(split) - 1], path)
            elif folder != data_dir:  # CMMLU names files by subject alone inside the split folder
                found.setdefault(stem, path)
    return found


def read_questions(path: Path, subject: str, need_answers: bool = True) -> list[Question]:
    """One subject's questions; a missing column or a bad answer names the file:line."""
    path = Path(path)
    try:
        rows = list(csv.reader(io.StringIO(read_text(path), newline="")))
    except csv.Error as error:  # a NUL byte inside UTF-8 text, or a field past csv's size limit
        raise LoraforgeError(f"{path}: not a CSV file ({error})") from None
    if not rows:
        raise LoraforgeError(f"{path}:1: empty file — a header row with {', '.join(COLUMNS)} is needed")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in COLUMNS if c.lower() not in header]
    if missing:
        raise LoraforgeError(f"{path}:1: no column {', '.join(repr(c) for c in missing)} in the header "
                             f"({','.join(rows[0])}) — C-Eval's layout is id,question,A,B,C,D,answer, "
                             "CMMLU's ,Question,A,B,C,D,Answer")
    at = {c: header.index(c.lower()) for c in COLUMNS}
    id_at = header.index("id") if "id" in header else 0
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            short = [c for c in COLUMNS if at[c] >= len(row)]
            raise LoraforgeError(f"{path}:{line}: {len(row)} fields for {len(header)} columns — no "
                                 f"{', '.join(repr(c) for c in short) or 'value for every column'} "
                                 "(a quote left open or a missing comma?)")
        answer = row[at["answer"]].strip().upper()
        if answer not in LETTERS and (answer or need_answers):
            what = f"answer {row[at['answer']]!r}" if answer else "no answer"
            hint = " (C-Eval's test split has none: use --split val)" if not answer else ""
            raise LoraforgeError(f"{path}:{line}: {what} — it must be one of A, B, C, D{hint}")
        out.append(Question(subject, row[id_at].strip() or str(line - 2), row[at["question"]],
                            tuple(row[at[c]] for c in LETTERS), answer, f"{path}:{line}"))
    return out


def load_split(data_dir: Path, split: str | None, subjects: Sequence[str] = ()) -> tuple[str, dict[str, list[Question]]]:
    """(split, subject → questions); split None: 'val' where there is one (C-Eval), else 'test' (CMMLU)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise LoraforgeError(f"--data {data_dir}: no such folder — pass a C-Eval or CMMLU data folder "
                             "(val/, dev/, test/ with one CSV per subject)")
    if split is None:
        split = "val" if subject_files(data_dir, "val") else "test"
    files = subject_files(data_dir, split)
    if not files:
        raise LoraforgeError(f"{data_dir}: no {split} CSV files ({split}/*.csv, {split}/*_{split}.csv or "
                             f"*_{split}.csv) — is it a C-Eval/CMMLU folder, and is --split right?")
    if subjects:
        unknown = [s for s in subjects if s not in files]
        if unknown:
            raise LoraforgeError(f"--subjects: no {split} file for {', '.join(unknown)} in {data_dir} "
                                 f"(there are: {', '.join(sorted(files)[:10])}{' …' if len(files) > 10 else ''})")
        files = {s: files[s] for s in subjects}
    return split, {subject: read_questions(path, subject) for subject, path in files.items()}


# ---------------------------------------------------------------- the prompt


def format_question(q: Question, with_answer: bool) -> str:
    text = q.question + "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, q.options))
    return text + (f"\n答案：{q.answer}\n\n" if with_answer else "\n答案：")


def few_shot_header(subject: str) -> str:
    return f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"


def render_choice_prompt(q: Question, shots: Sequence[Question]) -> str:
    """Chinese-LLaMA-Alpaca's prompt: the header and the dev examples only when k > 0."""
    history = few_shot_header(q.subject) + "".join(format_question(s, True) for s in shots) if shots else ""
    return history + format_question(q, False)


def letter_token_ids(scorer) -> dict[str, tuple[int, int]]:
    """letter → (id as a word start, id after '：'), both from the model's own tokenizer."""
    return {letter: (scorer.tokenize(letter, bos=False)[0], scorer.tokenize(f"：{letter}", bos=False)[-1])
            for letter in LETTERS}


def score_letters(logits: np.ndarray, letter_ids: dict[str, tuple[int, int]]) -> tuple[str, dict, dict]:
    """(choice, letter → summed logit, letter → next-token probability) for one next-token logit row."""
    from loraforge.eval.ppl import log_softmax

    scores = {letter: float(logits[a] + logits[b]) for letter, (a, b) in letter_ids.items()}
    probs = np.exp(log_softmax(logits))
    prob = {letter: float(probs[a] + (probs[b] if b != a else 0.0)) for letter, (a, b) in letter_ids.items()}
    return max(LETTERS, key=lambda letter: scores[letter]), scores, prob


# ---------------------------------------------------------------- the command


def evaluate_choice(model: str | Path, data_dir: Path, k: int = 0, split: str | None = None,
                    subjects: Sequence[str] = (), engine: str = "auto", adapters: Sequence[str | Path] = (),
                    base: str | Path | None = None, n_ctx: int | None = None, device: str | None = None,
                    limit: int | None = None) -> dict:
    """Accuracy per subject and overall; every question's choice and letter probabilities."""
    from tqdm import tqdm

    from loraforge.eval.ppl import open_scorer

    if k < 0:
        raise LoraforgeError(f"-k {k}: the number of dev examples must be 0 or more")
    split, questions = load_split(data_dir, split, subjects)
    if limit:
        questions = {s: qs[:limit] for s, qs in questions.items()}
    dev: dict[str, list[Question]] = {}
    if k:
        dev_files = subject_files(data_dir, "dev")
        missing = [s for s in questions if s not in dev_files]
        if missing:
            raise LoraforgeError(f"-k {k}: no dev file for {', '.join(missing)} in {data_dir} — "
                                 "few-shot examples come from dev/; use -k 0 for zero-shot")
        dev = {s: read_questions(dev_files[s], s)[:k] for s in questions}
    total = sum(len(qs) for qs in questions.values())
    if not total:
        raise LoraforgeError(f"{data_dir}: the {split} files hold no questions")
    scorer = open_scorer(model, engine, adapters, base, n_ctx=n_ctx, device=device)
    rows, started = [], time.perf_counter()
    try:
        letter_ids = letter_token_ids(scorer)
        with tqdm(total=total, desc="choice", unit="q") as bar:
            for subject, qs in questions.items():
                for q in qs:
                    shots = dev.get(subject, [])
                    ids = scorer.tokenize(render_choice_prompt(q, shots))
                    while len(ids) > scorer.n_ctx and shots:
                        shots = shots[:-1]
                        ids = scorer.tokenize(render_choice_prompt(q, shots))
                    if len(ids) > scorer.n_ctx:
                        raise LoraforgeError(f"{q.where}: the question alone is {len(ids)} tokens, more than the "
                                             f"context of {scorer.n_ctx} — pass --n-ctx or skip the subject")
                    choice, scores, prob = score_letters(scorer.last_logits(ids), letter_ids)
                    rows.append({"subject": subject, "id": q.id, "answer": q.answer, "choice": choice,
                                 "correct": choice == q.answer, "shots": len(shots), "tokens": len(ids),
                                 "probs": prob, "scores": scores})
                    bar.update()
        engine_name = scorer.engine
    finally:
        scorer.close()
    seconds = time.perf_counter() - started
    per_subject = {}
    for subject in questions:
        mine = [r for r in rows if r["subject"] == subject]
        correct = sum(r["correct"] for r in mine)
        per_subject[subject] = {"questions": len(mine), "correct": correct, "accuracy": correct / len(mine)}
    correct = sum(r["correct"] for r in rows)
    return {"command": "eval choice", "model": str(model), "adapters": [str(a) for a in adapters],
            "engine": engine_name, "data": str(data_dir), "split": split, "k": k,
            "rule": "argmax over A-D of the next-token logits of the letter as a word start plus after '：' "
                    "(Chinese-LLaMA-Alpaca's C-Eval constrained decoding)",
            "letter_ids": letter_ids, "subjects": per_subject,
            "overall": {"questions": len(rows), "correct": correct, "accuracy": correct / len(rows),
                        "macro_accuracy": sum(s["accuracy"] for s in per_subject.values()) / len(per_subject)},
            "seconds": seconds, "seconds_per_100": 100 * seconds / len(rows), "predictions": rows}


def format_choice(report: dict) -> str:
    lines = [f"# Multiple choice: {Path(report['data']).name} ({report['split']}, {report['k']}-shot)", "",
             f"{Path(report['model']).name} under {report['engine']}", "",
             "| subject | questions | correct | accuracy |", "|---|---:|---:|---:|"]
    for subject, s in report["subjects"].items():
        lines.append(f"| {subject} | {s['questions']} | {s['correct']} | {s['accuracy']:.1%} |")
    o = report["overall"]
    lines += [f"| **all** | {o['questions']} | {o['correct']} | **{o['accuracy']:.1%}** |", "",
              f"Macro average over subjects: {o['macro_accuracy']:.1%}. {report['seconds_per_100']:.1f} s per "
              f"100 questions. Rule: {report['rule']}.", ""]
    return "\n".join(lines)
