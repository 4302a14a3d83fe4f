"""Data files → rows: (source, row) pairs, where source is "path:line" ("path#row N" for parquet).

A row that cannot be parsed (a broken .jsonl line, a ragged .csv row) is yielded as a
`BadRow` in its place, so one bad line does not hide the rest of the file; a broken
.json array stops with path:line:col, since nothing after the break can be trusted.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import LoraforgeError
from loraforge.textfiles import read_text

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True)
class BadRow:
    """A row `read_rows` could not parse (a broken .jsonl line, a ragged .csv row).

    It is yielded in place of the row rather than raised, so one bad line does not hide
    the rest of the file; `load_records` turns it into a `Problem`.
    """

    reason: str
    detail: str = ""




def read_rows(path: Path) -> Iterator[tuple[str, object]]:
    """Yield `(source, row)` for every row of a data file, where source is "path:line".

    .json is one array of objects (each row's line is where its `{` is), .jsonl one
    object per line, .csv one row per record under a header line, .txt one non-empty line
    per `{"text": line}`; .parquet rows are "path#row N" (0-based). A row that cannot be
    parsed on its own is yielded as a `BadRow`; a broken .json file raises, since
    nothing after the break can be trusted.
    """
    path = Path(path)
    readers = {".json": _json_rows, ".jsonl": _jsonl_rows, ".csv": _csv_rows,
               ".txt": _txt_rows, ".parquet": _parquet_rows}
    reader = readers.get(path.suffix.lower())
    if path.is_dir():
        raise LoraforgeError(f"{path} is a folder: give one of its files, or name the folder in "
                             "dataset_info.json to read all of them")
    if reader is None:
        raise LoraforgeError(f"{path}: unsupported file type '{path.suffix}' — "
                             f"loraforge reads {', '.join(SUPPORTED_SUFFIXES)}")
    if not path.is_file():
        raise LoraforgeError(f"{path}: no such file")
    return reader(path)


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    text = read_text(path)
    decoder = json.JSONDecoder()
    pos = _JSON_SPACE.match(text).end()
    if pos == len(text):
        return
    if text[pos] == "{":
        first, end = _decode_json(decoder, text, pos, path)
        if _JSON_SPACE.match(text, end).end() == len(text):
            keys = ", ".join(f"'{key}'" for key in list(first)[:8])
            raise LoraforgeError(
                f"{path}: the file is one JSON object (keys {keys}), not a list of records — "
                "write the records as a JSON array [{...}, {...}] or one object per line (.jsonl)")
        # One object per line under a .json name: Hugging Face `datasets` reads these too.
        yield from _jsonl_rows(path, text)
        return
    if text[pos] != "[":
        raise _json_error(path, text, pos, "Expecting '[' to start an array of records")
    pos = _JSON_SPACE.match(text, pos + 1).end()
    line, counted = 1 + text.count("\n", 0, pos), pos
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            line, counted = line + text.count("\n", counted, pos), pos
            value, end = _decode_json(decoder, text, pos, path)
            yield f"{path}:{line}", value
            pos = _JSON_SPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = _JSON_SPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise _json_error(path, text, pos, "Expecting ',' delimiter or ']'")
    pos = _JSON_SPACE.match(text, pos).end()
    if pos != len(text):
        raise _json_error(path, text, pos, "Extra data after the array")


def _decode_json(decoder: json.JSONDecoder, text: str, pos: int, path: Path) -> tuple[object, int]:
    try:
        return decoder.raw_decode(text, pos)
    except json.JSONDecodeError as error:
        raise _json_error(path, text, error.pos, error.msg) from None


def _json_error(path: Path, text: str, pos: int, message: str) -> LoraforgeError:
    where = json.JSONDecodeError(message, text, pos)  # computes the line and column
    return LoraforgeError(f"{path}:{where.lineno}: not valid JSON ({message} at column {where.colno}) — "
                          "fix it there: a .json file must be one array of records")


def _jsonl_rows(path: Path, text: str | None = None) -> Iterator[tuple[str, object]]:
    for number, line in enumerate((read_text(path) if text is None else text).split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as error:
            yield f"{path}:{number}", BadRow("not valid JSON", f"{error.msg} at column {error.colno}")


def _csv_rows(path: Path) -> Iterator[tuple[str, object]]:
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        # hand-written headers often read "instruction, input, output"
        header = [name.strip() for name in next(reader, [])]
        end = reader.line_num
        for values in reader:
            start, end = end + 1, reader.line_num  # a quoted field may span lines: report the first
            if not values:
                continue
            if len(values) != len(header):
                yield f"{path}:{start}", BadRow(
                    "wrong number of columns",
                    f"{len(values)} values under {len(header)} headers; quote fields that contain commas")
                continue
            yield f"{path}:{start}", dict(zip(header, values, strict=True))
    except csv.Error as error:
        raise LoraforgeError(f"{path}:{reader.line_num}: not valid CSV ({error})") from None


def _txt_rows(path: Path) -> Iterator[tuple[str, object]]:
    for number, line in enumerate(read_text(path).split("\n"), 1):
        line = line.rstrip("\r")
        if line.strip():
            yield f"{path}:{number}", {"text": line}


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LoraforgeError(f"{path}: reading .parquet needs pyarrow — pip install pyarrow") from None
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path}#row {index}", row
                index += 1
    except pa.ArrowException as error:
        raise LoraforgeError(f"{path}: not a readable parquet file ({error})") from None
