"""`loraforge export ollama`: a Modelfile that chats with an exported GGUF exactly as trained.

The TEMPLATE is generated from the same `Template` format strings that drive training
(`render_segments`) and the GGUF's Jinja template, so Ollama builds byte for byte the
prompt the model learned — the tests render it with a small Go-template evaluator and
compare with `render_prompt`.

It uses Ollama's `.Messages` form rather than the older `.System`/`.Prompt`/`.Response`
one. With `.Prompt`, Ollama renders the template once per round and concatenates the
pieces, so markup that belongs *between* rounds (Alpaca's blank line, Llama-2's BOS,
ChatML's newline) and the system block that Llama-2 puts inside the first [INST] only
cannot be written. With `.Messages` the template sees the whole conversation at once.
Ollama passes system messages both in `.Messages` and joined in `.System` (and prepends
the Modelfile's SYSTEM as a system message when a request has none), so the template
writes the system block from `.System` and skips system messages in the loop.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from loraforge.data.templates import (
    TEMPLATES,
    Template,
    format_parts,
    get_template,
    template_name_in,
)
from loraforge.errors import LoraforgeError
from loraforge.export.inspect import gguf_token, gguf_value, read_gguf

# A piece of Go template: (True, action body) for `{{ … }}`, (False, text) for literal text.
Piece = tuple[bool, str]


def write_modelfile(gguf_path: Path, out_path: Path | None = None, system: str | None = None,
                    template: str | None = None) -> Path:
    """Write an Ollama Modelfile for `gguf_path` (default: `Modelfile` next to it).

    The chat template is the one named in the GGUF (loraforge writes its name into
    `tokenizer.chat_template`), or `template` for a GGUF without one. `system` replaces
    the template's default system prompt.
    """
    gguf_path = Path(gguf_path)
    out_path = Path(out_path) if out_path else gguf_path.with_name("Modelfile")
    reader = read_gguf(gguf_path)
    if gguf_value(reader, "general.type") == "adapter":
        raise LoraforgeError(f"{gguf_path} is a LoRA adapter, not a model: a Modelfile's FROM needs the model — "
                             "export base + adapters into one GGUF with `loraforge export gguf` and pass that")
    t = get_template(_template_name(gguf_path, gguf_value(reader, "tokenizer.chat_template"), template))
    if t.thinking:
        raise LoraforgeError(f"template '{t.name}' writes an empty <think> block into answers that have none; "
                             "this Modelfile writer cannot express that yet — run the GGUF with `loraforge serve`, "
                             "or train with the template's no-thinking variant (e.g. qwen3_nothink)")
    bos = _special_token(reader, gguf_path, "bos")
    eos = _special_token(reader, gguf_path, "eos")
    end = t.end_token if t.end_token is not None else eos
    if end is None:
        raise LoraforgeError(f"{gguf_path} has no tokenizer.ggml.eos_token_id, and template '{t.name}' ends each "
                             "answer with the EOS token — re-export the GGUF from a tokenizer that names its eos_token")
    if bos is None and "{bos}" in t.prefix + t.separator + t.user + t.system:
        raise LoraforgeError(f"{gguf_path} has no tokenizer.ggml.bos_token_id, and template '{t.name}' writes BOS "
                             "between rounds — re-export the GGUF from a tokenizer that names its bos_token")
    system = t.default_system if system is None else system
    # LLaMA-Factory's `empty` learns no end token: EOS still ends an answer
    stops = list(dict.fromkeys(s for s in [end or eos, *t.stop_strings] if s))

    lines = [
        f"# Ollama Modelfile for {gguf_path.name}, written by loraforge.",
        f"# Chat template '{t.name}' ({t.description}): the layout the model was trained on.",
        f"# Create the model with: ollama create NAME -f {out_path.name}",
        f"FROM {_from_path(gguf_path, out_path)}",
        "",
        f"TEMPLATE {_triple_quoted(go_template(t, bos or '', end, eos or ''), 'TEMPLATE')}",
        "",
    ]
    if system:
        lines += [f"SYSTEM {_triple_quoted(system, 'SYSTEM')}", ""]
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in stops]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out_path


def go_template(t: Template, bos: str, end: str, eos: str = "") -> str:
    """`t` as an Ollama TEMPLATE (Go text/template over .System and .Messages) that renders
    what `render_prompt` does: every user turn is followed by the assistant prefix, so the
    text ends with the generation prompt; an assistant turn is its answer and `end`.

    `$first` marks the first user turn when the template needs it: the separator goes
    before every later round, and Llama-2's system block inside the first [INST] only.
    """
    system_inside_user = "{system}" in t.user
    needs_first = system_inside_user or bool(t.separator)
    pieces: list[Piece] = []
    if needs_first:
        pieces.append((True, "$first := true"))
    pieces += _pieces(t.prefix, bos, eos=eos)
    if not system_inside_user:
        pieces += [(True, "if .System"), *_pieces(t.system, bos, eos=eos, system=".System"), (True, "end")]
    pieces += [(True, "range .Messages"), (True, 'if eq .Role "user"')]
    if t.separator:
        pieces += [(True, "if not $first"), *_pieces(t.separator, bos), (True, "end")]
    system_block = [(True, "if and $first $.System"), *_pieces(t.system, bos, eos=eos, system="$.System"),
                    (True, "end")]
    pieces += _pieces(t.user, bos, eos=eos, user=".Content", system_block=system_block)
    pieces += _pieces(t.assistant, bos)
    if needs_first:
        pieces.append((True, "$first = false"))
    pieces += [(True, 'else if eq .Role "assistant"'), *_pieces(t.answer_lead, bos, eos=eos), (True, ".Content"),
               (False, end), *_pieces(t.after_end, bos, eos=eos), (True, "end"), (True, "end")]
    return _layout(pieces)


def _pieces(fmt: str, bos: str, *, eos: str = "", user: str = "", system: str = "",
            system_block: list[Piece] | None = None) -> list[Piece]:
    """Go-template pieces that output `fmt`: markup as text, placeholders as actions."""
    pieces: list[Piece] = []
    for kind, part in format_parts(fmt):
        if kind == "text":
            pieces.append((False, part))
        elif part in ("bos", "eos"):
            pieces.append((False, bos if part == "bos" else eos))
        elif part == "user":
            pieces.append((True, user))
        elif system_block is not None:
            pieces += system_block
        else:
            pieces.append((True, system))
    return pieces


def _layout(pieces: list[Piece]) -> str:
    """Pieces → template text, one action per line where whitespace allows.

    An action goes on a new line as `{{- … }}`, whose `-` trims exactly that newline —
    unless the text before it ends in whitespace, which a `{{-` would eat too: then it
    follows the text directly. `-}}` is never used, so text after an action is never
    trimmed. Markup that Go would read as an action (`{{`) or that would end the
    Modelfile's triple quotes is written as a Go string literal instead.
    """
    merged: list[Piece] = []
    for is_action, body in pieces:
        if not is_action and ("{{" in body or '"""' in body):
            is_action, body = True, json.dumps(body, ensure_ascii=False)  # a valid Go string literal
        if not is_action and merged and not merged[-1][0]:
            merged[-1] = (False, merged[-1][1] + body)
        elif is_action or body:
            merged.append((is_action, body))
    out: list[str] = []
    for index, (is_action, body) in enumerate(merged):
        if not is_action:
            out.append(body)
        elif index and not merged[index - 1][0] and merged[index - 1][1][-1].isspace():
            out.append(f"{{{{ {body} }}}}")
        else:
            out.append(f"{chr(10) if index else ''}{{{{- {body} }}}}")
    return "".join(out)


