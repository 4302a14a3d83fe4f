"""Preference data (stages dpo, kto, rm): rows → `Preference` / `Feedback` → token ids.

Three layouts, with LLaMA-Factory's rules (its data/converter.py):

- **ranking** (`"ranking": true`; by path: `chosen` and `rejected` fields). alpaca: the
  prompt is instruction + "\\n" + input (and history), `chosen`/`rejected` are strings.
  sharegpt/openai: the messages end on the user side and `chosen`/`rejected` are one
  message each, from the assistant (or function_call) side.
- **kto** (`columns.kto_tag`; by path: a true/false `kto_tag` or `label` field): an alpaca or
  sharegpt record whose last answer is marked desirable (`true`) or undesirable (`false`).
  LLaMA-Factory quietly trains a record with a non-boolean tag as SFT; here it is invalid.
- **scored** (our users' layout, `columns.score`; by path: a `reward_score` field): one
  answer per row (`instruction`, optional; `input`; `output`; `reward_score`), several rows
  per prompt. Rows with the same system, history and user text are one prompt. For dpo and
  rm the best-scored answer is paired with every answer scored strictly lower (n − 1 pairs,
  the chosen is always the best one; equal scores make no pair); for kto an answer is
  desirable when its score ≥ `pref.score_threshold` (default: the median score).

Token ids are made by SFT's own encoder: the prompt plus one answer goes through
`encode_conversation` (our template's `render_segments`, then `encode_segments`), so the
prompt ids of a pair are the ids SFT — and inference's prompt encoding — give the same
conversation. The answer is the last learned run (answer + end token, and whatever the
template learns after it); everything before it is the prompt.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

from loraforge.data.formats import (
    COLUMN_DEFAULTS,
    _alpaca_conversation,
    _chat_turns,
    _check_report,
    _Invalid,
    _kind,
    _resolve_tags,
    _string,
    _tools,
    detect_formatting,
)
from loraforge.data.records import Conversation, Feedback, LoadReport, Preference, Problem, Turn
from loraforge.data.rows import BadRow, read_rows
from loraforge.data.templates import Template
from loraforge.data.tokenize import IGNORE, encode_conversation
from loraforge.errors import LoraforgeError

KINDS = ("ranking", "kto", "scored")
# the stage(s) each kind of data trains, for the "use stage: …" errors
STAGES_FOR = {"plain": "sft", "ranking": "dpo or rm", "kto": "kto", "scored": "dpo, rm or kto"}
KTO_FIELDS = ("kto_tag", "label")
SCORE_FIELD = "reward_score"
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def detect_kind(row: dict) -> tuple[str, dict]:
    """The preference kind of a row named by path ("plain" when it is none), and the columns it implies."""
    if "chosen" in row and "rejected" in row:
        return "ranking", {"chosen": "chosen", "rejected": "rejected"}
    for name in KTO_FIELDS:
        value = row.get(name)
        # a "label" that is not true/false (a category, a score) is some other column, as LLaMA-Factory reads it
        if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE):
            return "kto", {"kto_tag": name}
    if SCORE_FIELD in row:
        return "scored", {"score": SCORE_FIELD}
    return "plain", {}


def check_stage(kind: str, stage: str, label: str) -> None:
    """Refuse data that the stage cannot train, naming the stage that can."""
    fits = {"plain": ("pt", "sft"), "ranking": ("dpo", "rm", "kto"), "kto": ("kto",),
            "scored": ("dpo", "rm", "kto")}[kind]
    if stage in fits:
        return
    what = {"plain": "instruction/chat data (no chosen/rejected, no label)",
            "ranking": "preference pairs (chosen/rejected)", "kto": "KTO feedback (an answer marked true/false)",
            "scored": "reward-scored answers (reward_score)"}[kind]
    if kind == "plain":
        hint = ("use stage: sft for it, or give pairs with 'chosen' and 'rejected' (dpo, rm) or answers "
                "with a true/false 'label' (kto)")
    else:
        hint = f"train it with stage: {STAGES_FOR[kind]}"
    raise LoraforgeError(f"dataset {label} is {what}, which stage {stage} does not train: {hint}")


# ---------------------------------------------------------------- rows → records


def _label(row: dict, column: str) -> bool:
    value = row.get(column)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:  # .csv cells are strings
        return value.strip().lower() in _TRUE
    if value is None:
        raise _Invalid(f"missing field '{column}'", "KTO needs true (desirable) or false (undesirable)")
    raise _Invalid(f"field '{column}' must be true or false, got {_kind(value)}", f"{value!r:.40}")


def _score(row: dict, column: str) -> float:
    value = row.get(column)
    if isinstance(value, bool) or value is None:
        raise _Invalid(f"field '{column}' must be a number, got {_kind(value)}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _Invalid(f"field '{column}' must be a number, got {_kind(value)}", f"{value!r:.40}") from None


def _answer_message(tags: dict, message: object, what: str) -> str:
    if not isinstance(message, dict):
        raise _Invalid(f"'{what}' must be one message object", f"got {_kind(message)}")
    role = message.get(tags["role_tag"])
    if role not in (tags["assistant_tag"], tags["function_tag"]):
        raise _Invalid(f"'{what}' must be from '{tags['assistant_tag']}'", f"it is from '{role}'")
    text = message.get(tags["content_tag"])
    if not isinstance(text, str) or not text.strip():
        raise _Invalid(f"empty {what} answer")
    return text


def _ranking(formatting: str, columns: dict, tags: dict, row: dict, source: str) -> Preference:
    if formatting == "alpaca":
        conv = _alpaca_conversation({**columns, "response": columns["chosen"]}, row, source)
        rejected = _string(row, columns["rejected"], required=True)
        if not rejected.strip():
            raise _Invalid("empty rejected answer")
        return Preference(replace(conv, turns=conv.turns[:-1]), conv.turns[-1].text, rejected, source)
    messages = row.get(columns["messages"])
    if not isinstance(messages, list):
        raise _Invalid(f"field '{columns['messages']}' must be a list, got {_kind(messages)}")
    chosen = _answer_message(tags, row.get(columns["chosen"]), "chosen")
    rejected = _answer_message(tags, row.get(columns["rejected"]), "rejected")
    # the prompt with the chosen answer is an ordinary conversation: formats.py checks roles and order
    system, turns = _chat_turns(columns, tags, {**row, columns["messages"]: [*messages, row[columns["chosen"]]]})
    prompt = Conversation(tuple(turns[:-1]), system=system, source=source, tools=_tools(row, columns))
    return Preference(prompt, chosen, rejected, source)


def _feedback(formatting: str, columns: dict, tags: dict, row: dict, source: str) -> Feedback:
    desirable = _label(row, columns["kto_tag"])
    if formatting == "alpaca":
        conv = _alpaca_conversation(columns, row, source)
    else:
        system, turns = _chat_turns(columns, tags, row)
        conv = Conversation(tuple(turns), system=system, source=source, tools=_tools(row, columns))
    return Feedback(conv, desirable, source)


@dataclass
class _Scored:
    prompt: Conversation
    answer: str
    score: float
    source: str


def _scored(columns: dict, row: dict, source: str) -> _Scored:
    cols = dict(columns)
    if cols["prompt"] not in row:  # the users' layout: input/output/reward_score, no instruction
        cols["prompt"], cols["query"] = cols["query"], None
    conv = _alpaca_conversation(cols, row, source)
    return _Scored(replace(conv, turns=conv.turns[:-1]), conv.turns[-1].text, _score(row, cols["score"]), source)


def _pair_scored(items: list[_Scored], stage: str, threshold: float | None, report: LoadReport) -> list:
    """Scored answers → pairs (dpo, rm) or feedback (kto); see the module docstring for the rule."""
    if stage == "kto":
        cut = threshold if threshold is not None else statistics.median(item.score for item in items)
        records = [Feedback(replace(item.prompt, turns=(*item.prompt.turns, Turn("assistant", item.answer))),
                            item.score >= cut, item.source) for item in items]
        good = sum(r.desirable for r in records)
        how = "pref.score_threshold" if threshold is not None else "the median score"
        report.notes.append(f"{len(records)} scored answers → {good} desirable (score ≥ {cut:g}, {how}), "
                            f"{len(records) - good} undesirable")
        return records
    groups: dict[tuple, list[_Scored]] = {}
    for item in items:
        groups.setdefault((item.prompt.system, item.prompt.turns), []).append(item)
    pairs, lone = [], 0
    for answers in groups.values():
        best = max(answers, key=lambda a: a.score)  # the first of equal bests, in file order
        lower = [a for a in answers if a.score < best.score]
        lone += not lower
        pairs += [Preference(best.prompt, best.answer, a.answer, f"{best.source} vs {a.source}") for a in lower]
    report.notes.append(f"{len(items)} scored answers to {len(groups)} prompts → {len(pairs)} pairs "
                        f"(best answer vs each lower-scored one)"
                        + (f"; {lone} prompts have no lower-scored answer and give no pair" if lone else ""))
    return pairs


def load_preference_records(path: Path, *, kind: str, formatting: str = "auto", columns: dict | None = None,
                            tags: dict | None = None, stage: str = "dpo", skip_invalid: bool = False,
                            name: str | None = None, score_threshold: float | None = None) -> LoadReport:
    """Read one preference data file into `Preference` (dpo, rm) or `Feedback` (kto) records.

    `kind` is ranking, kto or scored; `columns` are LLaMA-Factory's (chosen, rejected,
    kto_tag) plus ours (score). Ranking data for stage kto becomes feedback: each chosen
    answer desirable, each rejected one undesirable (TRL's unpairing).
    """
    path = Path(path)
    label = name or path.name
    check_stage(kind, stage, label)
    report = LoadReport(name=label, format=formatting)
    convert, scored = None, []
    for source, row in read_rows(path):
        if isinstance(row, BadRow):
            report.problems.append(Problem(source, row.reason, row.detail))
            continue
        if not isinstance(row, dict):
            report.problems.append(Problem(source, "record is not an object", f"got {_kind(row)}"))
            continue
        if convert is None:
            convert = _converter(kind, formatting, columns, tags, row, label, report)
        try:
            record = convert(row, source)
        except _Invalid as invalid:
            report.problems.append(Problem(source, invalid.reason, invalid.detail))
            continue
        if kind == "scored":
            scored.append(record)
        elif stage == "kto" and isinstance(record, Preference):
            report.records += [Feedback(answered(record.prompt, record.chosen), True, source),
                               Feedback(answered(record.prompt, record.rejected), False, source)]
        else:
            report.records.append(record)
    if scored:
        report.records = _pair_scored(scored, stage, score_threshold, report)
    elif kind == "ranking" and stage == "kto" and report.records:
        report.notes.append(f"{len(report.records) // 2} pairs → {len(report.records)} KTO examples "
                            "(chosen desirable, rejected undesirable)")
    _check_report(report, path, skip_invalid)
    return report


def answered(prompt: Conversation, answer: str) -> Conversation:
    return replace(prompt, turns=(*prompt.turns, Turn("assistant", answer)))


def _converter(kind: str, formatting: str, columns: dict | None, tags: dict | None, row: dict, label: str,
               report: LoadReport):
    auto = formatting == "auto"
    if auto:
        try:
            formatting = detect_formatting(row)
        except LoraforgeError:
            if kind != "scored":
                raise
            formatting = "alpaca"  # input/output/reward_score rows have no 'instruction'
    if formatting == "text":
        raise LoraforgeError(f"dataset {label}: preference data cannot be plain text — give alpaca "
                             "(instruction/input) or sharegpt (conversations) records")
    report.format = f"{formatting}/{kind}"
    implied = detect_kind(row)[1]
    resolved = {**COLUMN_DEFAULTS[formatting], "chosen": "chosen", "rejected": "rejected",
                "kto_tag": implied.get("kto_tag", "kto_tag"), "score": SCORE_FIELD, **(columns or {})}
    if formatting == "alpaca" and kind == "ranking":
        resolved["response"] = None
    chat = formatting in ("sharegpt", "openai")
    chat_tags = _resolve_tags(formatting, tags, row, resolved, auto, label) if chat else {}
    if kind == "scored":
        if chat:
            raise LoraforgeError(f"dataset {label}: reward-scored data is read in alpaca form "
                                 "(instruction/input, output, reward_score), one answer per row")
        return lambda r, s: _scored(resolved, r, s)
    build = _ranking if kind == "ranking" else _feedback
    return lambda r, s: build(formatting, resolved, chat_tags, r, s)


# ---------------------------------------------------------------- records → ids


@dataclass
class PairExamples:
    """dpo / rm: per pair the prompt ids and each answer's ids (answer + end token)."""

    prompt_ids: list[list[int]] = field(default_factory=list)
    chosen_ids: list[list[int]] = field(default_factory=list)
    rejected_ids: list[list[int]] = field(default_factory=list)
    ties: int = 0  # pairs whose chosen and rejected text are the same: they teach nothing

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def subset(self, indices: list[int]) -> PairExamples:
        return PairExamples(*([column[i] for i in indices] for column in
                              (self.prompt_ids, self.chosen_ids, self.rejected_ids)))

    def rows(self) -> list[dict]:
        return [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
                for p, c, r in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids)]


