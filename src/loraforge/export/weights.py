"""The one streaming path for weights: base shards + ordered adapters → merged tensors.

`merge` and `export gguf` both consume `merged_tensors`: it opens the base safetensors
shards memory-mapped, and yields `(name, fp32 tensor)` one at a time with each
adapter's delta `scale · B @ A` added in the order given; a `modules_to_save` tensor
(embed_tokens / lm_head of an extended vocabulary) replaces the base tensor. Peak memory
is one tensor plus its deltas, never the model.

Everything that can be wrong is checked before the first byte is written (`plan`):
a corrupt shard, an adapter whose LoRA shapes do not fit the base, an adapter that
targets a tensor the base does not have, adapters in the wrong order.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraforge.errors import LoraforgeError
from loraforge.export.shards import Shard

_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_WRAPPED = re.compile(r"\.modules_to_save(?:\.[^.]+)?\.(?=weight$|bias$)")  # X.modules_to_save[.default].weight
EMBEDDING_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass
class Adapter:
    """A peft LoRA adapter directory, read lazily."""

    path: Path
    config: dict
    lora: dict[str, tuple[str, str]] = field(default_factory=dict)  # base weight name → (A key, B key)
    full: dict[str, str] = field(default_factory=dict)  # base weight name → key of a whole tensor
    shapes: dict[str, list[int]] = field(default_factory=dict)
    handle: object = None  # the open (memory-mapped) adapter_model.safetensors

    @property
    def vocab_rows(self) -> int | None:
        rows = [self.shapes[self.full[n]][0] for n in EMBEDDING_NAMES if n in self.full]
        return rows[0] if rows else None

    def scale(self, weight_name: str, rank: int) -> float:
        """LoRA's alpha/r (alpha/√r with rsLoRA), honouring peft's per-module patterns."""
        module = weight_name.removesuffix(".weight")
        alpha = self.config.get("lora_alpha", rank)
        # peft's rule: the first key that, as a regex, matches the end of the module name
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def tensor(self, key: str) -> torch.Tensor:
        return self.handle.read(key).to(torch.float32)


def read_adapter(path: Path) -> Adapter:
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.exists():
        raise LoraforgeError(f"{path}: no adapter_config.json — not a peft adapter directory")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") not in ("LORA", None):
        raise LoraforgeError(f"{path}: a {config['peft_type']} adapter cannot be merged into weights; "
                             "only LoRA adapters can (prompt/prefix methods need the adapter at inference)")
    if config.get("use_dora"):
        raise LoraforgeError(f"{path}: DoRA adapters are not supported by merge/export yet; "
                             "merge it with peft's merge_and_unload and export the merged model")
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        raise LoraforgeError(f"{path}: no adapter_model.safetensors (a .bin adapter? re-save it with peft ≥ 0.6)")
    adapter = Adapter(path, config, handle=Shard(weights))
    pairs: dict[str, dict[str, str]] = {}
    for key in adapter.handle.keys():
        adapter.shapes[key] = adapter.handle.shape(key)
        name = key.removeprefix(_PEFT_PREFIX)
        match = _LORA_KEY.match(name)
        if match:
            pairs.setdefault(match["module"] + ".weight", {})[match["which"]] = key
        elif ".original_module." in name:
            continue  # the untrained copy of a modules_to_save layer (checkpoints of a resized run carry it)
        elif ".modules_to_save." in name:
            # the trained copy under its wrapper's name; the plain name, when also saved, is the same tensor
            adapter.full.setdefault(_WRAPPED.sub(".", name), key)
        else:
            adapter.full[name] = key
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise LoraforgeError(f"{weights}: {name} has lora_{''.join(pair)} but not its partner — the adapter is incomplete")
        adapter.lora[name] = (pair["A"], pair["B"])
    return adapter


def base_shards(base_dir: Path) -> dict[str, Path]:
    """Tensor name → the shard that holds it."""
    base_dir = Path(base_dir)
    index = base_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: base_dir / shard for name, shard in weight_map.items()}
    single = base_dir / "model.safetensors"
    if not single.exists():
        raise LoraforgeError(f"{base_dir}: no model.safetensors or model.safetensors.index.json — "
                             "export needs the base model in safetensors format")
    return {name: single for name in Shard(single).keys()}


@dataclass
class Planned:
    """One output tensor: its name, shape and dtype, and where its bytes come from."""

    name: str
    shape: list[int]
    dtype: torch.dtype
    shard: Path


def plan(base_dir: Path, adapters: list[Adapter]) -> list[Planned]:
    """Every output tensor with its final shape, after checking that the adapters fit."""
    shards = base_shards(base_dir)
    planned: dict[str, Planned] = {}
    handles = {shard: Shard(shard) for shard in set(shards.values())}
    for name, shard in shards.items():
        planned[name] = Planned(name, handles[shard].shape(name), _dtype(handles[shard].dtype_name(name)), shard)
    check_order(adapters)
    if "model.embed_tokens.weight" in planned:
        check_tokenizers(adapters, planned["model.embed_tokens.weight"].shape[0])
    for index, adapter in enumerate(adapters, start=1):
        for name, key in adapter.full.items():
            if name not in planned:
                raise LoraforgeError(f"adapter {index} ({adapter.path}) carries {name}, which the base model "
                                     f"{base_dir} does not have — is it an adapter for another model?")
            new_shape = adapter.shapes[key]
            if new_shape[1:] != planned[name].shape[1:]:
                raise LoraforgeError(f"adapter {index} ({adapter.path}): {name} has shape {new_shape}, the base has "
                                     f"{planned[name].shape} — only the vocabulary (rows) may differ")
            planned[name].shape = list(new_shape)
        for name, (a_key, b_key) in adapter.lora.items():
            if name not in planned:
                raise LoraforgeError(f"adapter {index} ({adapter.path}) adapts {name}, which the base model "
                                     f"{base_dir} does not have — is it an adapter for another model?")
            out_rows, in_cols = planned[name].shape[0], planned[name].shape[-1]
            (rank, a_cols), (b_rows, b_rank) = adapter.shapes[a_key], adapter.shapes[b_key]
            if a_cols != in_cols or b_rows != out_rows or rank != b_rank:
                raise LoraforgeError(
                    f"adapter {index} ({adapter.path}): LoRA for {name} is B{[b_rows, b_rank]}·A{[rank, a_cols]} "
                    f"but the base tensor is {planned[name].shape} — the adapter was trained on a different base")
    return list(planned.values())


def tokenizer_size(folder: Path) -> int | None:
    """Tokens of the tokenizer saved in `folder` (added tokens included), None without one."""
    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    if (folder / "tokenizer.model").exists():
        from loraforge.vocab.spm import load_proto

        return len(load_proto(folder / "tokenizer.model").pieces)
    return None


def check_tokenizers(adapters: list[Adapter], base_rows: int) -> None:
    """Each adapter's tokenizer must fit the embedding it was trained with (the classic 32000 vs
    49953 vs 49954 mix-ups). Larger: the adapter that grew the vocabulary is missing from the
    chain. Smaller than an earlier adapter's: this run was trained with the old tokenizer, or
    the order is reversed."""
    rows, largest = base_rows, None  # embedding rows at this point of the chain; biggest tokenizer so far
    for index, adapter in enumerate(adapters, start=1):
        rows = adapter.vocab_rows or rows
        tokens = tokenizer_size(adapter.path)
        if tokens is None:
            continue
        if tokens > rows:
            raise LoraforgeError(
                f"adapter {index} ({adapter.path}) has a {tokens}-token tokenizer but the embedding it applies to has "
                f"{rows} rows: it was trained on a model with a larger vocabulary — pass the adapter that grew it "
                "(the pt run with modules_to_save embed_tokens,lm_head) before it, or the resized model as --base "
                "(nothing was written)")
        if largest and tokens < largest[0]:
            before, at, path = largest
            raise LoraforgeError(
                f"adapter {index} ({adapter.path}) has a {tokens}-token tokenizer, adapter {at} ({path}) a "
                f"{before}-token one: either the adapters are in the wrong order (pass the pre-training adapter "
                f"first), or adapter {index} was trained with the old tokenizer and never saw the new tokens — set "
                f"model.tokenizer to adapter {at}'s directory and train it again (nothing was written)")
        largest = (tokens, index, adapter.path)


def check_order(adapters: list[Adapter]) -> None:
    """A vocabulary never shrinks from one adapter to the next: if it does, the order is reversed."""
    previous: tuple[int, Adapter] | None = None
    for index, adapter in enumerate(adapters, start=1):
        rows = adapter.vocab_rows
        if rows is None:
            continue
        if previous and rows < previous[1].vocab_rows:
            raise LoraforgeError(
                f"adapter {index} ({adapter.path}) has vocab {rows} < adapter {previous[0]}'s "
                f"{previous[1].vocab_rows} ({previous[1].path}): adapters are in the wrong order — "
                "pass the pre-training adapter first, then the SFT adapter")
        previous = (index, adapter)


def _dtype(name: str) -> torch.dtype:
    table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    if name not in table:
        raise LoraforgeError(f"unsupported tensor dtype {name} in the base model (expected F32, F16 or BF16)")
    return table[name]


def merged_chunks(planned: list[Planned], adapters: list[Adapter], max_bytes: int,
                  whole: Callable[[str], bool] = lambda name: True) -> Iterator[tuple[Planned, int, torch.Tensor]]:
    """Yield (item, first row, fp32 rows) of each output tensor: base + every adapter's delta in
    order, in blocks of at most `max_bytes` of fp32 unless `whole(name)` asks for the tensor at once.

    Rows are independent under the merge (W[r] + s·B[r]@A) and under quantization, so a
    32000×4096 embedding never needs to be in memory at once."""
    handles: dict[Path, Shard] = {}
    for item in planned:
        # an adapter's full tensor (modules_to_save) replaces everything before it
        replaced = max((i for i, a in enumerate(adapters) if item.name in a.full), default=-1)
        if replaced >= 0:
            source, key = adapters[replaced].handle, adapters[replaced].full[item.name]
        else:
            source = handles.setdefault(item.shard, Shard(item.shard))
            key = item.name
        deltas = [(a, *a.lora[item.name]) for a in adapters[replaced + 1:] if item.name in a.lora]
        n_rows = item.shape[0] if item.shape else 1
        row_bytes = 4 * math.prod(item.shape[1:])
        step = n_rows if whole(item.name) or not item.shape else max(1, max_bytes // max(row_bytes, 1))
        for start in range(0, n_rows, step):
            rows = (start, min(n_rows, start + step))
            tensor = source.read(key, rows if item.shape else None).to(torch.float32)
            for adapter, a_key, b_key in deltas:
                lora_a, lora_b = adapter.tensor(a_key), adapter.handle.read(b_key, rows).to(torch.float32)
                tensor.addmm_(lora_b, lora_a, alpha=adapter.scale(item.name, lora_a.shape[0]))  # W += s·B@A
            yield item, start, tensor


def merged_tensors(planned: list[Planned], adapters: list[Adapter]) -> Iterator[tuple[Planned, torch.Tensor]]:
    """Yield each output tensor whole, in fp32, base + every adapter's delta in order."""
    for item, _, tensor in merged_chunks(planned, adapters, max_bytes=0):
        yield item, tensor


def nbytes(item: Planned) -> int:
    count = 1
    for dim in item.shape:
        count *= dim
    return count * torch.empty((), dtype=item.dtype).element_size()


def check_free_space(out_dir: Path, needed: int) -> None:
    parent = out_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < needed * 1.02:
        raise LoraforgeError(f"{parent} has {free / 1e9:.1f} GB free but the merged model needs "
                             f"{needed / 1e9:.1f} GB: free some space or choose another -o")


def merged_config(base_dir: Path, planned: list[Planned]) -> dict:
    config = json.loads((Path(base_dir) / "config.json").read_text())
    embed = next((p for p in planned if p.name == "model.embed_tokens.weight"), None)
    if embed is not None:
        config["vocab_size"] = embed.shape[0]  # an extended vocabulary flows through here
    return config


def tokenizer_source(base_dir: Path, adapters: list[Adapter]) -> Path:
    """Where the tokenizer (and chat template) comes from: the last adapter that has one, else the base."""
    for adapter in reversed(adapters):
        if (adapter.path / "tokenizer_config.json").exists():
            return adapter.path
    return Path(base_dir)
