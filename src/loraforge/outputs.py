"""Outputs appear whole or not at all.

Every file or folder loraforge writes is built under a temporary name beside its final
path (same filesystem, so the rename is atomic) and renamed only when complete; on any
error, Ctrl-C included, the temporary is removed and nothing is left at the output path.
A process killed outright (kill -9, power loss) cannot clean up: its temporary stays,
hidden, and the next run writing the same output removes it and says so. A full disk
(or a file-size limit) is an error naming the output, never a half-written file.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loraforge.errors import LoraforgeError


def partial_name(path: Path) -> Path:
    """The temporary sibling of `path`: hidden, and per process so two runs never share one."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


# ENOSPC: the disk is full; EFBIG: a file-size limit (ulimit -f, RLIMIT_FSIZE); EDQUOT: a quota
_NO_SPACE = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(path: Path) -> list[Path]:
    """Remove the temporaries of `path` left by runs that were killed (their process is gone);
    a running process's temporary is left alone. Returns what was removed, and says so."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.partial-(\d+)")
    removed = []
    for candidate in path.parent.glob(f".{path.name}.partial-*") if path.parent.is_dir() else []:
        match = pattern.fullmatch(candidate.name)
        if not match or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        if candidate.is_dir():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
        print(f"removed {candidate}: the unfinished output of an interrupted run (process "
              f"{match.group(1)} is gone)", file=sys.stderr, flush=True)
    return removed


def _no_space(exc: BaseException, path: Path) -> LoraforgeError | None:
    """A clear error for a write that ran out of room; None for any other failure."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        reason = "a file-size limit (ulimit -f)" if exc.errno == errno.EFBIG else "no space left on the device"
    elif isinstance(exc, OSError) and re.search(r"\d+ requested and \d+ written", str(exc)):
        reason = "the disk is full or a file-size limit (ulimit -f) was hit"  # numpy's tofile: a short write
    elif "No space left on device" in str(exc) or "File too large" in str(exc):
        reason = "the disk is full or a file-size limit (ulimit -f) was hit"  # raised by a library's own writer
    else:
        return None
    try:
        free = shutil.disk_usage(path.parent).free
        room = f"; {free / 2**30:.2f} GiB free on {path.parent}"
    except OSError:
        room = ""
    return LoraforgeError(f"writing {path} stopped: {reason}{room} — free space or choose another output "
                          "location (nothing was written)")


@contextmanager
def new_file(path: Path) -> Iterator[Path]:
    """Yields a temporary path to write; it becomes `path` when the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = partial_name(path)
    try:
        yield tmp
        tmp.replace(path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        error = _no_space(exc, path)
        if error is not None:
            raise error from None
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
    remove_stale_partials(out_dir)
    tmp = partial_name(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = _no_space(exc, out_dir)
        if error is not None:
            raise error from None
        raise
