"""Dataset names → files, through a LLaMA-Factory `dataset_info.json`.

A LLaMA-Factory data folder works unchanged: each entry names a `file_name` in the
folder (a file, or a folder of files), its `formatting` (alpaca unless said otherwise),
and optional `columns` and `tags`. A dataset may also be given as a plain file path, in
which case its format is detected from its first record.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loraforge.data.formats import COLUMN_DEFAULTS, FORMATTINGS, SUPPORTED_SUFFIXES, load_records
from loraforge.data.records import LoadReport
from loraforge.errors import LoraforgeError
from loraforge.textfiles import read_text

DATASET_INFO = "dataset_info.json"
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url")
SHOWN_NAMES = 20
# LLaMA-Factory column roles for data loraforge cannot train on yet: refusing is kinder
# than training on the text alone and silently dropping the images or preferences.
UNSUPPORTED_COLUMNS = {"images": "image", "videos": "video", "audios": "audio",
                       "chosen": "preference", "rejected": "preference", "kto_tag": "preference"}
# "tools" is read past: a record that calls a tool is rejected on its own
KNOWN_COLUMNS = ("prompt", "query", "response", "history", "messages", "system", "tools")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset to load: where it is and how its fields are named."""

    name: str  # as the user wrote it: a dataset_info.json key or a file path
    path: Path  # a data file, or a folder whose data files are read in sorted order
    formatting: str = "auto"  # alpaca, sharegpt, openai, text, or auto (from the first record)
    columns: dict | None = None  # LLaMA-Factory "columns": role → field name
    tags: dict | None = None  # LLaMA-Factory "tags": message keys and role names


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
    if entry.get("ranking"):
        raise LoraforgeError(f"{where} is preference data (ranking: true): loraforge trains stage pt "
                             "and sft only — pick an instruction or text dataset")
    formatting = entry.get("formatting", "alpaca")  # LLaMA-Factory's default
    if formatting not in FORMATTINGS[1:]:
        raise LoraforgeError(f"{where}: unknown formatting '{formatting}' — "
                             "use alpaca, sharegpt, openai or text")
    for key in ("columns", "tags"):
        if entry.get(key) is not None and not isinstance(entry[key], dict):
            raise LoraforgeError(f"{where}: {key} must be an object, got {entry[key]!r:.40}")
    columns = _entry_columns(where, formatting, entry.get("columns"))
    return DatasetSpec(name=name, path=Path(data_dir) / file_name, formatting=formatting,
                       columns=columns, tags=entry.get("tags"))


def _entry_columns(where: str, formatting: str, columns: dict | None) -> dict | None:
    """An entry's columns as a full role → field mapping, following LLaMA-Factory's rules."""
    if columns is None:
        return None
    for role in columns:
        if role in UNSUPPORTED_COLUMNS:
            raise LoraforgeError(f"{where}: {UNSUPPORTED_COLUMNS[role]} data (column '{role}') is not "
                                 "supported yet — loraforge trains on text (stage pt or sft)")
        if role not in KNOWN_COLUMNS:
            raise LoraforgeError(f"{where}: unknown column role '{role}' — known roles are "
                                 f"{', '.join(KNOWN_COLUMNS)}")
    # LLaMA-Factory: once "columns" is given, the roles it leaves out are absent (c4_demo names
    # only "prompt", so it has no response) — except the one field a format cannot do without.
    defaults = COLUMN_DEFAULTS[formatting]
    resolved = {role: columns.get(role) for role in defaults}
    main = "messages" if "messages" in defaults else "prompt"
    resolved[main] = resolved[main] or defaults[main]
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

    Entries that name no local file (hub datasets) or hold preference data are left out
    here; `resolve_datasets` explains them when one is asked for.
    """
    specs = {}
    for name, entry in _read_entries(data_dir).items():
        try:
            specs[name] = _spec_from_entry(data_dir, name, entry)
        except LoraforgeError:
            continue
    return specs


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
            spec = DatasetSpec(name=name, path=path)
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


def load_datasets(specs: list[DatasetSpec], *, stage: Literal["pt", "sft"],
                  skip_invalid: bool) -> list[LoadReport]:
    """Load every dataset; one report per spec, in order (a folder's files merged into one)."""
    reports = []
    for spec in specs:
        parts = [load_records(file, formatting=spec.formatting, columns=spec.columns, tags=spec.tags,
                              stage=stage, skip_invalid=skip_invalid, name=spec.name)
                 for file in dataset_files(spec.path)]
        formats = list(dict.fromkeys(part.format for part in parts))
        reports.append(LoadReport(name=spec.name, format="+".join(formats),
                                  records=[record for part in parts for record in part.records],
                                  problems=[problem for part in parts for problem in part.problems]))
    return reports