@dataclass
class FeedbackExamples:
    """kto: per example the prompt ids, the answer's ids and whether it is desirable."""

    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)
    labels: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def subset(self, indices: list[int]) -> FeedbackExamples:
        return FeedbackExamples(*([column[i] for i in indices] for column in
                                  (self.prompt_ids, self.completion_ids, self.labels)))

    def rows(self) -> list[dict]:
        return [{"prompt_ids": p, "completion_ids": c, "label": lab}
                for p, c, lab in zip(self.prompt_ids, self.completion_ids, self.labels)]


def prompt_and_answer(tokenizer, template: Template, prompt: Conversation, answer: str) -> tuple[list[int], list[int]]:
    """Ids of the prompt and of one answer to it (answer + end token), exactly as SFT encodes the conversation."""
    # SFT's own encoder; the last learned run is this answer (+ end token), everything before it the prompt
    enc = encode_conversation(tokenizer, template, answered(prompt, answer), cutoff_len=1 << 30)
    learned = [label != IGNORE for label in enc.labels]
    end = len(learned) - learned[::-1].index(True)
    start = end
    while start > 0 and learned[start - 1]:
        start -= 1
    return enc.input_ids[:start], enc.input_ids[start:end]


@dataclass
class PrefStats:
    truncated: int = 0  # an answer cut by cutoff_len
    dropped: int = 0  # the prompt alone fills cutoff_len: no answer token left
    lengths: dict[str, list[int]] = field(default_factory=lambda: {"prompt": [], "chosen": [], "rejected": []})


