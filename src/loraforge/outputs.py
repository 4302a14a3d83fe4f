"""Outputs appear whole or not at all.

Every file or folder loraforge writes is built under a temporary name beside its final
path (same filesystem, so the rename is atomic) and renamed only when complete; on any
error, Ctrl-C included, the temporary is removed and nothing is left at the output path.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loraforge.errors import LoraforgeError


def partial_name(path: Path) -> Path:
    """The temporary sibling of `path`: hidden, and per process so two runs never share one."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


@contextmanager
def new_file(path: Path) -> Iterator[Path]:
    """Yields a temporary path to write; it becomes `path` when the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(path)
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> Path:
    with new_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def check_new_dir(out_dir: Path) -> None:
    """Refuse before any work: an output folder is never merged into or overwritten."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LoraforgeError(f"{out_dir} already exists and is not empty: choose a new -o (nothing was written)")


@contextmanager
def new_dir(out_dir: Path) -> Iterator[Path]:
    """Yields a temporary folder to fill; it becomes `out_dir` (new or empty) when the block completes."""
    out_dir = Path(out_dir)
    check_new_dir(out_dir)
    tmp = partial_name(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
