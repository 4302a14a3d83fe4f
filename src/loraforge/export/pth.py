"""`loraforge merge --format pth`: the merged model as Meta's original LLaMA checkpoint.

`consolidated.00.pth` + `params.json` (+ `tokenizer.model`), the layout of Meta's
release and of the Chinese-LLaMA-Alpaca merge scripts' `--output_type pth`. Names are
Meta's (`layers.N.attention.wq.weight`, `feed_forward.w1/w2/w3`, …) and q/k rows go back
from the rotate-half order of HF checkpoints to Meta's interleaved order, per key/value
head for wk under grouped-query attention.

`torch.save` needs the whole state dict in memory, so the checkpoint is written here as
the zip archive `torch.load` reads: a pickle that refers to each tensor's storage by key,
then one stored (uncompressed) record per tensor, 64-byte aligned so `torch.load(...,
mmap=True)` works. Each tensor is merged, converted and written before the next is read.

`params.json` holds only keys Meta's own loaders accept: they call
`ModelArgs(max_seq_len=…, max_batch_size=…, **params)`, so a `max_seq_len` key (the
context length is their command-line argument) raises a TypeError, and LLaMA-1/2's
`ModelArgs` has no `rope_theta`, `n_kv_heads` or `ffn_dim_multiplier` field. Each of those
is written only where Meta's own releases write it.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import shutil
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
from tqdm import tqdm

from loraforge.errors import LoraforgeError
from loraforge.export.arch import arch_of, permute_qk, rope_theta
from loraforge.export.chain import check_chain
from loraforge.export.meta_pth import meta_name  # shared with the reader of .pth bases
from loraforge.export.weights import (
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

_STORAGE = {torch.float32: "FloatStorage", torch.float16: "HalfStorage", torch.bfloat16: "BFloat16Storage",
            torch.float64: "DoubleStorage"}
ALIGN = 64  # torch's record alignment; mmap loading relies on it


def ffn_params(dim: int, intermediate: int) -> dict:
    """multiple_of (and ffn_dim_multiplier if needed) for which Meta's formula gives `intermediate`.

    Meta's code does not store the feed-forward width: it derives it from `dim` as
    int(2·4·dim/3), times `ffn_dim_multiplier` if given, rounded up to a multiple of
    `multiple_of`. LLaMA-1/2 widths (11008 for 4096, 13824 for 5120) come out with
    multiple_of=256 alone, which is what Meta's own params.json say, so that is tried
    first. Other widths (LLaMA-2-70B, LLaMA-3, Mistral, a custom width) need a multiplier:
    the one with the fewest decimals, with the largest power-of-two multiple_of up to 4096
    that divides the width — 1.3 and 4096 for LLaMA-2-70B, Meta's own values. Every
    answer is checked against the formula, so any reader that follows it gets the width back.
    """
    base = int(2 * 4 * dim / 3)

    def meta_hidden(multiple_of: int, multiplier: float | None) -> int:
        hidden = int(multiplier * base) if multiplier else base
        return multiple_of * ((hidden + multiple_of - 1) // multiple_of)

    for multiple_of in (256, 128, 64, 32):
        if meta_hidden(multiple_of, None) == intermediate:
            return {"multiple_of": multiple_of}
    divisors = [2**k for k in range(12, -1, -1) if intermediate % 2**k == 0]
    for decimals in range(1, 13):
        scale = 10**decimals
        # int(multiplier·base) must land in (intermediate - multiple_of, intermediate]: the
        # largest d-decimal multiplier below (intermediate + 1)/base, or the one under it
        top = math.floor((intermediate + 1) / base * scale)
        for multiple_of in divisors:
            for multiplier in (top / scale, (top - 1) / scale):
                if multiplier > 0 and meta_hidden(multiple_of, multiplier) == intermediate:
                    return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
    raise LoraforgeError(f"no multiple_of/ffn_dim_multiplier reproduces intermediate_size {intermediate} for dim {dim} "
                         "by Meta's formula — use `merge --format hf`")


def check_llama(base_dir: Path, config: dict, planned: list[Planned]) -> None:
    """Meta's format has no biases, no head_dim of its own and only LLaMA's block: refuse anything else."""
    try:
        llama = arch_of(config).gguf_name == "llama"
    except LoraforgeError:
        llama = False
    bias = next((p.name for p in planned if p.name.endswith(".bias")), None)
    if not llama or bias:
        kind = config.get("model_type") or ", ".join(config.get("architectures") or ["unknown"])
        why = f" (it has {bias})" if bias and llama else ""
        raise LoraforgeError(f"{base_dir} is a {kind} model{why}; Meta's .pth layout exists only for LLaMA-style "
                             "models — use `merge --format hf` (nothing was written)")
    head_dim = config.get("head_dim")
    if head_dim and head_dim != config["hidden_size"] // config["num_attention_heads"]:
        raise LoraforgeError(f"{base_dir}/config.json: head_dim {head_dim} ≠ hidden_size/num_attention_heads, which "
                             "Meta's params.json cannot express — use `merge --format hf` (nothing was written)")


# The only rope scaling Meta's code has: Llama-3.1's, constants built into llama-models'
# `apply_scaling` and switched on by `use_scaled_rope`.
META_LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}


def rope_params(base_dir: Path, config: dict) -> dict:
    """rope_theta (omitted at LLaMA-1/2's 10000, as in Meta's params.json) and Llama-3.1 scaling."""
    theta = rope_theta(config)
    params = {} if theta == 10000.0 else {"rope_theta": theta}
    scaling = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return params
    if kind == "llama3" and all(scaling.get(key) == value for key, value in META_LLAMA3_ROPE.items()):
        return params | {"use_scaled_rope": True}
    settings = ", ".join(f"{k}={v}" for k, v in scaling.items() if k not in ("rope_theta", "type"))
    raise LoraforgeError(f"{base_dir}/config.json: rope scaling {settings} has no params.json form — Meta's code "
                         "knows only Llama-3.1's (rope_type=llama3, factor 8, low/high_freq_factor 1/4, original "
                         "8192), and without it the model would run with the wrong rotary frequencies; use "
                         "`merge --format hf` (nothing was written)")


def meta_params(base_dir: Path, config: dict) -> dict:
    heads = config["num_attention_heads"]
    params = {"dim": config["hidden_size"], "n_layers": config["num_hidden_layers"], "n_heads": heads,
              "n_kv_heads": config.get("num_key_value_heads") or heads,
              **ffn_params(config["hidden_size"], config["intermediate_size"]),
              "norm_eps": config.get("rms_norm_eps", 1e-6), **rope_params(base_dir, config),
              "vocab_size": config["vocab_size"]}
    if params["n_kv_heads"] == heads:
        del params["n_kv_heads"]  # LLaMA-1/2-7B's params.json has none
    return params


class _Storage:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    """Pickles as torch's own tensor record: _rebuild_tensor_v2 over a persistent storage."""

    def __init__(self, storage: _Storage, shape: list[int]):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce__(self):
        stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, _STORAGE[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def _state_pickle(entries: dict[str, _Tensor]) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(OrderedDict(entries))
    return buffer.getvalue()


def _write_record(archive: zipfile.ZipFile, name: str, data: bytes | memoryview) -> None:
    """A stored entry whose data starts on a 64-byte boundary (padding in the extra field).

    The local header is 30 bytes + the name + our extra field (+ 20 bytes of zip64 sizes
    for a record of 2 GiB or more, which we decide ourselves so the padding is known).
    """
    size = memoryview(data).nbytes
    zip64 = size >= zipfile.ZIP64_LIMIT // 2
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type, info.file_size = zipfile.ZIP_STORED, size
    start = archive.fp.tell() + 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
    pad = -start % ALIGN
    info.extra = struct.pack("<HH", 0x4C46, pad) + b"\0" * pad  # an unregistered id: padding, ignored by readers
    with archive.open(info, "w", force_zip64=zip64) as record:
        if archive.fp.tell() % ALIGN:
            raise LoraforgeError(f"{archive.filename}: record {name} does not start on a {ALIGN}-byte boundary, so "
                                 "torch.load(mmap=True) would fail — Python's zipfile header layout changed; "
                                 "please report this with your Python version")
        record.write(data)


def merge_to_pth(base_dir: Path, adapter_dirs: list[Path], out_dir: Path, *, force: bool = False) -> Path:
    """Write `out_dir/consolidated.00.pth` and `params.json` from the base and adapters."""
    out_dir = Path(out_dir)
    check_new_dir(out_dir)
    adapters = [read_adapter(p) for p in adapter_dirs]
    planned = plan(base_dir, adapters)
    check_chain(base_dir, adapter_dirs, adapters, force=force)
    config = merged_config(base_dir, planned)
    check_llama(base_dir, config, planned)
    params = meta_params(base_dir, config)  # before any weight: a refusal costs nothing
    names = {p.name: meta_name(p.name) for p in planned}
    planned = [p for p in planned if names[p.name]]
    check_free_space(out_dir, sum(nbytes(p) for p in planned))
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads

    storages = {p.name: _Storage(str(i), p.dtype, math.prod(p.shape)) for i, p in enumerate(planned)}
    entries = {names[p.name]: _Tensor(storages[p.name], p.shape) for p in planned}
    if "lm_head.weight" not in names:  # tied embeddings: output shares the embedding's storage
        embed = next(p for p in planned if p.name == "model.embed_tokens.weight")
        entries["output.weight"] = _Tensor(storages[embed.name], embed.shape)

    with new_dir(out_dir) as tmp:
        prefix = "consolidated.00/"
        with zipfile.ZipFile(tmp / "consolidated.00.pth", "w", zipfile.ZIP_STORED) as archive:
            _write_record(archive, prefix + "data.pkl", _state_pickle(entries))
            _write_record(archive, prefix + "byteorder", b"little")
            with tqdm(total=sum(nbytes(p) for p in planned), unit="B", unit_scale=True, desc="merging → pth") as progress:
                for item, tensor in merged_tensors(planned, adapters):
                    if item.name.endswith("self_attn.q_proj.weight"):
                        tensor = permute_qk(tensor, heads)
                    elif item.name.endswith("self_attn.k_proj.weight"):
                        tensor = permute_qk(tensor, kv_heads)
                    data = tensor.to(item.dtype).contiguous().reshape(-1).view(torch.uint8).numpy()  # numpy has no bf16
                    _write_record(archive, prefix + "data/" + storages[item.name].key, memoryview(data))
                    progress.update(data.nbytes)
            # no `.format_version`: with it, torch may compute record offsets assuming miniz's own
            # layout (data descriptors) instead of reading each local header
            _write_record(archive, prefix + "version", b"3\n")
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        source = tokenizer_source(base_dir, adapters) / "tokenizer.model"
        if source.exists():
            shutil.copy(source, tmp / "tokenizer.model")
    return out_dir
