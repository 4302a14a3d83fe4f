"""The one streaming path for weights: base shards + ordered adapters → merged tensors.

`merge` and `export gguf` both consume `merged_chunks`: it opens the base's weight files
lazily — safetensors, `pytorch_model*.bin` shards or Meta's `consolidated.*.pth` (see
`shards.py`, `meta_pth.py`) — and yields fp32 tensors one block of rows at a time with
each adapter's update applied in the order given; a `modules_to_save` tensor (embed_tokens
/ lm_head of an extended vocabulary) replaces the base tensor. Peak memory is one tensor
plus its deltas, never the model.

The updates are peft's own merges (tuners/lora/layer.py, variants.py, adalora/layer.py):
  LoRA, rsLoRA   W += s·B@A                        s = alpha/r, alpha/√r
  DoRA           W' = m ⊙ (W + s·B@A) / ‖W + s·B@A‖ the norm per output row, m = lora_magnitude_vector
  AdaLoRA        W += B@(A ⊙ E) · alpha/(init_r + 1e-5)  pruned ranks are zeros in E, or cut from
                                                   A/E/B when the config has a rank_pattern
Every one of them treats output rows independently, so a block of rows merges alone.

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
from loraforge.export.meta_pth import MetaCheckpoint, is_meta_dir
from loraforge.export.shards import PickleShard, Shard, open_shard
from loraforge.models import check_model_dir

_PEFT_PREFIX = "base_model.model."
# X.lora_A[.adapter].weight (LoRA/DoRA), X.lora_A[.adapter] (AdaLoRA keeps bare parameters) — not lora_B.bias
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[ABE])(?:\.(?!weight$|bias$)[^.]+)?(?:\.weight)?$")
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.(?!weight$)[^.]+)?(?:\.weight)?$")
_MERGEABLE = ("LORA", "ADALORA")
_PROMPT_METHODS = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT")
_WRAPPED = re.compile(r"\.modules_to_save(?:\.[^.]+)?\.(?=weight$|bias$)")  # X.modules_to_save[.default].weight
EMBEDDING_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass
class Adapter:
    """A peft LoRA / DoRA / AdaLoRA adapter directory, read lazily."""

    path: Path
    config: dict
    lora: dict[str, tuple[str, str]] = field(default_factory=dict)  # base weight name → (A key, B key)
    full: dict[str, str] = field(default_factory=dict)  # base weight name → key of a whole tensor
    shapes: dict[str, list[int]] = field(default_factory=dict)
    handle: object = None  # the open adapter_model.safetensors / adapter_model.bin
    magnitude: dict[str, str] = field(default_factory=dict)  # DoRA: base weight name → lora_magnitude_vector key
    singular: dict[str, str] = field(default_factory=dict)  # AdaLoRA: base weight name → lora_E key

    @property
    def kind(self) -> str:
        """lora, dora or adalora."""
        if self.config.get("peft_type") == "ADALORA":
            return "adalora"
        return "dora" if self.config.get("use_dora") else "lora"

    @property
    def vocab_rows(self) -> int | None:
        rows = [self.shapes[self.full[n]][0] for n in EMBEDDING_NAMES if n in self.full]
        return rows[0] if rows else None

    def scale(self, weight_name: str, rank: int) -> float:
        """LoRA's alpha/r (alpha/√r with rsLoRA), honouring peft's per-module patterns; AdaLoRA's
        alpha/(init_r + 1e-5), with the rank it started from however many ranks pruning kept."""
        module = weight_name.removesuffix(".weight")
        if self.kind == "adalora":
            # peft: scaling = lora_alpha or the (kept) rank; ranknum = init_r, also after resizing
            alpha = self.config.get("lora_alpha") or rank
            init_r = self.config.get("init_r") or self.config.get("r") or rank
            return alpha / (init_r + 1e-5)
        alpha = self.config.get("lora_alpha", rank)
        # peft's rule: the first key that, as a regex, matches the end of the module name
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def tensor(self, key: str) -> torch.Tensor:
        return self.handle.read(key).to(torch.float32)

    def lora_a(self, weight_name: str) -> torch.Tensor:
        """A in fp32; for AdaLoRA, A ⊙ E, so that B @ A is the update as for LoRA."""
        lora_a = self.tensor(self.lora[weight_name][0])
        if weight_name in self.singular:
            lora_a = lora_a * self.tensor(self.singular[weight_name])
        return lora_a


def read_adapter(path: Path) -> Adapter:
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.exists():
        if not path.exists():
            raise LoraforgeError(f"no such adapter directory: {path} — pass a training run or peft adapter folder")
        raise LoraforgeError(f"{path}: no adapter_config.json — not a peft adapter directory")
    config = json.loads(config_file.read_text())
    check_adapter_config(config_file, config)
    adapter = Adapter(path, config, handle=open_adapter_weights(path))
    weights = adapter.handle.path
    parts: dict[str, dict[str, str]] = {}
    for key in adapter.handle.keys():
        adapter.shapes[key] = adapter.handle.shape(key)
        name = key.removeprefix(_PEFT_PREFIX)
        match = _LORA_KEY.match(name)
        magnitude = _MAGNITUDE_KEY.match(name)
        if match:
            parts.setdefault(match["module"] + ".weight", {})[match["which"]] = key
        elif magnitude:
            adapter.magnitude[magnitude["module"] + ".weight"] = key
        elif ".original_module." in name:
            continue  # the untrained copy of a modules_to_save layer (checkpoints of a resized run carry it)
        elif ".modules_to_save." in name:
            # the trained copy under its wrapper's name; the plain name, when also saved, is the same tensor
            adapter.full.setdefault(_WRAPPED.sub(".", name), key)
        else:
            adapter.full[name] = key
    wanted = {"lora": "AB", "dora": "AB", "adalora": "ABE"}[adapter.kind]
    for name, part in parts.items():
        if set(part) != set(wanted):
            have = ", ".join(f"lora_{w}" for w in sorted(part))
            raise LoraforgeError(f"{weights}: {name} has {have} but a {adapter.kind} adapter needs "
                                 f"{', '.join(f'lora_{w}' for w in wanted)} — the adapter is incomplete")
        adapter.lora[name] = (part["A"], part["B"])
        if "E" in part:
            adapter.singular[name] = part["E"]
    if adapter.kind == "dora":
        missing = sorted(set(adapter.lora) - set(adapter.magnitude))
        if missing:
            raise LoraforgeError(f"{weights}: DoRA adapter (use_dora=true) without lora_magnitude_vector for "
                                 f"{missing[0]} — the adapter is incomplete; save it again with peft")
    elif adapter.magnitude:
        raise LoraforgeError(f"{weights} has lora_magnitude_vector tensors (DoRA) but {config_file} does not say "
                             "use_dora=true — the config and the weights come from different adapters")
    return adapter


def check_adapter_config(config_file: Path, config: dict) -> None:
    """Refuse, before any weight is read, what the stream cannot merge as peft would."""
    from loraforge.models import reward_model_error

    if config.get("task_type") == "SEQ_CLS":
        raise reward_model_error(str(config_file.parent))
    kind = config.get("peft_type")
    if kind not in (*_MERGEABLE, None):
        why = (" — prompt/prefix methods add virtual tokens, not weights, and need the adapter at inference"
               if kind in _PROMPT_METHODS else
               "; merge it with peft's merge_and_unload, save the merged model and export that")
        raise LoraforgeError(f"{config_file}: a {kind} adapter cannot be merged by loraforge (it merges LORA — "
                             f"with rsLoRA or DoRA — and ADALORA adapters){why}")
    # early peft (Chinese-LLaMA's releases): enable_lora lists which of q/k/v a fused qkv MergedLinear adapts
    if config.get("enable_lora"):
        raise LoraforgeError(f"{config_file}: enable_lora={config['enable_lora']} is early peft's fused-qkv "
                             "MergedLinear (GPT-2 style); LLaMA-family models have separate q/k/v projections — this "
                             "adapter is for another architecture")
    # fan_in_fan_out=true means weights stored [in, out] (GPT-2's Conv1D); on nn.Linear, which every LLaMA
    # target is, peft itself warns and sets it to False, so the A/B stored are the usual [r, in] / [out, r]
    if config.get("layer_replication"):
        raise LoraforgeError(f"{config_file}: layer_replication builds a deeper model than the base; loraforge's "
                             "merge keeps the base's layers — merge it with peft's merge_and_unload")


def open_adapter_weights(path: Path) -> Shard | PickleShard:
    """adapter_model.safetensors, else adapter_model.bin (older peft, Chinese-LLaMA's releases)."""
    if (path / "adapter_model.safetensors").exists():
        return Shard(path / "adapter_model.safetensors")
    if (path / "adapter_model.bin").exists():
        return PickleShard(path / "adapter_model.bin", keep_open=True)
    raise LoraforgeError(f"{path}: no adapter_model.safetensors or adapter_model.bin — copy the adapter's weights "
                         "next to its adapter_config.json")


def base_readers(base_dir: Path) -> dict[str, tuple[Path, object]]:
    """Tensor name → (the file that holds it, a reader with `shape/dtype_name/read`), whichever of the
    three layouts the base is in: HF safetensors, HF pytorch_model*.bin, Meta consolidated.*.pth."""
    base_dir = Path(base_dir)
    check_model_dir(base_dir, "--base")
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = base_dir / index_name
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: base_dir / shard for name, shard in weight_map.items()}
            missing = sorted({f.name for f in files.values() if not f.exists()})
            if missing:
                raise LoraforgeError(f"{index} lists {', '.join(missing)}, which is not in {base_dir} — copy every "
                                     "shard of the model")
            readers = {path: open_shard(path) for path in set(files.values())}
            for name, path in files.items():
                if name not in readers[path].keys():
                    raise LoraforgeError(f"{index} puts {name} in {path.name}, which does not hold it — the index "
                                         "belongs to another copy of the model")
            return {name: (path, readers[path]) for name, path in files.items()}
        if (base_dir / single).exists():
            reader = open_shard(base_dir / single)
            return {name: (base_dir / single, reader) for name in reader.keys()}
    if is_meta_dir(base_dir):
        checkpoint = MetaCheckpoint(base_dir)
        return {name: (checkpoint.files[0], checkpoint) for name in checkpoint.keys()}
    raise LoraforgeError(f"{base_dir}: no model weights — export reads model.safetensors(.index.json), "
                         "pytorch_model.bin(.index.json), or Meta's consolidated.00.pth with params.json")


