"""Read llama.cpp importance matrices (`llama-imatrix` output) for `export gguf --imatrix`.

Two formats exist. The current one is a GGUF file whose tensors come in pairs,
`<tensor>.in_sum2` (sums of squared activations per input column, per expert) and
`<tensor>.counts` (how many tokens went into each sum). The legacy `.dat` file is a
little-endian list of entries: name length, name, call count, value count, values
(already averaged and multiplied by the call count), then an optional chunk count and
dataset name. Either way a tensor's importance is one float per column: the mean
squared activation, which is what ggml's quantizers take.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from loraforge.errors import LoraforgeError


def load_imatrix(path: Path) -> dict[str, np.ndarray]:
    """GGUF tensor name → importance per column (float32)."""
    path = Path(path)
    if not path.is_file():
        raise LoraforgeError(f"--imatrix {path}: no such file")
    with path.open("rb") as f:
        magic = f.read(4)
    data = _from_gguf(path) if magic == b"GGUF" else _from_legacy(path)
    if not data:
        raise LoraforgeError(f"{path}: the importance matrix has no entries — was llama-imatrix interrupted?")
    for name, values in data.items():
        if not np.isfinite(values).all():
            raise LoraforgeError(f"{path}: entry {name} has NaN or infinite values; compute the imatrix again")
    return data


def _from_gguf(path: Path) -> dict[str, np.ndarray]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise LoraforgeError(f"{path}: not a readable GGUF imatrix ({exc})") from None
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        for suffix, into in ((".in_sum2", sums), (".counts", counts)):
            if tensor.name.endswith(suffix):
                if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise LoraforgeError(f"{path}: {tensor.name} is {tensor.tensor_type.name}, imatrix data must be F32")
                into[tensor.name.removesuffix(suffix)] = np.array(tensor.data, dtype=np.float32).reshape(-1)
    if not sums and not counts:
        raise LoraforgeError(f"{path}: a GGUF file without .in_sum2/.counts tensors is not an importance matrix "
                             "(is it a model? pass the file llama-imatrix wrote)")
    result = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise LoraforgeError(f"{path}: {name} has {'sums' if name in sums else 'counts'} but not "
                                 f"{'counts' if name in sums else 'sums'} — the imatrix file is damaged")
        per_expert = sums[name].reshape(len(counts[name]), -1)
        n = np.rint(counts[name]).astype(np.float32)[:, None]
        result[name] = np.where(n > 0, per_expert / np.maximum(n, 1), 1.0).astype(np.float32).reshape(-1)
    return result


def _from_legacy(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    offset = 0

    def take(fmt: str):
        nonlocal offset
        size = struct.calcsize(fmt)
        if offset + size > len(raw):
            raise LoraforgeError(f"{path}: ends after {offset} bytes inside an entry — neither a GGUF imatrix "
                                 "nor a complete legacy imatrix.dat")
        values = struct.unpack_from(fmt, raw, offset)
        offset += size
        return values

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise LoraforgeError(f"{path}: not an importance matrix (GGUF or legacy imatrix.dat)")
    result = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length < 4096:
            raise LoraforgeError(f"{path}: not an importance matrix (entry name length {length})")
        name = take(f"<{length}s")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise LoraforgeError(f"{path}: entry {name} has {nval} values")
        values = np.array(take(f"<{nval}f"), dtype=np.float32)
        result[name] = values / ncall if ncall > 0 else values
    return result


def importance_for(imatrix: dict[str, np.ndarray], name: str, n_per_row: int, source: Path) -> np.ndarray | None:
    """The entry for tensor `name`, checked against its row length; None if the file has none."""
    values = imatrix.get(name)
    if values is None:
        return None
    if values.size != n_per_row:
        if name == "token_embd.weight":  # llama.cpp ignores a mismatched embedding entry too
            return None
        raise LoraforgeError(f"{source}: the importance matrix for {name} has {values.size} values but its rows "
                             f"hold {n_per_row} — it was computed for another model")
    return values
