"""Chat messages → prompt ids, through the model's own chat template, and where answers end.

The rendering is the chat/generate engines' (`infer.engine.render_chat`): a loraforge
GGUF names its template in `tokenizer.chat_template` and is rendered by the very function
training used; any other template through sandboxed Jinja as transformers does. What this
module adds is the server's side: ids, and the stop strings and stop token ids of the
template, so an answer ends where the trained one did.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraforge.errors import LoraforgeError
from loraforge.infer.engine import render_chat, template_stop_strings


@dataclass(frozen=True)
class ChatPrompt:
    ids: list[int]
    stop: tuple[str, ...]  # the template's stop strings
    stop_tokens: frozenset[int]  # end markers that are one control token (never seen as text)


class ChatRenderer:
    """One served name's prompts: the model's chat template, or `chat_template` in its place
    (an adapter's own, or `serve --chat-template`)."""

    def __init__(self, model, chat_template: str | None = None):  # a GgufModel, or serial.EngineVocab for HF models
        self.model = model
        self.chat_template = chat_template or model.chat_template
        self.stop = template_stop_strings(self.chat_template)
        # A marker that is one control token renders as no text, so a stop string could
        # never see it: it stops as a token id instead.
        if hasattr(model, "single_token"):
            ids = (model.single_token(marker) for marker in self.stop)
            self.stop_tokens = frozenset(t for t in ids if t is not None and not model.piece(t))
        else:  # the HF engine stops at its own end ids
            self.stop_tokens = frozenset()

    def render(self, messages: list[dict]) -> ChatPrompt:
        if not self.chat_template:
            raise LoraforgeError(f"{self.model.path.name} has no chat template (tokenizer.chat_template): restart "
                                 "the server with --chat-template NAME|FILE (the template it was trained with), "
                                 "export the model with loraforge (export gguf --template NAME), or use "
                                 "/v1/completions with your own prompt")
        text = render_chat(self.chat_template, messages, self.model.bos_text, self.model.eos_text)
        return ChatPrompt(prompt_ids(self.model, text), self.stop, self.stop_tokens)


def prompt_ids(model, text: str) -> list[int]:
    """Ids as the model is fed: BOS added when the vocabulary adds one and the text lacks it."""
    has_bos = bool(model.bos_text) and text.startswith(model.bos_text)
    return model.tokenize(text, add_special=not has_bos)