def _template_name(gguf_path: Path, chat_template: str | None, requested: str | None) -> str:
    trained = template_name_in(chat_template)
    if requested:
        if trained and trained != requested:
            raise LoraforgeError(
                f"{gguf_path} was trained with chat template '{trained}' but --template {requested} was given: a "
                "model answers well only in the layout it learned — leave out --template to use its own")
        return requested
    if trained:
        return trained
    found = "a chat template that loraforge did not write" if chat_template else "no chat template"
    raise LoraforgeError(f"{gguf_path} has {found}, so the Modelfile's TEMPLATE cannot be derived from it: "
                         f"pass --template NAME with the template the model was trained with ({', '.join(TEMPLATES)})")


def _special_token(reader, gguf_path: Path, which: str) -> str | None:
    token_id = gguf_value(reader, f"tokenizer.ggml.{which}_token_id")
    text = gguf_token(reader, token_id)
    if token_id is not None and text is None:
        raise LoraforgeError(f"{gguf_path}: tokenizer.ggml.{which}_token_id is {token_id}, outside the vocabulary — "
                             "the file is damaged; export it again")
    return text


def _from_path(gguf_path: Path, out_path: Path) -> str:
    """Relative to the Modelfile when side by side (the pair can be moved together), else absolute."""
    if gguf_path.resolve().parent == out_path.resolve().parent:
        return f"./{gguf_path.name}"
    return os.fspath(gguf_path.resolve())


def _triple_quoted(text: str, command: str) -> str:
    # Ollama's Modelfile parser has no escapes: a value ends at the first `"""`.
    if '"""' in text:
        raise LoraforgeError(f'the {command} text contains """, which ends a Modelfile value and cannot be '
                             f"escaped: {text[:80]!r} — rephrase it without three double quotes in a row")
    return f'"""{text}"""'


def _quoted(text: str) -> str:
    # "…" holds one line; a stop string with a newline (the default template's "\nHuman:") needs """…""".
    return _triple_quoted(text, "PARAMETER stop") if "\n" in text else f'"{text}"'
