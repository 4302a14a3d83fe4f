"""A chat template given on the command line (`--template`, `--chat-template`), into and out of GGUFs.

NAME|FILE: a loraforge template name (data/templates.py) becomes the Jinja text training
saves into a run's tokenizer, so a GGUF given it by name is rendered by the very code
training used; anything else must be a Jinja file, taken as it is.

llama.cpp's adapter loader (src/llama-adapter.cpp) checks `general.type`, `adapter.type`,
`adapter.lora.alpha` and the architecture of an adapter GGUF and keeps the rest of its
metadata only as strings to look up (`llama_adapter_meta_val_str`); nothing in llama.cpp
renders prompts with an adapter's `tokenizer.chat_template`. So `export lora-gguf` writes
the template the adapter was trained with there, and our server reads it back itself
(`gguf` package) to render that adapter's requests.
"""

from __future__ import annotations

from pathlib import Path

from loraforge.errors import LoraforgeError

CHAT_TEMPLATE_KEY = "tokenizer.chat_template"


def chat_template_text(spec: str | Path) -> str:
    """The Jinja text for a template name or a Jinja file."""
    from loraforge.data.templates import TEMPLATES, get_template, jinja_template

    spec = str(spec)
    if spec in TEMPLATES:
        return jinja_template(get_template(spec))
    path = Path(spec).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise LoraforgeError(f"{path}: the chat template file is empty")
        return text
    raise LoraforgeError(f"chat template {spec!r} is neither a template name ({', '.join(TEMPLATES)}) nor a Jinja "
                         "file: pass one of those names, or the path of a .jinja file")


def set_chat_template(writer, text: str) -> None:
    """Put `text` as the GGUF's chat template, replacing one the tokenizer brought."""
    for table in writer.kv_data:
        table.pop(CHAT_TEMPLATE_KEY, None)
    writer.add_chat_template(text)


def gguf_chat_template(path: Path) -> str | None:
    """`tokenizer.chat_template` of a GGUF file (model or adapter), None if it has none."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise LoraforgeError(f"{path}: cannot read it as GGUF ({exc})") from None
    field = reader.fields.get(CHAT_TEMPLATE_KEY)
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")
