"""Chat messages → prompt ids, through the model's own chat template, and where answers end.

The rendering is the chat/generate engines' (`infer.engine.render_chat`): a loraforge
GGUF names its template in `tokenizer.chat_template` and is rendered by the very function
training used; any other template through sandboxed Jinja as transformers does. What this
module adds is the server's side: ids, and the stop strings and stop token ids of the
template, so an answer ends where the trained one did.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraforge.data import tools as tool_text
from loraforge.data.templates import template_in
from loraforge.errors import LoraforgeError
from loraforge.infer.engine import (
    Prompt,
    prompt_text,
    prompt_token_ids,
    render_chat,
    template_stop_strings,
)
from loraforge.serve.reply_split import ReplyPlan


@dataclass(frozen=True)
class ChatPrompt:
    ids: list[int]
    stop: tuple[str, ...]  # the template's stop strings
    stop_tokens: frozenset[int]  # end markers that are one control token (never seen as text)
    plan: ReplyPlan = ReplyPlan()  # what the reply may hold: reasoning, tool calls


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

    def render(self, messages: list[dict], tools: list[dict] | None = None, tool_choice=None,
               forced: str | None = None) -> ChatPrompt:
        """Prompt ids for `messages`. With `tools`: the definitions go into the prompt as
        the template writes them, and the reply is read back as calls in its tool format.
        tool_choice "none" renders no tools and never reads a call; "required" or a named
        function (`forced`) ends the prompt with the opening of a call (data/tools.py
        `call_opening`), so the reply is a call by construction."""
        if not self.chat_template:
            raise LoraforgeError(f"{self.model.path.name} has no chat template (tokenizer.chat_template): restart "
                                 "the server with --chat-template NAME|FILE (the template it was trained with), "
                                 "export the model with loraforge (export gguf --template NAME), or use "
                                 "/v1/completions with your own prompt")
        template = template_in(self.chat_template)
        offered = tools if tools and tool_choice != "none" else None
        prompt = render_chat(self.chat_template, messages, self.model.bos_text, self.model.eos_text, offered)
        thought = template.thought_words if template is not None and template.thinking else None
        fmt = None
        if offered:
            # a foreign template: Hermes-style <tool_call> tags are the common reading (Qwen2.5, Qwen3, Hermes)
            fmt = template.tool_format if template is not None else (
                "qwen" if "<tool_call>" in self.chat_template else None)
        opening = skipped_thought = ""
        if fmt and (forced or tool_choice == "required"):
            names = [tool["function"]["name"] for tool in offered]
            opening = tool_text.call_opening(fmt, forced or (names[0] if len(names) == 1 else None))
            opening = (template.tool_call_prefix if template is not None else "") + opening
            # the model writes the space before the arguments itself: SentencePiece spells it with
            # the word after it (`▁{`), which a prompt ending in a lone `▁` would never show it
            opening = opening.rstrip(" ")
            empty = thought[0] + thought[1] if thought else ""
            if empty and not prompt_text(prompt).endswith(empty):  # a forced call skips the thought, as enable_thinking=false
                skipped_thought = empty
        plan = ReplyPlan(fmt, opening, thought, template.tool_call_prefix if template is not None else "")
        # a slot template's prompt gets the skipped thought and the opening as slots of their own:
        # training encoded a prompt's empty thought alone, and a call's slot starts with its opening
        if isinstance(prompt, str):
            prompt += skipped_thought + opening
        else:
            prompt = prompt + [piece for piece in (skipped_thought, opening) if piece]
        return ChatPrompt(prompt_ids(self.model, prompt), self.stop, self.stop_tokens, plan)


def prompt_ids(model, prompt: Prompt) -> list[int]:
    """Ids as the model is fed (`infer.engine.prompt_token_ids`' rule)."""
    return prompt_token_ids(prompt, model.tokenize, model.bos_text)
