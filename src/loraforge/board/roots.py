"""What the board may see: the folders under its roots, and nothing else.

Every path a page names goes through `Roots.resolve`. The path is made absolute, symlinks are
resolved, and it must then lie inside one of the roots, so `..`, an absolute `/etc/passwd` and
a symlink pointing outside are all refused (`Outside`). What the pages list comes from scanning
the roots: model folders (config.json plus weights), data folders (dataset_info.json) and run
directories (loraforge.yaml or a board job file). They are found on disk each time, so a page
reload or a restart of the board sees the same things.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

SKIP_DIRS = {".git", "__pycache__", "node_modules", ".venv", "venv"}
MAX_DEPTH = 4  # model, data and run folders deeper than this under a root are not listed
WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "consolidated.*.pth")


class Outside(Exception):
    """A path outside every root (HTTP 403)."""


@dataclass(frozen=True)
class Roots:
    paths: tuple[Path, ...]

    @classmethod
    def of(cls, folders: list[str | Path]) -> Roots:
        return cls(tuple(Path(f).expanduser().resolve() for f in folders))

    def resolve(self, path: str | Path) -> Path:
        """`path` (absolute, or relative to the first root) with symlinks resolved, if it is under a root."""
        raw = Path(path).expanduser()
        full = (raw if raw.is_absolute() else self.paths[0] / raw).resolve()
        if not any(full == root or root in full.parents for root in self.paths):
            raise Outside(f"{path} is outside the board's roots ({', '.join(map(str, self.paths))})")
        return full

    def shown(self, path: Path) -> str:
        """How a page names a path: relative to its root when there is one root."""
        for root in self.paths:
            if path == root or root in path.parents:
                return str(path.relative_to(root)) if len(self.paths) == 1 else str(path)
        return str(path)

    def shorten(self, text: str) -> str:
        """`shown` for every absolute path under the roots inside a text (a command, a log line)."""
        for root in self.paths:
            text = text.replace(str(root) + "/", "" if len(self.paths) == 1 else str(root) + "/")
        return text

    def walk(self):
        """Every folder under the roots, at most MAX_DEPTH down, without following symlinks out."""
        for root in self.paths:
            base = len(root.parts)
            for folder, dirs, _ in os.walk(root):
                here = Path(folder)
                dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")
                                 and len(here.parts) - base < MAX_DEPTH)
                yield here


def model_info(folder: Path) -> dict | None:
    """A model folder's size and architecture, or None when it is not one."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    weights = [p for pattern in WEIGHTS for p in folder.glob(pattern)]
    if not weights:
        return None
    try:
        spec = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {"architecture": (spec.get("architectures") or [spec.get("model_type", "?")])[0],
            "model_type": spec.get("model_type"), "hidden_size": spec.get("hidden_size"),
            "layers": spec.get("num_hidden_layers"), "vocab_size": spec.get("vocab_size"),
            "bytes": sum(p.stat().st_size for p in weights)}


def data_folder_info(folder: Path) -> list[str] | None:
    """The dataset names in a folder's dataset_info.json, or None when it has none."""
    info = folder / "dataset_info.json"
    if not info.is_file():
        return None
    try:
        entries = json.loads(info.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return []
    return [name for name, entry in entries.items() if isinstance(entry, dict)] if isinstance(entries, dict) else []


def is_run_dir(folder: Path) -> bool:
    return (folder / "loraforge.yaml").is_file() or (folder / "board.json").is_file()
