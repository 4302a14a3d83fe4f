"""Read safetensors files tensor by tensor with plain reads, never a memory map.

A memory-mapped shard keeps every page it has touched resident (and counted in the
process's RSS) until it is closed, so streaming a 15 GB model through `safe_open`
would end up holding 15 GB. Reading each tensor's byte range into its own buffer keeps
memory at one tensor; the page cache, which the kernel can drop, holds the rest.
The header is checked against the file's size first, so a truncated or damaged shard
is reported by name before any output is written.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from loraforge.errors import LoraforgeError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class Shard:
    """One .safetensors file: its header, and `read(name)` for one tensor at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            self._fail(exc.strerror or str(exc))
        size = os.fstat(self._fd).st_size
        if size < 8:
            self._fail(f"{size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if header_len > size - 8:
            self._fail(f"the header claims {header_len} bytes but the file has {size}")
        try:
            header = json.loads(os.pread(self._fd, header_len, 8))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._fail(f"the header is not JSON ({exc})")
        header.pop("__metadata__", None)
        self._base, data_len = 8 + header_len, size - 8 - header_len
        self.entries: dict[str, tuple[str, list[int], int, int]] = {}
        for name, info in header.items():
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            if dtype not in DTYPES:
                self._fail(f"{name} has dtype {dtype}, which loraforge does not read")
            count = 1
            for dim in shape:
                count *= dim
            if end > data_len or end - start != count * torch.empty((), dtype=DTYPES[dtype]).element_size():
                self._fail(f"{name} ends at byte {self._base + end} but the file has {size} bytes")
            self.entries[name] = (dtype, list(shape), start, end)

    def _fail(self, reason: str):
        raise LoraforgeError(f"{self.path}: cannot read safetensors ({reason}) — the file is corrupt or truncated; "
                             "copy or download it again") from None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name][1])

    def dtype_name(self, name: str) -> str:
        """safetensors' spelling: F32, F16, BF16, …"""
        return self.entries[name][0]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only rows [start, stop) of its first dimension."""
        dtype, shape, start, end = self.entries[name]
        if rows is not None:
            row_bytes = (end - start) // shape[0] if shape and shape[0] else 0
            start, end = start + rows[0] * row_bytes, start + rows[1] * row_bytes
            shape = [rows[1] - rows[0], *shape[1:]]
        if end == start:
            return torch.empty(shape, dtype=DTYPES[dtype])
        buffer = bytearray(end - start)
        view, done = memoryview(buffer), 0
        while done < len(buffer):  # pread may return less than asked for
            got = os.preadv(self._fd, [view[done:]], self._base + start + done)
            if got == 0:
                self._fail(f"{name} is cut short")
            done += got
        return torch.frombuffer(buffer, dtype=DTYPES[dtype]).reshape(shape)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
