"""Content-addressed files on disk: data_dir/blobs/ab/abcdef... named by their sha256.

Files arrive in data_dir/blobs/tmp (same file system), are fsynced, checked against their sha256 and
renamed into place, so a blob path either does not exist or holds exactly its content.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from zoedge.fsio import fsync_dir
from zoedge.errors import ZoedgeError
from zoedge.manifest import sha256_file

SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not SHA256.match(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    @contextlib.contextmanager
    def temp_file(self, suffix: str = "") -> Iterator[Path]:
        """A fresh path in the blob file system, removed on exit unless it was moved into the store."""
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, suffix=suffix)
        os.close(fd)
        try:
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)

    @contextlib.contextmanager
    def temp_dir(self) -> Iterator[Path]:
        d = Path(tempfile.mkdtemp(dir=self.tmp_dir))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def put_file(self, src: Path, sha256: str) -> Path:
        """Move src into the store after checking its sha256 (src is consumed)."""
        dest = self.path(sha256)
        if sha256_file(src) != sha256:
            raise ZoedgeError(f"blob store: {src.name} does not match sha256 {sha256[:12]}")
        if dest.is_file():
            src.unlink(missing_ok=True)
            return dest
        with open(src, "rb") as f:
            os.fsync(f.fileno())
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)
        fsync_dir(dest.parent)
        return dest

    def put_copy(self, src: Path) -> str:
        """Copy src into the store; return its sha256."""
        sha = sha256_file(src)
        if not self.has(sha):
            with self.temp_file() as tmp:
                shutil.copyfile(src, tmp)
                self.put_file(tmp, sha)
        return sha

