"""Reading the text files people hand us (config YAML, dataset_info.json, data files).

UTF-8 is the format; a UTF-8 BOM (Notepad, Excel) and UTF-16 with a BOM (Windows "Unicode")
are accepted because they are unambiguous. Anything else — most often GBK, what Windows
saves as "ANSI" with Chinese text — is refused with the file, line and byte offset, since
guessing an encoding silently turns names into mojibake that trains just fine.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from loraforge.errors import LoraforgeError

SAVE_AS_UTF8 = ("save the file as UTF-8 (Excel: 'CSV UTF-8'; Notepad: Save as → Encoding UTF-8; "
                "a GBK file: iconv -f gbk -t utf-8 FILE > NEW)")


def read_text(path: Path) -> str:
    """The text of `path`: UTF-8 (BOM optional) or UTF-16 with a BOM; otherwise a LoraforgeError."""
    path = Path(path)
    data = path.read_bytes()
    for bom, encoding in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
                          (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):
            return _decode(path, data, len(bom), encoding)
    nul = data.find(b"\x00")
    if nul >= 0:  # NUL is valid UTF-8 but never in a text file: UTF-16 written without its BOM
        raise LoraforgeError(f"{path}:{_line(data, nul)}: not UTF-8 text (a NUL byte at offset {nul}: "
                             f"UTF-16 without a byte-order mark?) — {SAVE_AS_UTF8}")
    return _decode(path, data, 0, "utf-8")


def _decode(path: Path, data: bytes, start: int, encoding: str) -> str:
    try:
        return data[start:].decode(encoding)
    except UnicodeDecodeError as error:
        offset = start + error.start
        name = "UTF-8" if encoding == "utf-8" else "UTF-16"
        line = _line(data, offset) if encoding == "utf-8" else _line(data[start:offset].decode(encoding, "replace"))
        raise LoraforgeError(f"{path}:{line}: not {name} text (byte 0x{data[offset]:02x} at offset {offset}) "
                             f"— {SAVE_AS_UTF8}") from None


def _line(text: bytes | str, end: int | None = None) -> int:
    newline = b"\n" if isinstance(text, bytes) else "\n"
    return text.count(newline, 0, len(text) if end is None else end) + 1
