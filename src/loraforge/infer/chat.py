"""`loraforge chat MODEL`: a multi-turn chat in the terminal, streamed token by token.

Input goes through prompt_toolkit when stdin is a terminal: it measures each
character's display width itself, so typing, moving over and deleting Chinese
(double-width) characters never leaves the line garbled — the classic failure of
`input()` under a terminal whose locale or readline disagrees on widths, where a
backspace erased half a character and the bytes sent were no longer UTF-8. When stdin
is not a terminal (a pipe, a file) lines are read plainly.

The history is trimmed to the context window oldest turns first, keeping room for the
answer; the system prompt is always kept.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

from loraforge.errors import LoraforgeError
from loraforge.infer.engine import Engine, GenerationConfig

HELP = "/system TEXT  set the system prompt (and clear the history)   /system  back to the model's default\n" \
       "/clear  forget the conversation   /history  show it   /exit  quit (or Ctrl-D)"


@dataclass
class ChatState:
    system: str | None = None  # None: the template's default system prompt
    turns: list[dict] = field(default_factory=list)  # user/assistant messages, oldest first

    def messages(self, turns: list[dict] | None = None) -> list[dict]:
        head = [] if self.system is None else [{"role": "system", "content": self.system}]
        return head + (self.turns if turns is None else turns)


def answer_room(engine: Engine, config: GenerationConfig) -> int:
    """Tokens kept free for the answer: max_new_tokens, but never more than half the window."""
    return min(config.max_new_tokens, engine.n_ctx // 2)


def fit_history(engine: Engine, state: ChatState, config: GenerationConfig) -> tuple[list[dict], int]:
    """The messages to send and how many old turns were left out (whole user+assistant rounds)."""
    limit = engine.n_ctx - answer_room(engine, config)
    turns = list(state.turns)
    dropped = 0
    while True:
        messages = state.messages(turns)
        if len(engine.tokenize(engine.render(messages))) <= limit:
            return messages, dropped
        if len(turns) <= 1:
            raise LoraforgeError(f"this message does not fit the {engine.n_ctx}-token context window with room for "
                                 f"a {answer_room(engine, config)}-token answer: shorten it, or start the chat "
                                 "with a larger --n-ctx or a smaller --max-new-tokens")
        turns, dropped = turns[2:], dropped + 1


def terminal_reader(prompt: str) -> Callable[[], str]:
    """A line reader: prompt_toolkit on a terminal (wide characters, editing, history), else plain lines."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import InMemoryHistory

        session = PromptSession(history=InMemoryHistory())
        return lambda: session.prompt(prompt)

    def plain() -> str:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    return plain


def run_chat(engine: Engine, config: GenerationConfig, system: str | None = None,
             read: Callable[[], str] | None = None, out: TextIO | None = None) -> ChatState:
    """The chat loop; returns the final state (for tests)."""
    out = out or sys.stdout
    read = read or terminal_reader("你> ")
    state = ChatState(system=system)
    show = lambda text="", end="\n": (out.write(text + end), out.flush())  # noqa: E731
    show(f"{engine.model_name} ({engine.name}, {engine.n_ctx}-token context). {HELP}")
    while True:
        try:
            line = read()
        except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, as a shell does
            continue
        except EOFError:
            show()
            return state
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/exit", "/quit"):
                return state
            if command == "/clear":
                state.turns.clear()
                show("(history cleared)")
            elif command == "/system":
                state.system = rest.strip() or None
                state.turns.clear()
                show(f"(system prompt: {state.system!r}; history cleared)" if state.system is not None
                     else "(system prompt: the model's default; history cleared)")
            elif command == "/history":
                for message in state.messages():
                    show(f"[{message['role']}] {message['content']}")
            else:
                show(f"unknown command {command}. {HELP}")
            continue
        state.turns.append({"role": "user", "content": line})
        try:
            messages, dropped = fit_history(engine, state, config)
        except LoraforgeError as exc:
            state.turns.pop()
            show(f"error: {exc}")
            continue
        if dropped:
            del state.turns[:2 * dropped]
            show(f"(dropped the {dropped} oldest round{'s' if dropped > 1 else ''} to fit the context window)")
        state.turns.append({"role": "assistant", "content": _stream_answer(engine.stream(messages, config), show)})


def _stream_answer(chunks: Iterator, show) -> str:
    """Print the answer as it comes; Ctrl-C stops it and keeps what was said."""
    parts: list[str] = []
    try:
        for chunk in chunks:
            if chunk.text:
                parts.append(chunk.text)
                show(chunk.text, end="")
            if chunk.finish_reason == "length":
                show(" […]", end="")
    except KeyboardInterrupt:
        chunks.close()
        show(" [stopped]", end="")
    show()
    return "".join(parts)
