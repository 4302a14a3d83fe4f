"""The canonical records every data format becomes.

A chat/instruction record is a `Conversation`: an optional system prompt and ordered
turns, alternating user → assistant and ending with an assistant answer (the learned
part). Raw pre-training text is a `Text`. `source` is "file:line" (or "file#index" for
formats without lines) so later stages can still point a user at the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    system: str | None = None
    source: str = ""


@dataclass(frozen=True)
class Text:
    text: str
    source: str = ""


Record = Conversation | Text


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
