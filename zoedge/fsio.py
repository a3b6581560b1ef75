"""Crash-safe file writes (stdlib only): write a temporary beside the target, fsync, rename, fsync the dir.

A reader therefore sees either the old file or the complete new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode an ordinary new file gets under the current umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode an ordinary new directory gets under the current umask (0755 under umask 022)."""
    return 0o777 & ~_umask()


def mkstemp_in(directory: str | Path, name: str) -> tuple[int, str]:
    """A temporary file `.NAME.xxxx` in `directory`, with ordinary permissions (mkstemp alone gives 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    os.fchmod(fd, file_mode())
    return fd, tmp


def mkdtemp_in(directory: str | Path, name: str) -> Path:
    """A temporary directory `.NAME.xxxx` in `directory` that becomes a result by a rename, with ordinary
    permissions (mkdtemp alone gives 0700, which a renamed bundle or patch directory would keep)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=directory))
    os.chmod(tmp, dir_mode())
    return tmp


def make_ordinary(path: str | Path) -> None:
    """Give a file written by a library that creates files 0600 (safetensors' save_file) the ordinary mode."""
    os.chmod(path, file_mode())


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_atomic(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to stream into; it replaces `path` (fsynced, renamed, directory fsynced) only when the
    block ends without an exception, else the temporary is removed and `path` is untouched."""
    path = Path(path)
    fd, tmp = mkstemp_in(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with open_atomic(path) as f:
        f.write(data)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
