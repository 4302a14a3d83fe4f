"""What an adapter was trained on, and the check of a given chain against those records.

LoRA order and membership matter, and a wrong chain often has the right shapes: `sft`
trained on `pt`'s merge, exported with `--adapter sft` alone (pt left out) or `sft,pt`
(swapped), merges without a single shape error and gives another model than the one
`chat runs/sft` loads. So every stage that makes a model leaves a record:

- `train` writes `trained_on.json` into the run: the model `model.path` named, with the
  fingerprint of its weights and, when that model is itself a merge (or an adapter run),
  what it was made of;
- `merge` writes `merged_from.json` into its output: the base and adapters it merged.

`check_chain` (the first thing merge and export do) asks, for each adapter in the given
order, whether the base plus the adapters before it are one way of writing the model it
was trained on: `merged/` itself, or `base + pt` when `merged/` records being that. A
missing, extra or swapped adapter is refused with the chain the records expect;
`--force` turns the refusal into a note. Adapters without a loraforge record are judged
by peft's `base_model_name_or_path` alone, which cannot tell a plain base from one that
had earlier adapters merged in memory (peft keeps the original name), so there only a
base that really differs is refused. An adapter that records nothing passes with a note.

Chat follows the same records: an adapter run's `base_model_name_or_path` names the
model it was trained on (`models.resolve_model`, which this module uses to follow an
adapter run that was itself the base), so what `chat runs/sft` loads is one of the
chains this check accepts.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import LoraforgeError

TRAINED_ON = "trained_on.json"
MERGED_FROM = "merged_from.json"
FORMAT = 1

# A fingerprint must be cheap on a 16 GB base and stable across copies and re-sharding.
# It hashes, per tensor, the name, dtype, shape and SAMPLES bytes at evenly spaced places
# of its data (the whole tensor when small): a merged LoRA, a fine-tune or another base
# changes nearly every element of the tensors it touches, so a strided sample sees it, and
# per-tensor digests say *which* tensors differ (an extended vocabulary's embed_tokens
# differs from the base's, and that is fine when the adapter replaces it in full).
# Reading a few KB per tensor keeps it well under a second for a 7B model.
SAMPLES, SAMPLE_BYTES = 16, 256


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


# --- fingerprints -------------------------------------------------------------------------


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _sample(handle, start: int, size: int) -> bytes:
    if size <= SAMPLES * SAMPLE_BYTES:
        handle.seek(start)
        return handle.read(size)
    step = (size - SAMPLE_BYTES) // (SAMPLES - 1)
    chunks = []
    for k in range(SAMPLES):
        handle.seek(start + k * step)
        chunks.append(handle.read(SAMPLE_BYTES))
    return b"".join(chunks)


def _safetensors_digests(path: Path) -> dict[str, str]:
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise LoraforgeError(f"{path}: truncated safetensors file (no header)")
        (length,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LoraforgeError(f"{path}: the safetensors header is not valid JSON — the file is corrupt") from None
        digests = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            meta = json.dumps([info["dtype"], info["shape"]]).encode()
            sample = _sample(handle, 8 + length + begin, end - begin)
            digests[name] = f"{info['dtype']}:{_digest(name.encode(), meta, sample)}"
    return digests


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        return _digest(path.name.encode(), str(size).encode(), _sample(handle, 0, size))


def weight_files(folder: Path) -> list[Path]:
    """The files holding a model's or an adapter's weights, safetensors first."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / s for s in shards]
    for name in ("model.safetensors", "adapter_model.safetensors"):
        if (folder / name).exists():
            return [folder / name]
    for pattern in ("pytorch_model*.bin", "adapter_model.bin", "consolidated.*.pth"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    return []


def fingerprint(folder: Path) -> dict | None:
    """{"digest", "tensors": {name: "DTYPE:digest"}} of a model or adapter dir; None without weights.

    Safetensors are fingerprinted per tensor (re-sharding keeps it); .bin/.pth files, whose
    tensors only a pickle can list, per file."""
    files = weight_files(Path(folder))
    if not files:
        return None
    tensors: dict[str, str] = {}
    for file in files:
        if file.suffix == ".safetensors":
            tensors.update(_safetensors_digests(file))
        else:
            tensors[f"file:{file.name}"] = f"file:{_file_digest(file)}"
    digest = _digest(*(f"{n}={d}".encode() for n, d in sorted(tensors.items())))
    return {"digest": digest, "tensors": tensors}


# --- records ------------------------------------------------------------------------------


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _adapter_ref(folder: Path) -> dict:
    folder = Path(folder).resolve()
    return {"kind": "adapter", "path": str(folder), "fingerprint": fingerprint(folder)}


def describe_model(folder: Path, depth: int = 0) -> dict:
    """The record of a model dir (with what it was merged from) or of an adapter run used as a base."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        return {"kind": "model", "path": str(folder), "fingerprint": None}
    folder = folder.resolve()
    if (folder / "adapter_config.json").exists():
        node = _adapter_ref(folder)
        node["on"] = trained_on(folder, depth + 1)
        return node
    node = {"kind": "model", "path": str(folder), "fingerprint": fingerprint(folder)}
    merged = _read(folder / MERGED_FROM)
    if merged and depth < 8:
        node["made_from"] = {"base": merged.get("base"), "adapters": merged.get("adapters", [])}
    return node


def trained_on(adapter_dir: Path, depth: int = 0) -> dict | None:
    """What an adapter was trained on: loraforge's record, else peft's base_model_name_or_path
    (followed through adapter runs as `models.resolve_model` does), else None."""
    adapter_dir = Path(adapter_dir)
    record = _read(adapter_dir / TRAINED_ON)
    if record and record.get("model"):
        return {**record["model"], "loraforge": True}
    config = _read(adapter_dir / "adapter_config.json") or {}
    named = config.get("base_model_name_or_path")
    if not named or depth >= 8:
        return None
    named_path = Path(named).expanduser()
    if not named_path.is_absolute():
        named_path = (adapter_dir / named_path) if (adapter_dir / named_path).exists() else named_path
    return describe_model(named_path, depth)


def write_trained_on(model_path: Path, run_dir: Path) -> Path:
    """Called by `train` once the run is saved: the record export and merge check chains against."""
    out = Path(run_dir) / TRAINED_ON
    record = {"format": FORMAT, "model": describe_model(Path(model_path))}
    out.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return out


def write_merged_from(base_dir: Path, adapter_dirs: list[Path], out_dir: Path) -> None:
    """Called by `merge` into its (temporary) output: what the merged model is made of."""
    record = {"format": FORMAT, "base": describe_model(Path(base_dir)),
              "adapters": [_adapter_ref(Path(a)) for a in adapter_dirs]}
    (Path(out_dir) / MERGED_FROM).write_text(json.dumps(record, indent=1), encoding="utf-8")


# --- the check ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Writing:
    """One way of writing a model: a base and the adapters applied on it, in order."""

    base: dict
    adapters: tuple[dict, ...]


def writings(node: dict) -> list[Writing]:
    """`merged/` itself, and `base + pt` when merged/ records being that, recursively."""
    if node.get("kind") == "adapter":
        on = node.get("on")
        inner = writings(on) if on else []
        return [Writing(w.base, (*w.adapters, node)) for w in inner]
    found = [Writing(node, ())]
    made = node.get("made_from")
    if made and made.get("base"):
        for inner in writings(made["base"]):
            found.append(Writing(inner.base, (*inner.adapters, *made.get("adapters", []))))
    return found


class _Given:
    """The chain as passed, with fingerprints computed once each."""

    def __init__(self, base_dir: Path, adapter_dirs: list[Path]):
        self.base = Path(base_dir)
        self.adapters = [Path(a) for a in adapter_dirs]
        self._prints: dict[Path, dict | None] = {}

    def print_of(self, folder: Path) -> dict | None:
        key = Path(folder).resolve()
        if key not in self._prints:
            self._prints[key] = fingerprint(key)
        return self._prints[key]


def _differing(a: dict, b: dict) -> set[str]:
    """Tensors whose bytes differ (or that only one side has); a dtype change is not counted here."""
    ta, tb = a.get("tensors") or {}, b.get("tensors") or {}
    return {n for n in set(ta) | set(tb) if ta.get(n) != tb.get(n) and n not in _recast(a, b)}


def _recast(a: dict, b: dict) -> set[str]:
    """Tensors stored in another dtype on each side (a bf16 copy of an fp32 base): bytes cannot tell."""
    ta, tb = a.get("tensors") or {}, b.get("tensors") or {}
    return {n for n in set(ta) & set(tb) if ta[n].split(":")[0] != tb[n].split(":")[0]}


def _same_model(given: _Given, folder: Path, node: dict, replaced: set[str]) -> bool | None:
    """True/False whether `folder` holds the model `node` records; None when it cannot be told.
    Tensors that the adapter replaces in full (modules_to_save) may differ."""
    recorded = node.get("fingerprint")
    if recorded is None and node.get("path") and Path(node["path"]).exists():
        recorded = given.print_of(Path(node["path"]))
    mine = given.print_of(folder)
    if recorded and mine:
        if recorded["digest"] == mine["digest"]:
            return True
        if _differing(recorded, mine) - replaced:
            return False
        return None if _recast(recorded, mine) - replaced else True
    if node.get("path") and Path(node["path"]).exists() and Path(node["path"]).resolve() == folder.resolve():
        return True
    return None


def _same_adapter(given: _Given, folder: Path, node: dict) -> bool | None:
    recorded, mine = node.get("fingerprint"), given.print_of(folder)
    if recorded and mine:
        return recorded["digest"] == mine["digest"]
    if node.get("path"):
        return Path(node["path"]).resolve() == folder.resolve()
    return None


def _match(given: _Given, index: int, writing: Writing, replaced: set[str]) -> bool | None:
    before = given.adapters[:index]
    if len(before) != len(writing.adapters):
        return False
    verdicts = [_same_model(given, given.base, writing.base, replaced)]
    verdicts += [_same_adapter(given, a, n) for a, n in zip(before, writing.adapters)]
    if False in verdicts:
        return False
    return None if None in verdicts else True


def _show(path: str | Path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _describe(node: dict) -> str:
    what = _show(node["path"])
    if node.get("kind") == "adapter":
        on = node.get("on")
        return f"adapter run {what} (on {_describe(on)})" if on else f"adapter run {what}"
    made = node.get("made_from")
    if made and made.get("base"):
        parts = ", ".join(_show(a["path"]) for a in made.get("adapters", []))
        what += f" ({parts or 'nothing'} merged into {_describe(made['base'])})"
    digest = (node.get("fingerprint") or {}).get("digest")
    return f"{what}, fingerprint {digest}" if digest and not made else what


def _suggest(writing: Writing, adapter: Path) -> str:
    chain = ",".join([*(_show(a["path"]) for a in writing.adapters), _show(adapter)])
    return f"--base {_show(writing.base['path'])} --adapter {chain}"


def _passed(given: _Given) -> str:
    return f"--base {_show(given.base)} --adapter {','.join(_show(a) for a in given.adapters) or '(none)'}"


def check_chain(base_dir: Path, adapter_dirs: list[Path], adapters: list | None = None, force: bool = False) -> None:
    """Refuse a chain that is not the one the adapters were trained on (see the module text).

    `adapters` are the already-read `weights.Adapter`s, for the tensors each replaces in full."""
    given = _Given(base_dir, adapter_dirs)
    for index, adapter_dir in enumerate(given.adapters):
        node = trained_on(adapter_dir)
        if node is None:
            if (adapter_dir / "adapter_config.json").exists():
                note(f"{_show(adapter_dir)} records no base model (no {TRAINED_ON}, no base_model_name_or_path): "
                     "its place in the chain is taken on trust")
            continue
        replaced = set(adapters[index].full) if adapters else set()
        touched = set(replaced)
        for earlier in (adapters or [])[:index]:
            touched |= set(earlier.lora) | set(earlier.full)
        found = writings(node)
        verdicts = [_match(given, index, w, replaced) for w in found]
        if True in verdicts:
            continue
        why = _unknown(given, index, node, found, verdicts, touched)
        if why:
            note(why)
            continue
        _refuse(given, index, adapter_dir, node, found, force)


def _unknown(given: _Given, index: int, node: dict, found: list[Writing], verdicts: list, touched: set[str]) -> str:
    """Why the chain cannot be judged (a note), or "" when it is wrong."""
    adapter = _show(given.adapters[index])
    if None in verdicts:
        local = node.get("fingerprint") or (node.get("path") and Path(node["path"]).exists())
        why = "stored in another dtype than what you passed, so bytes cannot tell" if local else \
            "not on this machine to compare"
        return f"{adapter} was trained on {_describe(node)}, {why}: {_passed(given)} is taken on trust"
    if not node.get("loraforge") and index > 0:
        # peft keeps the original base's name after earlier adapters were merged in memory
        return (f"{adapter} names {_show(node['path'])} as its base (peft's base_model_name_or_path), which cannot "
                f"say whether earlier adapters were merged into it: its place after "
                f"{','.join(_show(a) for a in given.adapters[:index])} is taken on trust")
    terminal = [w for w in found if not w.adapters and w.base.get("kind") == "model" and not w.base.get("made_from")]
    if index > 0 and terminal:
        # a base made by a tool that left no record (another merger, `vocab resize`): it may be
        # the given base with the earlier adapters merged — if every tensor they leave alone is the same
        recorded, mine = terminal[0].base.get("fingerprint"), given.print_of(given.base)
        differing = _differing(recorded, mine) if recorded and mine else set()
        # the given base itself (nothing differs): the adapters before this one are extra
        if differing and not (differing - touched):
            return (f"{adapter} was trained on {_show(terminal[0].base['path'])}, which records no merge; every "
                    f"tensor the adapters before it leave alone equals {_show(given.base)}'s, so it is taken as "
                    f"{_show(given.base)} + {','.join(_show(a) for a in given.adapters[:index])}")
    return ""


def _refuse(given: _Given, index: int, adapter_dir: Path, node: dict, found: list[Writing], force: bool) -> None:
    adapter = _show(adapter_dir)
    # the suggestion keeps the user's base when some record allows it
    same_base = [w for w in found if _same_model(given, given.base, w.base, set())]
    best = (same_base or found)[0] if found else None
    if best is None:
        problem = "its records name no model"
    elif len(best.adapters) > index:
        missing = [_show(a["path"]) for a in best.adapters[index:]] if same_base else []
        problem = (f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing before it" if missing
                   else "that is another base")
    elif len(best.adapters) < index and same_base:
        extra = [_show(a) for a in given.adapters[len(best.adapters):index]]
        problem = f"{', '.join(extra)} {'does' if len(extra) == 1 else 'do'} not belong before it"
    else:
        problem = "the base or the adapters before it are not those"
    ordered = same_base + [w for w in found if w not in same_base]
    fix = " or ".join(_suggest(w, adapter_dir) for w in ordered[:2])
    message = (f"{adapter} was trained on {_describe(node)}; you passed {_passed(given)} — {problem}. "
               f"Pass {fix}, or --force if you know better")
    if force:
        note(f"--force given, going on: {message}")
        return
    raise LoraforgeError(message)
