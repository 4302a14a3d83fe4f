"""`loraforge gguf inspect`: what a GGUF file holds, in one screen.

Metadata a person checks before loading a model (architecture, sizes, tokenizer, chat
template, llama.cpp's file type), the tensors counted by type, and bits per weight —
the tensor bytes over the parameter count, the number that says what a quantization
really costs. The file is memory-mapped by gguf's own reader; no tensor data is read.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path
from typing import Any

from loraforge.data.templates import template_name_in
from loraforge.errors import LoraforgeError
from loraforge.export.quant import GGMLType, ggml_name

GGUF_MAGIC = b"GGUF"


def read_gguf(path: Path):
    """gguf's reader over `path`, or a LoraforgeError saying what is wrong with the file."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise LoraforgeError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'} — pass a .gguf file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(64)
    if not head:
        raise LoraforgeError(f"{path}: the file is empty — the export or download that made it did not finish")
    if head.startswith(b"version https://git-lfs"):
        raise LoraforgeError(f"{path}: this is a Git LFS pointer ({size} bytes), not the model — "
                             "run `git lfs pull` in its repository to fetch the real file")
    if not head.startswith(GGUF_MAGIC):
        raise LoraforgeError(f"{path}: not a GGUF file — it starts with {head[:8]!r}, a GGUF file starts with "
                             f"{GGUF_MAGIC!r}. Export one with `loraforge export gguf`")
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, OverflowError, KeyError) as exc:
        # gguf's reader reports a short file as a failed reshape or view of the memory map
        raise LoraforgeError(
            f"{path}: truncated or damaged GGUF ({size:,} bytes): reading it failed with \"{exc}\" — "
            "an interrupted download, copy or export leaves such a file; make it again"
        ) from None


def gguf_value(reader, key: str) -> Any:
    """A metadata value (str, int, float, bool, or a list for arrays), None when absent."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def gguf_token(reader, token_id: int | None) -> str | None:
    """The text of one token of the file's vocabulary."""
    field = reader.fields.get("tokenizer.ggml.tokens")
    if token_id is None or field is None or not 0 <= token_id < len(field.data):
        return None
    return field.contents(token_id)


def type_name(raw: int) -> str:
    """ggml's spelling of a tensor type (`q4_K`), also for types loraforge never writes (`i32`)."""
    try:
        return ggml_name(GGMLType(int(raw)))
    except ValueError:
        from gguf import GGMLQuantizationType

        name = GGMLQuantizationType(int(raw)).name.lower()
        return name[:-2] + "_K" if name.endswith("_k") else name


def file_type_name(number: int | None) -> str | None:
    """llama.cpp's name for `general.file_type` (its llama_ftype): 15 → MOSTLY_Q4_K_M."""
    if number is None:
        return None
    from gguf import LlamaFileType

    try:
        return f"{LlamaFileType(number).name} (ftype {number})"
    except ValueError:
        return f"unknown to this gguf package (ftype {number})"


def tensor_summary(reader) -> tuple[dict[str, tuple[int, int]], int, int]:
    """({type: (tensor count, bytes)} largest first, total bytes, parameter count)."""
    counts: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    for tensor in reader.tensors:
        name = type_name(tensor.tensor_type)
        counts[name] += 1
        nbytes[name] += int(tensor.n_bytes)
    by_type = {name: (counts[name], nbytes[name]) for name in sorted(counts, key=lambda n: (-nbytes[n], n))}
    return by_type, sum(nbytes.values()), sum(int(t.n_elements) for t in reader.tensors)


def describe_gguf(path: Path) -> str:
    """An aligned text report of the GGUF at `path`: metadata, tensor types, size, bits per weight."""
    path = Path(path)
    reader = read_gguf(path)
    value = functools.partial(gguf_value, reader)
    arch = value("general.architecture")
    kind = value("general.type") or "model"
    by_type, tensor_bytes, params = tensor_summary(reader)

    rows: list[tuple[str, Any]] = [
        ("file", path),
        ("GGUF version", f"{value('GGUF.version')}, {value('GGUF.kv_count')} metadata keys"),
        ("kind", "LoRA adapter" if kind == "adapter" else kind),
        ("architecture", arch),
        ("name", value("general.name")),
        ("file type", file_type_name(value("general.file_type"))),
    ]
    if kind == "adapter":
        rows += [("adapter type", value("adapter.type")), ("lora alpha", _number(value("adapter.lora.alpha")))]
    if arch:
        heads, kv_heads = value(f"{arch}.attention.head_count"), value(f"{arch}.attention.head_count_kv")
        rows += [
            ("layers", value(f"{arch}.block_count")),
            ("embedding", value(f"{arch}.embedding_length")),
            ("feed-forward", value(f"{arch}.feed_forward_length")),
            ("heads", None if heads is None else f"{heads} (kv {kv_heads if kv_heads is not None else heads})"),
            ("context", value(f"{arch}.context_length")),
            ("rope base", _number(value(f"{arch}.rope.freq_base"))),
        ]
    rows += _tokenizer_rows(reader, arch)
    rows += [
        ("tensors", f"{len(reader.tensors)}: " + "  ".join(f"{name} {n}" for name, (n, _) in by_type.items())),
        ("tensor bytes", _size(tensor_bytes)),
        ("parameters", f"{params:,} ({_count(params)})"),
        ("bits per weight", f"{tensor_bytes * 8 / params:.2f}" if params else None),
        ("file size", _size(path.stat().st_size)),
    ]
    rows = [(label, shown) for label, shown in rows if shown is not None]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {shown}" for label, shown in rows)


def _tokenizer_rows(reader, arch: str | None) -> list[tuple[str, Any]]:
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = gguf_value(reader, f"{arch}.vocab_size") if arch else None
    if vocab is None and tokens is not None:
        vocab = len(tokens.data)
    model, pre = gguf_value(reader, "tokenizer.ggml.model"), gguf_value(reader, "tokenizer.ggml.pre")
    specials = []
    for label in ("bos", "eos"):
        token_id = gguf_value(reader, f"tokenizer.ggml.{label}_token_id")
        if token_id is not None:
            text = gguf_token(reader, token_id)
            specials.append(f"{label} {token_id}" + (f" {text!r}" if text is not None else ""))
    template = gguf_value(reader, "tokenizer.chat_template")
    if template is None:
        chat = "none" if tokens is not None else None
    elif name := template_name_in(template):
        chat = f"loraforge '{name}'"
    else:
        chat = f"present, not one of loraforge's ({len(template):,} characters)"
    tokenizer = None if model is None else model + (f" (pre {pre})" if pre else "")
    return [("vocab size", vocab), ("tokenizer", tokenizer), ("special tokens", "  ".join(specials) or None),
            ("chat template", chat)]


def _number(x: float | None) -> str | None:
    return None if x is None else f"{x:g}"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"
