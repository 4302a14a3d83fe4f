"""One engine protocol: what chat, generate and the server need from a model.

Two implementations answer it — llama.cpp through llama-cpp-python for .gguf files
(`infer/llamacpp.py`) and transformers (+ peft for unmerged adapters, `infer/hf.py`) —
and vLLM optionally (`infer/vllm.py`). They share everything but the forward pass and
the sampler: the prompt (the model's own chat template, `render_chat`), the stop
tokens and strings, the context check and the streaming rules (`stream_tokens`): a
chunk never ends inside a multi-byte UTF-8 character, and no text of a stop string is
ever emitted, even when the stop string arrives split across tokens.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from loraforge.data.records import Turn
from loraforge.data.templates import (
    Template,
    conversation_from_messages,
    get_template,
    prompt_segments,
    template_in,
)
from loraforge.data.tokenize import slot_ids
from loraforge.errors import LoraforgeError
from loraforge.tokenizer import encode_prompt

FinishReason = Literal["stop", "length"]
Messages = list[dict]
# A prompt as the model is fed it: one text (the model's BOS added when it adds one and the
# text lacks it), or a LLaMA-Factory slot template's segments — each encoded alone with
# nothing added, as training encoded them (on SentencePiece each gets its own dummy `▁`).
Prompt = str | list[str]
# end-of-turn markers of common foreign templates: a template that writes one stops at it
_KNOWN_END_MARKERS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>")
# special tokens llama.cpp's vocabulary loader marks end-of-generation by their text
# (llama-vocab.cpp); the transformers engine stops at the same ones so greedy text agrees
END_OF_GENERATION_TOKENS = frozenset({*_KNOWN_END_MARKERS, "<|eom_id|>", "<EOT>", "_<EOT>", "<|return|>",
                                      "<|call|>", "<|end_of_turn|>", "<|endofprompt|>"})


def _param(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class GenerationConfig:
    """Generation parameters, the same for every engine. Defaults are llama.cpp's
    (llama-cpp-python's create_completion), so a GGUF answers as it would under llama.cpp."""

    max_new_tokens: int = _param(256, "most tokens to generate; reaching it ends with finish_reason 'length'")
    temperature: float = _param(0.8, "softmax temperature; 0 = greedy (argmax, the same text in every engine)")
    top_k: int = _param(40, "sample among the k most likely tokens; 0 = all")
    top_p: float = _param(0.95, "nucleus sampling: the smallest set with this much probability; 1 = off")
    min_p: float = _param(0.05, "drop tokens less likely than min_p × the best token's probability; 0 = off")
    typical_p: float = _param(1.0, "locally typical sampling mass; 1 = off")
    repetition_penalty: float = _param(1.0, "divide the logits of already-seen tokens (CTRL paper); 1 = off")
    presence_penalty: float = _param(0.0, "OpenAI's: subtract from every token already generated")
    frequency_penalty: float = _param(0.0, "OpenAI's: subtract, times its count, from every generated token")
    stop: tuple[str, ...] = _param((), "extra stop strings (the template's end markers always stop)")
    seed: int | None = _param(None, "sampling seed: the same seed gives the same text; None = random")
    num_beams: int = _param(1, "beam search width (transformers engine only; not streamed token by token)")
    no_repeat_ngram_size: int = _param(0, "never repeat an n-gram of this size (transformers engine only); 0 = off")

    def __post_init__(self):
        self.stop = tuple(self.stop) if not isinstance(self.stop, str) else (self.stop,)
        checks = [("max_new_tokens", self.max_new_tokens >= 1, "≥ 1"), ("temperature", self.temperature >= 0, "≥ 0"),
                  ("top_k", self.top_k >= 0, "≥ 0"), ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"), ("typical_p", 0 < self.typical_p <= 1, "in (0, 1]"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
                  ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
                  ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
                  ("num_beams", self.num_beams >= 1, "≥ 1"), ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, "≥ 0")]
        for name, ok, rule in checks:
            if not ok:
                raise LoraforgeError(f"generation parameter {name}={getattr(self, name)!r} must be {rule}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def to_dict(self) -> dict:
        return {**asdict(self), "stop": list(self.stop)}

    @classmethod
    def from_dict(cls, values: dict, where: str = "generation config") -> GenerationConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LoraforgeError(f"{where}: unknown generation parameter '{unknown[0]}'; known: {', '.join(sorted(known))}")
        return cls(**values)


def parameter_help() -> dict[str, str]:
    """Field name → help text (the CLI flags and the server's docs come from here)."""
    return {f.name: f.metadata["help"] for f in fields(GenerationConfig)}


@dataclass(frozen=True)
class Chunk:
    """One generated token and the text it adds ('' while bytes or a possible stop string are held back)."""

    text: str
    token_id: int | None  # None for the final flush of held-back text
    finish_reason: FinishReason | None = None  # set on the last chunk only


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int


# ---------------------------------------------------------------- the prompt side


def message_text(content) -> str:
    """A message's content as text: a string, or OpenAI's list of {"type": "text", "text": …} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text", "") for p in content)
    raise LoraforgeError(f"message content must be text (a string or text parts), got {json.dumps(content)[:80]}")


def _turns(messages: Messages) -> tuple[str | None, list[Turn]]:
    """(system, turns) from chat messages: a system message may only come first."""
    system, turns = None, []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant"):
            raise LoraforgeError(f"message {index + 1}: role must be system, user or assistant, got {role!r}")
        text = message_text(message.get("content", ""))
        if role == "system":
            if index != 0:
                raise LoraforgeError(f"message {index + 1}: a system message may only be the first message")
            system = text
        else:
            turns.append(Turn(role, text))
    return system, turns


def render_chat(chat_template: str | None, messages: Messages, bos: str, eos: str,
                tools: list | None = None) -> Prompt:
    """The generation prompt for `messages` (and the tool definitions offered, OpenAI's
    `tools`), through the model's own chat template.

    A template loraforge wrote (named in its first line) is rendered by the Python
    renderer training used — byte for byte the training prompt, tool calls and tool
    results included. Any other template is rendered as transformers does, with Jinja in
    a sandbox (`tools` passed as apply_chat_template passes it). The text starts with BOS
    only if the template writes it (foreign ones may); `Engine.tokenize` never adds a second.
    A LLaMA-Factory slot template gives its segments (`Prompt`), encoded as training encoded them.
    """
    template = template_in(chat_template)
    if template is not None:
        if not tools and all(m.get("role") in ("system", "user", "assistant") and not m.get("tool_calls")
                             for m in messages if isinstance(m, dict)):
            system, turns = _turns(messages)
            return turns_prompt(template, system, turns, eos, bos)
        conv = conversation_from_messages(messages, tools)
        return turns_prompt(template, conv.system, conv.turns, eos, bos, tools=conv.tools)
    if not chat_template:
        raise LoraforgeError("the model has no chat template (tokenizer_config.json chat_template / GGUF "
                             "tokenizer.chat_template): pass --template NAME with the template it was trained with")
    if not tools and not any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages):
        _turns(messages)  # the same checks for every template
    return _render_jinja(chat_template, messages, bos, eos, tools)


def turns_prompt(template: Template, system: str | None, turns: Sequence[Turn], eos: str, bos: str,
                 *, tools: str | None = None) -> Prompt:
    """The generation prompt of a loraforge template: its text, or its slots for a slot template."""
    segments = [text for text, _ in prompt_segments(template, system, turns, eos, bos_token=bos, tools=tools)]
    return segments if template.slots else "".join(segments)


def prompt_text(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else "".join(prompt)


def prompt_token_ids(prompt: Prompt, tokenize: Callable[[str, bool], list[int]], bos_text: str) -> list[int]:
    """A prompt's ids under one rule for every engine. `tokenize(text, add_special)` is the
    engine's own (control tokens written in the text parsed): a text gets the model's BOS
    unless it starts with it; slot segments are each encoded alone, nothing added."""
    if isinstance(prompt, str):
        return tokenize(prompt, not (bos_text and prompt.startswith(bos_text)))
    return [token for segment in prompt for token in tokenize(segment, False)]


def hf_prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """`prompt_token_ids` for a transformers tokenizer: exactly the ids training gave the prompt."""
    if isinstance(prompt, str):
        return encode_prompt(tokenizer, prompt)
    return [token for segment in prompt for token in slot_ids(tokenizer, segment)]


def _render_jinja(chat_template: str, messages: Messages, bos: str, eos: str, tools: list | None = None) -> str:
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    # the environment transformers renders chat templates in (trim/lstrip blocks, tojson keeping Chinese)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    plain = [{**m, "content": message_text(m.get("content") or "")} for m in messages]
    extra = {"tools": tools} if tools else {}
    try:
        return env.from_string(chat_template).render(messages=plain, add_generation_prompt=True,
                                                     bos_token=bos, eos_token=eos, **extra)
    except jinja2.TemplateError as exc:
        raise LoraforgeError(f"the model's chat template failed on these messages: {exc}") from None


def template_stop_strings(chat_template: str | None, override: str | None = None) -> tuple[str, ...]:
    """Strings that end an answer besides EOS: the loraforge template's own stop strings
    (its end token and the next turn's marker), else the end markers a foreign template writes."""
    template = get_template(override) if override else template_in(chat_template)
    if template is not None:
        return template.stop_strings
    return tuple(m for m in _KNOWN_END_MARKERS if m in (chat_template or ""))


class TokenizerPrompts:
    """`tokenize` and `render` for engines that hold a transformers tokenizer (`tokenizer`,
    `bos_token`, `eos_token`, `chat_template` attributes): the hf and vLLM engines."""

    def tokenize(self, prompt: Prompt) -> list[int]:
        return hf_prompt_ids(self.tokenizer, prompt)

    def render(self, messages) -> Prompt:
        return render_chat(self.chat_template, messages, self.bos_token, self.eos_token)


def prompt_ids(engine: Engine, request: Messages | str | list[int]) -> list[int]:
    """Token ids of a chat request (rendered with the template), of a raw prompt string, or
    the ids themselves (a prompt the server rendered: tool definitions, a forced call's opening)."""
    if isinstance(request, list) and request and all(isinstance(token, int) for token in request):
        return list(request)
    return engine.tokenize(request if isinstance(request, str) else engine.render(request))


# ---------------------------------------------------------------- streaming


class StopFilter:
    """Holds back text that may be the start of a stop string; cuts at the first one found."""

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to show, whether a stop string was reached)."""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending = self.pending[:min(found)], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class ByteText:
    """Token bytes → text, holding back an incomplete UTF-8 character until its last byte arrives."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self, cut: bool = False) -> str:
        """The held bytes at the end: U+FFFD for a broken character, or nothing when the answer was
        `cut` by length (the rest of the character was never generated)."""
        if cut:
            self._decoder.reset()
            return ""
        return self._decoder.decode(b"", final=True)


def stream_tokens(tokens: Iterator[int], to_text: Callable[[int], str], flush_text: Callable[[bool], str],
                  stop_ids: set[int], stop_strings: Sequence[str], max_new_tokens: int) -> Iterator[Chunk]:
    """Chunks from a token iterator: stops at a stop id (not shown), a stop string (cut before
    it) or `max_new_tokens` (finish 'length'); the iterator is closed when done.
    `flush_text(cut)`: the text still held back; `cut` (a length stop) drops an incomplete
    UTF-8 character rather than showing U+FFFD."""
    stops = StopFilter(stop_strings)
    count = 0
    try:
        for token in tokens:
            count += 1
            if token in stop_ids:
                yield Chunk(stops.push(flush_text(False))[0] + stops.flush(), token, "stop")
                return
            text, stopped = stops.push(to_text(token))
            if stopped:
                yield Chunk(text, token, "stop")
                return
            if count >= max_new_tokens:
                text2, stopped = stops.push(flush_text(True))
                yield Chunk(text + text2 + ("" if stopped else stops.flush()), token, "stop" if stopped else "length")
                return
            yield Chunk(text, token)
        # the engine ran out of context
        text, stopped = stops.push(flush_text(True))
        yield Chunk(text + ("" if stopped else stops.flush()), None, "stop" if stopped else "length")
    finally:
        close = getattr(tokens, "close", None)
        if close:
            close()


def check_fits(n_prompt: int, n_ctx: int) -> None:
    if n_prompt >= n_ctx:
        raise LoraforgeError(f"the prompt has {n_prompt} tokens but the context window is {n_ctx}: "
                             "shorten it, or open the model with a larger --n-ctx (up to what it was trained on)")


# ---------------------------------------------------------------- the protocol


@runtime_checkable
class Engine(Protocol):
    """A loaded model. Not thread-safe: one generation at a time per engine (a server
    serializes requests onto it); a stream that is abandoned should be closed."""

    name: str  # "llamacpp" | "hf" | "vllm"
    model_name: str  # the reference's short name (the served model id)
    n_ctx: int  # context window, prompt and answer together
    chat_template: str | None  # the Jinja chat template (loraforge's name it in their first line)
    bos_token: str
    eos_token: str
    stop_ids: set[int]  # token ids that end an answer (EOS, end-of-turn tokens); never shown
    stop_strings: tuple[str, ...]  # the template's stop strings (GenerationConfig.stop adds more)

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Ids as the model is fed (`prompt_token_ids`' rule)."""

    def render(self, messages: Messages) -> Prompt:
        """The chat prompt for `messages`."""

    def stream(self, request: Messages | str | list[int], config: GenerationConfig) -> Iterator[Chunk]:
        """Generate for chat messages, a raw prompt or prompt ids; the last chunk has finish_reason."""

    def complete(self, request: Messages | str, config: GenerationConfig) -> Completion: ...

    def close(self) -> None: ...


def complete_from_stream(engine: Engine, request: Messages | str, config: GenerationConfig) -> Completion:
    n_prompt = len(prompt_ids(engine, request))
    text, ids, finish = [], [], "length"
    for chunk in engine.stream(request, config):
        text.append(chunk.text)
        if chunk.token_id is not None:
            ids.append(chunk.token_id)
        finish = chunk.finish_reason or finish
    return Completion("".join(text), ids, finish, n_prompt)


EngineName = Literal["auto", "llamacpp", "hf", "vllm"]


def open_engine(ref, engine: EngineName = "auto", adapters: Sequence[str | Path] = (), n_ctx: int | None = None,
                template: str | None = None, base: str | Path | None = None, device: str | None = None) -> Engine:
    """Load the model a reference names with the engine asked for.

    auto: llama.cpp for a .gguf, transformers for a HF dir or an adapter. `adapters`: more
    adapters on top (peft dirs for transformers; one llama.cpp adapter .gguf for llama.cpp).
    `template`: a loraforge template name that replaces the model's own chat template.
    """
    from loraforge.models import ModelRef, resolve_model

    ref = ref if isinstance(ref, ModelRef) else resolve_model(ref, base=base)
    choice = engine if engine != "auto" else ("llamacpp" if ref.kind == "gguf" else "hf")
    if template is not None:
        get_template(template)  # an unknown name fails before the model loads
    if choice == "llamacpp":
        from loraforge.infer.llamacpp import LlamaCppEngine

        return LlamaCppEngine(ref, adapters=adapters, n_ctx=n_ctx, template=template)
    if choice == "hf":
        from loraforge.infer.hf import HFEngine

        return HFEngine(ref, adapters=adapters, n_ctx=n_ctx, template=template, device=device)
    if choice == "vllm":
        from loraforge.infer.vllm import VllmEngine

        return VllmEngine(ref, adapters=adapters, n_ctx=n_ctx, template=template)
    raise LoraforgeError(f"unknown engine '{engine}': choose auto, llamacpp, hf or vllm")

