"""`loraforge merge --format hf`: the merged model as sharded safetensors, streamed.

A safetensors header lists every tensor's shape and byte range, and the plan knows all
of them before any weight is read, so each shard's header is written first and the
tensors follow one at a time: memory holds one tensor, never a shard. The result goes
to a temporary directory that is renamed only when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from loraforge.export.chain import check_chain, write_merged_from
from loraforge.export.weights import (
    Adapter,
    Planned,
    check_free_space,
    merged_config,
    merged_tensors,
    nbytes,
    plan,
    read_adapter,
    tokenizer_source,
)
from loraforge.outputs import check_new_dir, new_dir
from loraforge.tokenizer import copy_tokenizer_files

SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
DEFAULT_SHARD_BYTES = 5 * 1024**3  # what transformers' save_pretrained uses


def shard_plan(planned: list[Planned], max_bytes: int) -> list[list[Planned]]:
    shards: list[list[Planned]] = [[]]
    size = 0
    for item in planned:
        if shards[-1] and size + nbytes(item) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes(item)
    return shards


def safetensors_header(items: list[Planned]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in items:
        size = nbytes(item)
        header[item.name] = {"dtype": SAFETENSORS_DTYPE[item.dtype], "shape": item.shape,
                             "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    return len(raw).to_bytes(8, "little") + raw


def copy_tokenizer(base_dir: Path, adapters: list[Adapter], out_dir: Path) -> None:
    copy_tokenizer_files(tokenizer_source(base_dir, adapters), out_dir)
    if (Path(base_dir) / "generation_config.json").exists():
        shutil.copy(Path(base_dir) / "generation_config.json", out_dir / "generation_config.json")


def merge_to_hf(base_dir: Path, adapter_dirs: list[Path], out_dir: Path,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, *, force: bool = False) -> Path:
    """Base + adapters (in order) → a HF model directory with merged weights (and merged_from.json)."""
    out_dir = Path(out_dir)
    check_new_dir(out_dir)
    adapters = [read_adapter(p) for p in adapter_dirs]
    planned = plan(base_dir, adapters)
    check_chain(base_dir, adapter_dirs, adapters, force=force)
    check_free_space(out_dir, sum(nbytes(p) for p in planned))
    with new_dir(out_dir) as tmp:
        write_shards(tmp, planned, adapters, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(merged_config(base_dir, planned), indent=2))
        copy_tokenizer(base_dir, adapters, tmp)
        write_merged_from(base_dir, adapter_dirs, tmp)
    return out_dir


def write_shards(folder: Path, planned: list[Planned], adapters: list[Adapter], max_shard_bytes: int) -> None:
    shards = shard_plan(planned, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    total = sum(nbytes(p) for p in planned)
    stream = merged_tensors(planned, adapters)
    with tqdm(total=total, unit="B", unit_scale=True, desc="merging") as progress:
        for name, items in zip(names, shards):
            with (folder / name).open("wb") as fh:
                fh.write(safetensors_header(items))
                for item in items:
                    planned_item, tensor = next(stream)
                    assert planned_item is item
                    # via uint8: numpy has no bfloat16
                    fh.write(tensor.to(item.dtype).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                    progress.update(nbytes(item))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {item.name: name for name, items in zip(names, shards) for item in items}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
