"""Read weight files tensor by tensor: safetensors with plain reads, torch pickles lazily.

A memory-mapped shard keeps every page it has touched resident (and counted in the
process's RSS) until it is closed, so streaming a 15 GB model through `safe_open`
would end up holding 15 GB. Reading each tensor's byte range into its own buffer keeps
memory at one tensor; the page cache, which the kernel can drop, holds the rest.
The header is checked against the file's size first, so a truncated or damaged shard
is reported by name before any output is written.

`pytorch_model*.bin` shards, peft's `adapter_model.bin` and Meta's `consolidated.*.pth`
are torch zip archives: `PickleShard` opens them with `torch.load(weights_only=True,
mmap=True)` — only tensors, dicts and numbers unpickle, never code — and keeps the
mapping open only while one tensor is being read, so its touched pages are released
before the next.
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


class _Entries:
    """What both shard kinds answer from their `entries`: name → (dtype name, shape, …)."""

    entries: dict

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name][1])

    def dtype_name(self, name: str) -> str:
        """safetensors' spelling: F32, F16, BF16, …"""
        return self.entries[name][0]


class Shard(_Entries):
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


_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class PickleShard(_Entries):
    """One `torch.save` file (.bin / .pth) with the same interface as `Shard`."""

    def __init__(self, path: Path, keep_open: bool = False):
        self.path, self.keep_open = Path(path), keep_open
        state = self._load()
        self.entries: dict[str, tuple[str, list[int]]] = {}
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue  # e.g. a scalar step counter beside the weights
            if value.dtype not in _DTYPE_NAMES:
                raise LoraforgeError(f"{self.path}: {name} has dtype {value.dtype}, which loraforge does not read")
            self.entries[name] = (_DTYPE_NAMES[value.dtype], list(value.shape))
        # (tensor name, state) while that tensor is being read; an adapter's stays open (its A and B
        # alternate for every block of rows, and the whole file is the size of a few tensors)
        self._open: tuple[str | None, dict] | None = (None, state) if keep_open else None

    def _load(self) -> dict:
        from pickle import UnpicklingError

        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except UnpicklingError as exc:
            self._refuse(exc)
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "mmap can only be used" in reason:
                if self.keep_open:  # an adapter: small enough to read whole (still weights_only)
                    return self._load_whole()
                raise LoraforgeError(
                    f"{self.path}: saved in torch's legacy (pre-1.6) format, which cannot be read tensor by tensor "
                    "— re-save it with a current torch.save (torch.load(..., weights_only=True) reads it), or as "
                    "safetensors") from None
            raise LoraforgeError(f"{self.path}: cannot read this torch file ({reason}) — the file is corrupt or "
                                 "truncated; copy or download it again") from None
        if not isinstance(state, dict):
            raise LoraforgeError(f"{self.path}: holds a {type(state).__name__}, not a state dict of tensors")
        return state

    def _refuse(self, exc: Exception):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # torch's own first line suggests weights_only=False; the unpickler's line says what was found
        reason = next((line for line in lines if "Unpickler error" in line), lines[0] if lines else "")
        raise LoraforgeError(
            f"{self.path}: torch.load(weights_only=True) refused this pickle ({reason}) — it holds objects other "
            "than tensors, and loraforge never unpickles arbitrary code. If you trust the file, load it "
            "yourself and save its state dict with safetensors.torch.save_file next to it") from None

    def _load_whole(self) -> dict:
        from pickle import UnpicklingError

        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except UnpicklingError as exc:
            self._refuse(exc)
        except Exception as exc:  # noqa: BLE001 — any other failure here is the file's
            raise LoraforgeError(f"{self.path}: cannot read this legacy torch file ({exc}) — the file is corrupt or "
                                 "truncated; copy or download it again") from None
        if not isinstance(state, dict):
            raise LoraforgeError(f"{self.path}: holds a {type(state).__name__}, not a state dict of tensors")
        return state

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only rows [start, stop) of its first dimension, copied out of the mapping."""
        if self._open is None or not self.keep_open and self._open[0] != name:
            self._open = None  # unmap the previous tensor's pages before mapping again
            self._open = (name, self._load())
        tensor = self._open[1][name]
        if rows is not None:
            tensor = tensor[rows[0]:rows[1]]
        return tensor.clone(memory_format=torch.contiguous_format)

    def close(self) -> None:
        self._open = None


def open_shard(path: Path, keep_open: bool = False) -> Shard | PickleShard:
    """A reader for one weight file, by its kind: safetensors, else a torch zip pickle."""
    path = Path(path)
    return Shard(path) if path.suffix == ".safetensors" else PickleShard(path, keep_open)
