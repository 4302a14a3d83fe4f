"""A generated reply → OpenAI's message parts: reasoning_content, content, tool_calls.

What a reply may hold comes from the model's template (`ReplyPlan`): its thought words
when it is a thinking template (qwen3: `<think>…</think>` → reasoning_content), and its
tool format when the request offered tools. The text itself is read by data/tools.py,
the same code that wrote the calls for training. Streaming (`ReplyStream`) sends
reasoning and content as they come, and holds back a reply that starts like a call until
it ends: a call is only a call when the whole of it parses, and then it goes out as
tool_call deltas, as OpenAI streams them.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraforge.data import tools as tool_text


@dataclass(frozen=True)
class ReplyPlan:
    tool_format: str | None = None  # read calls written in this format; None: the reply is never a call
    opening: str = ""  # the start of a call the server put at the end of the prompt (tool_choice)
    thought_words: tuple[str, str] | None = None  # split a leading thought off as reasoning_content
    call_prefix: str = ""  # the template writes this before a call (mistral's "[TOOL_CALLS] ")

    def marker(self) -> str:
        return self.call_prefix.strip() or tool_text.call_marker(self.tool_format)

    def calls(self, text: str) -> list[tool_text.ToolCall] | None:
        body = self.opening + text
        if self.call_prefix:
            body = body.lstrip().removeprefix(self.call_prefix.strip())
        return tool_text.parse_calls(self.tool_format, body)


@dataclass
class ReplyParts:
    content: str | None
    reasoning: str | None = None
    tool_calls: list[tool_text.ToolCall] | None = None

    @property
    def finish_reason(self) -> str | None:
        """"tool_calls" when the reply is calls, else the engine's own reason stands."""
        return "tool_calls" if self.tool_calls else None

    def message(self) -> dict:
        out: dict = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            out["reasoning_content"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        return out


def split_reply(plan: ReplyPlan, text: str) -> ReplyParts:
    reasoning, answer = (None, text)
    if plan.thought_words and not plan.opening:
        reasoning, answer = tool_text.split_reasoning(text, plan.thought_words)
    if plan.tool_format:
        calls = plan.calls(answer)
        if calls:
            return ReplyParts(None, reasoning, calls)
    return ReplyParts(plan.opening + answer if plan.opening else answer, reasoning)


class ReplyStream:
    """Text pieces in → OpenAI delta dicts out ({"content": …}, {"reasoning_content": …},
    {"tool_calls": [...]}), for one streamed reply."""

    def __init__(self, plan: ReplyPlan):
        self.plan = plan
        self.text = ""  # everything generated so far
        self.sent = 0  # how much of the current phase's text has gone out
        self.phase = "start"  # start → (reasoning →) answer; answer: content | call
        self.answer_at = 0  # where the answer begins in self.text
        if not plan.thought_words or plan.opening:
            self.phase = "answer"
        self.mode = "call" if plan.opening else None

    def push(self, piece: str) -> list[dict]:
        self.text += piece
        deltas: list[dict] = []
        if self.phase == "start":
            open_ = self.plan.thought_words[0].strip()
            body = self.text.lstrip()
            if len(body) < len(open_) and open_.startswith(body):
                return deltas  # may still become a thought
            if body.startswith(open_):
                self.phase, self.sent = "reasoning", len(self.text) - len(body) + len(open_)
            else:
                self.phase = "answer"
        if self.phase == "reasoning":
            close = self.plan.thought_words[1].strip()
            end = self.text.find(close, self.sent)
            if end < 0:
                # a close marker (and the newline before it) may be arriving in pieces
                safe = len(self.text) - len(close)
                if safe > self.sent:
                    chunk = self.text[self.sent:safe]
                    chunk = chunk.lstrip("\n") if self.sent == self._thought_start() else chunk
                    if chunk:
                        deltas.append({"reasoning_content": chunk})
                    self.sent = safe
                return deltas
            chunk = self.text[self.sent:end].rstrip("\n")
            chunk = chunk.lstrip("\n") if self.sent == self._thought_start() else chunk
            if chunk:
                deltas.append({"reasoning_content": chunk})
            self.phase, self.answer_at = "answer", end + len(close)
            self.sent = self.answer_at
        if self.phase == "answer":
            deltas += self._answer()
        return deltas

    def _thought_start(self) -> int:
        body = self.text.lstrip()
        return len(self.text) - len(body) + len(self.plan.thought_words[0].strip())

    def _answer(self) -> list[dict]:
        answer = self.text[self.answer_at:]
        if self.answer_at and self.sent == self.answer_at:
            stripped = answer.lstrip("\n")
            if not stripped:
                return []
            self.sent += len(answer) - len(stripped)
        if self.mode is None and self.plan.tool_format:
            marker = self.plan.marker()
            head = self.text[self.sent:].lstrip()
            if len(head) < len(marker) and marker.startswith(head):
                return []  # still undecided
            self.mode = "call" if head.startswith(marker) else "content"
        if self.mode == "call":
            return []  # held whole until the end: only a reply that parses is a call
        self.mode = "content"
        chunk, self.sent = self.text[self.sent:], len(self.text)
        return [{"content": chunk}] if chunk else []

    def finish(self) -> tuple[list[dict], str | None]:
        """The last deltas, and "tool_calls" when the reply was calls (else None)."""
        if self.phase == "start":
            self.phase = "answer"
        if self.phase == "reasoning":  # cut off inside the thought: all of it is reasoning
            rest = self.text[self.sent:]
            rest = (rest.lstrip("\n") if self.sent == self._thought_start() else rest).rstrip("\n")
            return ([{"reasoning_content": rest}] if rest else []), None
        if self.mode == "call":
            held = self.text[self.sent:]
            calls = self.plan.calls(held.lstrip())
            if calls:
                deltas = []
                for index, call in enumerate(calls):
                    item = call.to_openai()
                    deltas.append({"tool_calls": [{"index": index, "id": item["id"], "type": "function",
                                                   "function": {"name": call.name, "arguments": ""}}]})
                    deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})
                return deltas, "tool_calls"
            text = self.plan.opening + held
            return ([{"content": text}] if text else []), None
        self.mode = self.mode or "content"  # never became a call marker: it is content
        return self._answer(), None
