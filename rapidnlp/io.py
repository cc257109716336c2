"""Writing a file atomically: under a temporary name next to it, fsynced, then renamed into place.

A reader (or a resumed run) sees the old file or the complete new one, never a half-written one,
and a write that fails removes its temporary file.  Every single-file write that must not be seen
half done goes through here, and `atomic_folder` does the same for a folder built whole (a
knowledge folder). Checkpoints, finished across ranks and saves, rename theirs in checkpoint.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import IO, Iterator


def temp_name(path: str, suffix: str = "") -> str:
    """A temporary name next to PATH, unique per process and per call (two writers never meet)."""
    return f"{os.fspath(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a temporary name for PATH for the caller (or a library) to write; when the block
    ends normally that file is fsynced and renamed onto PATH, when it raises it is removed.

    The parent folder is created.  `suffix` ends the temporary name, for writers that insist on
    an extension (e.g. a library that takes a prefix and appends ".model").
    """
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """`open(PATH, mode)` for writing, made atomic: the file is PATH only once the block succeeds."""
    if "w" not in mode:
        raise ValueError(f"atomic_open writes a whole new file; mode {mode!r} has no 'w'")
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def atomic_write(path: str, data: str | bytes) -> None:
    """Replace PATH's content with DATA (str is written as UTF-8), atomically."""
    if isinstance(data, str):
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write(data)
    else:
        with atomic_open(path, "wb") as f:
            f.write(data)


def write_json_atomic(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """Yield a temporary name for the folder PATH (not yet created); when the block ends normally
    it replaces PATH (an older PATH is removed), when it raises it is removed."""
    tmp = temp_name(path)
    try:
        yield tmp
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
