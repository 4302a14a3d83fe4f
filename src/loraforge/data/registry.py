"""Dataset names → files, through a LLaMA-Factory `dataset_info.json`.

A LLaMA-Factory data folder works unchanged: each entry names a `file_name` in the
folder (a file, or a folder of files), its `formatting` (alpaca unless said otherwise),
and optional `columns` and `tags`; `ranking: true` and the `chosen`/`rejected`/`kto_tag`
columns make it preference data (data/preference.py). A dataset may also be given as a
plain file path, in which case its format — and whether it is preference data — is
detected from its first record, as if an entry had said so.

`num_samples`, `split` and `subset` keep LLaMA-Factory's meaning: `num_samples` draws
that many records at random (all of them once, then repeats, when it is larger than the
dataset; seeded by train.seed); `split` is `train` — the one split datasets gives a local
file — optionally sliced (`train[:100]`, `train[10%:50%]`); `subset` picks the sub-folder
or file of that name in a folder dataset (on the hub it names a configuration).
"""

from __future__ import annotations

import difflib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loraforge.data.formats import COLUMN_DEFAULTS, FORMATTINGS, SUPPORTED_SUFFIXES, load_records
from loraforge.data.preference import check_stage, detect_kind, load_preference_records
from loraforge.data.records import LoadReport
from loraforge.data.rows import BadRow, read_rows
from loraforge.errors import LoraforgeError
from loraforge.textfiles import read_text

DATASET_INFO = "dataset_info.json"
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url")
SHOWN_NAMES = 20
# LLaMA-Factory column roles for data loraforge cannot train on: refusing is kinder than
# training on the text alone, with its literal <image> tags, and silently dropping the media.
UNSUPPORTED_COLUMNS = {"images": "image", "videos": "video", "audios": "audio"}
MULTIMODAL_WHY = ("loraforge trains text-only LLaMA-family models: the media would be dropped and their "
                  "<image>/<video>/<audio> tags trained as literal text — remove the column and the tags to "
                  "train on the text, or use LLaMA-Factory for a vision/audio model")