def base_shards(base_dir: Path) -> dict[str, Path]:
    """Tensor name → the file that holds it."""
    return {name: path for name, (path, _) in base_readers(base_dir).items()}


@dataclass
class Planned:
    """One output tensor: its name, shape and dtype, and where its bytes come from."""

    name: str
    shape: list[int]
    dtype: torch.dtype
    shard: Path
    source: object = field(default=None, repr=False, compare=False)  # the base reader; None: open `shard`


def plan(base_dir: Path, adapters: list[Adapter]) -> list[Planned]:
    """Every output tensor with its final shape, after checking that the adapters fit."""
    planned: dict[str, Planned] = {}
    for name, (shard, reader) in base_readers(base_dir).items():
        planned[name] = Planned(name, reader.shape(name), _dtype(reader.dtype_name(name)), shard, reader)
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
            extra = {adapter.magnitude.get(name): [out_rows], adapter.singular.get(name): [rank, 1]}
            for key, shape in extra.items():
                if key is not None and adapter.shapes[key] != shape:
                    raise LoraforgeError(f"adapter {index} ({adapter.path}): {key} has shape {adapter.shapes[key]}, "
                                         f"expected {shape} for {name} {planned[name].shape} — the adapter is damaged "
                                         "or was trained on a different base")
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

    Rows are independent under the merge (W[r] + s·B[r]@A; DoRA's norm is per row too) and
    under quantization, so a 32000×4096 embedding never needs to be in memory at once."""
    handles: dict[Path, object] = {}
    for item in planned:
        # an adapter's full tensor (modules_to_save) replaces everything before it
        replaced = max((i for i, a in enumerate(adapters) if item.name in a.full), default=-1)
        if replaced >= 0:
            source, key = adapters[replaced].handle, adapters[replaced].full[item.name]
        else:
            source = item.source or handles.get(item.shard) or handles.setdefault(item.shard, open_shard(item.shard))
            key = item.name
        deltas = [(a, *a.lora[item.name]) for a in adapters[replaced + 1:] if item.name in a.lora]
        n_rows = item.shape[0] if item.shape else 1
        row_bytes = 4 * math.prod(item.shape[1:])
        step = n_rows if whole(item.name) or not item.shape else max(1, max_bytes // max(row_bytes, 1))
        for start in range(0, n_rows, step):
            rows = (start, min(n_rows, start + step))
            tensor = source.read(key, rows if item.shape else None).to(torch.float32)
            for adapter, _, b_key in deltas:
                lora_a, lora_b = adapter.lora_a(item.name), adapter.handle.read(b_key, rows).to(torch.float32)
                tensor.addmm_(lora_b, lora_a, alpha=adapter.scale(item.name, lora_a.shape[0]))  # W += s·B@A
                if item.name in adapter.magnitude:  # DoRA: each row rescaled to its trained magnitude
                    magnitude = adapter.handle.read(adapter.magnitude[item.name], rows).to(torch.float32)
                    tensor.mul_((magnitude / torch.linalg.norm(tensor, dim=1)).unsqueeze(1))
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


def base_config(base_dir: Path) -> dict:
    """config.json, or for a Meta checkpoint without HF weights the one params.json describes."""
    base_dir = Path(base_dir)
    hf_weights = any((base_dir / name).exists() for name in (
        "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"))
    if not hf_weights and is_meta_dir(base_dir):
        return MetaCheckpoint(base_dir).config()
    if not (base_dir / "config.json").exists():
        raise LoraforgeError(f"{base_dir}: no config.json — copy the model's config.json next to its weights")
    return json.loads((base_dir / "config.json").read_text())


def merged_config(base_dir: Path, planned: list[Planned]) -> dict:
    config = base_config(base_dir)
    embed = next((p for p in planned if p.name == "model.embed_tokens.weight"), None)
    if embed is not None:
        config["vocab_size"] = embed.shape[0]  # an extended vocabulary flows through here
    return config


def tokenizer_source(base_dir: Path, adapters: list[Adapter]) -> Path:
    """Where the tokenizer (and chat template) comes from: the tokenizer module's chain rule."""
    from loraforge.tokenizer import chain_tokenizer_dir

    return chain_tokenizer_dir(base_dir, [a.path for a in adapters])