def _fit(prompt: list[int], answers: list[list[int]], cutoff_len: int, stats: PrefStats) -> list[list[int]] | None:
    room = cutoff_len - len(prompt)
    if room < 1:
        stats.dropped += 1
        return None
    stats.truncated += any(len(a) > room for a in answers)
    return [a[:room] for a in answers]


def encode_pairs(tokenizer, template: Template, records: list[Preference], cutoff_len: int,
                 stats: PrefStats) -> PairExamples:
    """Preference records → ids; an answer longer than the room the prompt leaves in cutoff_len is cut at
    its end, and a pair whose prompt alone fills cutoff_len is dropped."""
    out = PairExamples()
    for rec in records:
        prompt, chosen = prompt_and_answer(tokenizer, template, rec.prompt, rec.chosen)
        prompt_r, rejected = prompt_and_answer(tokenizer, template, rec.prompt, rec.rejected)
        assert prompt == prompt_r, rec.source  # the same segments before the answer encode the same
        out.ties += rec.chosen == rec.rejected
        for key, ids in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            stats.lengths[key].append(len(ids))
        fitted = _fit(prompt, [chosen, rejected], cutoff_len, stats)
        if fitted is None:
            continue
        out.prompt_ids.append(prompt)
        out.chosen_ids.append(fitted[0])
        out.rejected_ids.append(fitted[1])
    return out


def encode_feedback(tokenizer, template: Template, records: list[Feedback], cutoff_len: int,
                    stats: PrefStats) -> FeedbackExamples:
    out = FeedbackExamples()
    for rec in records:
        turns = rec.conversation.turns
        prompt, answer = prompt_and_answer(tokenizer, template, replace(rec.conversation, turns=turns[:-1]),
                                           turns[-1].text)
        stats.lengths["prompt"].append(len(prompt))
        stats.lengths["chosen" if rec.desirable else "rejected"].append(len(answer))
        fitted = _fit(prompt, [answer], cutoff_len, stats)
        if fitted is None:
            continue
        out.prompt_ids.append(prompt)
        out.completion_ids.append(fitted[0])
        out.labels.append(rec.desirable)
    return out
