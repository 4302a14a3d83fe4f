"""The canonical records every data format becomes.

A chat/instruction record is a `Conversation`: an optional system prompt, optional tool
definitions and ordered turns, alternating a user side (user, or observation: a tool's
result) and a model side (assistant, or function_call: the model calling a tool) and
ending with a model turn (the learned part). Raw pre-training text is a `Text`.
Preference data is a `Preference` (one prompt, a chosen and a rejected answer) or, for
KTO, a `Feedback` (a conversation whose last answer is marked desirable or not). `source` is "file:line" (or "file#index" for
formats without lines) so later stages can still point a user at the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["user", "assistant", "function_call", "observation"]
USER_SIDE = ("user", "observation")  # LLaMA-Factory's rule: these sit at even positions
MODEL_SIDE = ("assistant", "function_call")  # and these at odd ones; model turns are learned


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    system: str | None = None
    source: str = ""
    tools: str | None = None  # the tool definitions offered (a JSON list, as the data gives it)


@dataclass(frozen=True)
class Text:
    text: str
    source: str = ""


@dataclass(frozen=True)
class Preference:
    """Pairwise preference (dpo, rm): `prompt`'s turns end on the user side; `chosen` and
    `rejected` are the two answers to it."""

    prompt: Conversation
    chosen: str
    rejected: str
    source: str = ""


@dataclass(frozen=True)
class Feedback:
    """KTO: a conversation ending with an answer, and whether that answer is desirable."""

    conversation: Conversation
    desirable: bool
    source: str = ""


Record = Conversation | Text | Preference | Feedback


@dataclass
class Problem:
    """One invalid record: where it is and what is wrong with it."""

    source: str  # "path:line" or "path#index"
    reason: str  # short, groupable: "missing field 'output'"
    detail: str = ""  # extra context shown with the first occurrence

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class LoadReport:
    """What a dataset load found: the records kept and the problems skipped."""

    name: str
    format: str
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was done to the data on the way (sampling, pairing)