# "tools" is read past: a record that calls a tool is rejected on its own
PREFERENCE_COLUMNS = ("chosen", "rejected", "kto_tag", "score")  # "score" is ours: reward-scored answers
ENTRY_DEFAULT_ROLES = ("prompt", "query", "response", "messages")  # LLaMA-Factory's DatasetAttr defaults
KNOWN_COLUMNS = ("prompt", "query", "response", "history", "messages", "system", "tools", *PREFERENCE_COLUMNS)
_SPLIT = re.compile(r"train(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset to load: where it is and how its fields are named."""

    name: str  # as the user wrote it: a dataset_info.json key or a file path
    path: Path  # a data file, or a folder whose data files are read in sorted order
    formatting: str = "auto"  # alpaca, sharegpt, openai, text, or auto (from the first record)
    columns: dict | None = None  # LLaMA-Factory "columns": role → field name
    tags: dict | None = None  # LLaMA-Factory "tags": message keys and role names
    kind: str = "plain"  # plain, or preference data: ranking (chosen/rejected), kto (kto_tag), scored
    num_samples: int | None = None  # LLaMA-Factory: draw this many records at random
    split: str | None = None  # LLaMA-Factory: "train", optionally sliced ("train[:100]")
    subset: str | None = None  # LLaMA-Factory: a part of a folder dataset


def _read_entries(data_dir: Path) -> dict[str, dict]:
    info = Path(data_dir) / DATASET_INFO
    if not info.is_file():
        raise LoraforgeError(f"{info} not found: data.dir must be a folder with a {DATASET_INFO} "
                             "(LLaMA-Factory's layout), or give data.datasets as file paths")
    try:
        entries = json.loads(read_text(info))
    except json.JSONDecodeError as error:
        raise LoraforgeError(
            f"{info}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(entries, dict):
        raise LoraforgeError(f"{info}: expected an object of dataset entries, "
                             '{"name": {"file_name": "data.json", ...}, ...}')
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise LoraforgeError(f"{info}: entry '{name}' must be an object like {{\"file_name\": \"data.json\"}}, "
                                 f"got {entry!r:.40}")
        _check_nesting(info, name, entry)
    return entries


def _check_nesting(info: Path, name: str, entry: dict) -> None:
    """Users paste one dataset_info.json into another as a key ("dataset_info.json": {...});
    without this its datasets are silently missing, and asking for one says 'download it'."""
    if "file_name" in entry or any(key in entry for key in HUB_KEYS) or not entry:
        return
    inner = [key for key, value in entry.items()
             if isinstance(value, dict) and ("file_name" in value or any(k in value for k in HUB_KEYS))]
    if inner:
        shown = ", ".join(f"'{key}'" for key in inner[:5])
        raise LoraforgeError(f"{info}: entry '{name}' holds dataset entries ({shown}) one level too deep — "
                             f"move them to the top level of the file and delete '{name}'")


def _spec_from_entry(data_dir: Path, name: str, entry: dict) -> DatasetSpec:
    """The spec for one entry, or an error saying why loraforge cannot load it."""
    where = f"dataset '{name}' in {Path(data_dir) / DATASET_INFO}"
    if "file_name" not in entry:
        hub = next((f"{key} '{entry[key]}'" for key in HUB_KEYS if key in entry), "no file_name")
        raise LoraforgeError(f"{where} has {hub}: loraforge does not download datasets — download it "
                             f"into {data_dir} and point the entry's file_name at it")
    file_name = entry["file_name"]
    if not isinstance(file_name, str) or not file_name.strip():
        raise LoraforgeError(f"{where}: file_name must be a file or folder name as a string, got "
                             f"{file_name!r:.40} — write it as \"file_name\": \"data.json\"")
    formatting = entry.get("formatting", "alpaca")  # LLaMA-Factory's default
    if formatting not in FORMATTINGS[1:]:
        raise LoraforgeError(f"{where}: unknown formatting '{formatting}' — "
                             "use alpaca, sharegpt, openai or text")
    for key in ("columns", "tags"):
        if entry.get(key) is not None and not isinstance(entry[key], dict):
            raise LoraforgeError(f"{where}: {key} must be an object, got {entry[key]!r:.40}")
    columns = _entry_columns(where, formatting, entry.get("columns"))
    kind = _entry_kind(where, entry, columns or {})
    if columns is None and kind == "plain":
        # LLaMA-Factory's defaults for an entry without "columns": the main fields only; a
        # record's history, system or tools field is read when the entry maps it
        columns = {role: name if role in ENTRY_DEFAULT_ROLES else None
                   for role, name in COLUMN_DEFAULTS[formatting].items()}
    num_samples, split, subset = _sampling(where, entry)
    return DatasetSpec(name=name, path=Path(data_dir) / file_name, formatting=formatting,
                       columns=columns, tags=entry.get("tags"), kind=kind,
                       num_samples=num_samples, split=split, subset=subset)


def _entry_kind(where: str, entry: dict, columns: dict) -> str:
    """LLaMA-Factory's rule: `ranking: true` is pairwise data; a kto_tag column makes KTO data."""
    if entry.get("ranking"):
        if columns.get("kto_tag"):
            raise LoraforgeError(f"{where} has ranking: true and a kto_tag column — a dataset is either pairs "
                                 "(ranking, chosen/rejected) or KTO feedback (kto_tag): drop one")
        return "ranking"
    if columns.get("kto_tag"):
        return "kto"
    if columns.get("score"):
        return "scored"
    if columns.get("chosen") or columns.get("rejected"):
        raise LoraforgeError(f"{where} names chosen/rejected columns (preference data) but not \"ranking\": true — add it to the "
                             "entry, as LLaMA-Factory needs too")
    return "plain"


def _sampling(where: str, entry: dict) -> tuple[int | None, str | None, str | None]:
    num_samples, split, subset = entry.get("num_samples"), entry.get("split"), entry.get("subset")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise LoraforgeError(f"{where}: num_samples must be a whole number ≥ 1, got {num_samples!r:.40}")
    if split is not None and (not isinstance(split, str) or not _SPLIT.fullmatch(split.strip())):
        raise LoraforgeError(
            f"{where}: split {split!r:.40} — a local file has one split, 'train' (datasets names a local "
            "file's rows so, and LLaMA-Factory loads it with datasets): use \"train\", or a slice of it such "
            "as \"train[:1000]\" or \"train[90%:]\"; put other splits in their own file and entry")
    if subset is not None and (not isinstance(subset, str) or not subset.strip()):
        raise LoraforgeError(f"{where}: subset must be a name as a string, got {subset!r:.40}")
    return num_samples, split.strip() if split else None, subset


def _entry_columns(where: str, formatting: str, columns: dict | None) -> dict | None:
    """An entry's columns as a full role → field mapping, following LLaMA-Factory's rules."""
    if columns is None:
        return None
    for role in columns:
        if role in UNSUPPORTED_COLUMNS:
            raise LoraforgeError(f"{where}: {UNSUPPORTED_COLUMNS[role]} data (column '{role}') is not supported "
                                 "yet: it is multimodal — " + MULTIMODAL_WHY)
        if role not in KNOWN_COLUMNS:
            raise LoraforgeError(f"{where}: unknown column role '{role}' — known roles are "
                                 f"{', '.join(KNOWN_COLUMNS)}")
    # LLaMA-Factory: once "columns" is given, the roles it leaves out are absent (c4_demo names
    # only "prompt", so it has no response) — except the one field a format cannot do without.
    defaults = COLUMN_DEFAULTS[formatting]
    resolved = {role: columns.get(role) for role in defaults}
    main = "messages" if "messages" in defaults else "prompt"
    resolved[main] = resolved[main] or defaults[main]
    resolved.update({role: columns[role] for role in PREFERENCE_COLUMNS if columns.get(role)})
    return resolved


def dataset_files(path: Path) -> list[Path]:
    """The data files behind a dataset path: the file itself, or a folder's data files, sorted."""
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise LoraforgeError(f"{path}: the folder has no data files ({', '.join(SUPPORTED_SUFFIXES)})")
    return files


def read_dataset_info(data_dir: Path) -> dict[str, DatasetSpec]:
    """The datasets in `data_dir/dataset_info.json` that loraforge can load.

    Entries that name no local file (hub datasets) or hold multimodal data are left out
    here; `resolve_datasets` explains them when one is asked for.
    """
    specs = {}
    for name, entry in _read_entries(data_dir).items():
        try:
            specs[name] = _spec_from_entry(data_dir, name, entry)
        except LoraforgeError:
            continue
    return specs


def _first_row(path: Path) -> tuple[str, dict] | None:
    for file in dataset_files(path):
        if file.suffix.lower() == ".txt":
            return None
        for source, row in read_rows(file):
            if isinstance(row, dict) and not isinstance(row, BadRow):
                return source, row
    return None


def _detect_by_path(name: str, path: Path) -> DatasetSpec:
    """A dataset named by its path is read as if a dataset_info.json entry described it: its first record's
    chosen/rejected, kto_tag/label or reward_score fields make it preference data; media fields are refused."""
    first = _first_row(path) if path.exists() else None
    if first is None:
        return DatasetSpec(name=name, path=path)
    source, row = first
    media = [key for key in UNSUPPORTED_COLUMNS if key in row]
    if media:
        raise LoraforgeError(f"dataset {name}: {source} has '{media[0]}': {UNSUPPORTED_COLUMNS[media[0]]} data is "
                             "not supported yet: it is multimodal — " + MULTIMODAL_WHY)
    kind, columns = detect_kind(row)
    return DatasetSpec(name=name, path=path, kind=kind, columns=columns or None)


def _as_file(data_dir: Path | None, name: str) -> Path | None:
    candidates = [Path(name).expanduser()] + ([Path(data_dir) / name] if data_dir else [])
    return next((path for path in candidates if path.exists()), None)


def _unknown_name(data_dir: Path, name: str, known: list[str]) -> LoraforgeError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" — did you mean '{close[0]}'?" if close else ""
    shown = ", ".join(known[:SHOWN_NAMES])
    shown += f", … ({len(known)} in all)" if len(known) > SHOWN_NAMES else ""
    return LoraforgeError(f"unknown dataset '{name}': it is not a file, and {Path(data_dir) / DATASET_INFO} "
                          f"names {shown or 'no datasets'}{hint}")


def resolve_datasets(data_dir: Path | None, names: list[str]) -> list[DatasetSpec]:
    """Turn dataset names (dataset_info.json keys or file paths) into specs, in order.

    A dataset_info.json entry wins over a file of the same name, as in LLaMA-Factory.
    """
    if not names:
        raise LoraforgeError("no datasets given: set data.datasets to dataset names or file paths")
    has_info = data_dir is not None and (Path(data_dir) / DATASET_INFO).is_file()
    entries = _read_entries(data_dir) if has_info else {}
    specs = []
    for name in names:
        if name in entries:
            spec = _spec_from_entry(data_dir, name, entries[name])
        elif (path := _as_file(data_dir, name)) is not None:
            spec = _detect_by_path(name, path)
        elif has_info:
            raise _unknown_name(data_dir, name, list(entries))
        elif data_dir is not None:
            raise LoraforgeError(f"dataset '{name}' is not a file, and {Path(data_dir) / DATASET_INFO} "
                                 "does not exist to name it — give a file path or add the entry")
        else:
            raise LoraforgeError(f"dataset '{name}' is not a file (looked in {Path.cwd()}) — give a file "
                                 f"path, or set data.dir to a folder with a {DATASET_INFO}")
        if not spec.path.exists():
            raise LoraforgeError(f"dataset '{name}': {spec.path} does not exist — fix file_name in "
                                 f"{Path(data_dir) / DATASET_INFO} or put the file there")
        dataset_files(spec.path)  # a folder with no data files fails here, before any loading
        specs.append(spec)
    return specs


def _load_file(spec: DatasetSpec, file: Path, stage: str, skip_invalid: bool,
               score_threshold: float | None) -> LoadReport:
    if spec.kind == "plain":
        check_stage("plain", stage, spec.name)
        return load_records(file, formatting=spec.formatting, columns=spec.columns, tags=spec.tags,
                            stage=stage, skip_invalid=skip_invalid, name=spec.name)
    return load_preference_records(file, kind=spec.kind, formatting=spec.formatting, columns=spec.columns,
                                   tags=spec.tags, stage=stage, skip_invalid=skip_invalid, name=spec.name,
                                   score_threshold=score_threshold)


def _subset_files(spec: DatasetSpec) -> list[Path]:
    files = dataset_files(spec.path)
    if spec.subset is None:
        return files
    where = f"dataset '{spec.name}': subset '{spec.subset}'"
    if not spec.path.is_dir():
        raise LoraforgeError(f"{where} names a part of a dataset, but file_name is the single file {spec.path} — "
                             "drop subset, or point file_name at the folder that holds the parts")
    if (spec.path / spec.subset).is_dir():
        return dataset_files(spec.path / spec.subset)
    stem = re.compile(rf"(.*[_\-.])?{re.escape(spec.subset)}")
    picked = [file for file in files if stem.fullmatch(file.stem)]
    if not picked:
        raise LoraforgeError(f"{where}: {spec.path} has no sub-folder '{spec.subset}' and no file named "
                             f"'{spec.subset}' or '…_{spec.subset}' among {', '.join(f.name for f in files)}")
    return picked


def _apply_split(spec: DatasetSpec, report: LoadReport) -> None:
    if not spec.split or spec.split == "train":
        return
    start, stop = _SPLIT.fullmatch(spec.split).groups()
    count = len(report.records)

    def index(bound: str | None, default: int) -> int:
        if bound is None:
            return default
        if bound.endswith("%"):  # datasets rounds percent bounds to the closest row
            return round(count * int(bound[:-1]) / 100)
        return int(bound)

    kept = report.records[index(start, 0):index(stop, count)]
    report.notes.append(f"split {spec.split}: {len(kept)} of {count} records")
    report.records = kept


def _apply_num_samples(spec: DatasetSpec, report: LoadReport, seed: int) -> None:
    """LLaMA-Factory's rule: a random permutation cut to num_samples, topped up by random repeats when the
    dataset is smaller — every record is used at least once."""
    if spec.num_samples is None or not report.records:
        return
    rng = random.Random(seed)
    count = len(report.records)
    order = rng.sample(range(count), count)[: spec.num_samples]
    order += [rng.randrange(count) for _ in range(spec.num_samples - len(order))]
    report.notes.append(f"num_samples {spec.num_samples}: drew {spec.num_samples} of {count} records"
                        + (" (some twice)" if spec.num_samples > count else ""))
    report.records = [report.records[i] for i in order]


def load_datasets(specs: list[DatasetSpec], *, stage: Literal["pt", "sft", "dpo", "kto", "rm"],
                  skip_invalid: bool, seed: int = 0, score_threshold: float | None = None) -> list[LoadReport]:
    """Load every dataset; one report per spec, in order (a folder's files merged into one), with the
    entry's subset, split and num_samples applied in that order (max_samples comes after, as in LLaMA-Factory)."""
    reports = []
    for spec in specs:
        parts = [_load_file(spec, file, stage, skip_invalid, score_threshold) for file in _subset_files(spec)]
        formats = list(dict.fromkeys(part.format for part in parts))
        report = LoadReport(name=spec.name, format="+".join(formats),
                            records=[record for part in parts for record in part.records],
                            problems=[problem for part in parts for problem in part.problems],
                            notes=[note for part in parts for note in part.notes])
        _apply_split(spec, report)
        _apply_num_samples(spec, report, seed)
        reports.append(report)
    return reports
