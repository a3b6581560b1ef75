"""Content-addressed blob storage behind one small interface, `BlobStore`: a blob is named by its sha256 and
never changes. `LocalStore` (the default) keeps data_dir/blobs/ab/abcdef...; `S3Store` (zoedge/server/s3store.py)
keeps them in an S3-compatible bucket. `make_store(settings)` picks one by ZOEDGE_BLOB_STORE.

Uploads land in a local scratch directory first (`temp_file`, `temp_dir`), are checked, and `put_file` then
verifies the sha256 and stores them: a stored blob either does not exist or holds exactly its content.
`path(sha)` is a local file with the blob's content, for code that reads blobs with file APIs (safetensors,
tar): the stored file itself for LocalStore, a verified cached copy for S3Store."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol

from zoedge.errors import ZoedgeError
from zoedge.fsio import fsync_dir
from zoedge.manifest import sha256_file

SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


def check_sha(sha256: str) -> str:
    if not isinstance(sha256, str) or not SHA256.match(sha256):
        raise ValueError(f"not a sha256: {sha256!r}")
    return sha256


def check_file(src: Path, sha256: str) -> None:
    if sha256_file(src) != check_sha(sha256):
        raise ZoedgeError(f"blob store: {Path(src).name} does not match sha256 {sha256[:12]}")


class BlobStore(Protocol):
    def temp_file(self, suffix: str = "") -> contextlib.AbstractContextManager[Path]: ...
    def temp_dir(self) -> contextlib.AbstractContextManager[Path]: ...
    def exists(self, sha256: str) -> bool: ...
    def put_file(self, src: Path, sha256: str) -> None: ...  # src is consumed; ZoedgeError if it is not sha256
    def put_copy(self, src: Path) -> str: ...  # src is kept; returns its sha256
    def open(self, sha256: str) -> BinaryIO: ...
    def stream(self, sha256: str, chunk: int = CHUNK) -> Iterator[bytes]: ...
    def size(self, sha256: str) -> int: ...
    def path(self, sha256: str) -> Path: ...
    def delete(self, sha256: str) -> None: ...


class Scratch:
    """Temp files and directories in a local scratch directory (the upload's file system), and put_copy."""

    def __init__(self, tmp_dir: Path):
        self.tmp_dir = Path(tmp_dir)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def temp_file(self, suffix: str = "") -> Iterator[Path]:
        """A fresh path in the scratch directory, removed on exit unless it was moved into the store."""
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

    def put_file(self, src: Path, sha256: str) -> None:
        raise NotImplementedError

    def exists(self, sha256: str) -> bool:
        raise NotImplementedError

    def put_copy(self, src: Path) -> str:
        """Copy src into the store; return its sha256."""
        sha = sha256_file(src)
        if not self.exists(sha):
            with self.temp_file() as tmp:
                shutil.copyfile(src, tmp)
                self.put_file(tmp, sha)
        return sha

    def stream(self, sha256: str, chunk: int = CHUNK) -> Iterator[bytes]:
        with self.open(sha256) as f:
            while block := f.read(chunk):
                yield block

    def open(self, sha256: str) -> BinaryIO:
        raise NotImplementedError


class LocalStore(Scratch):
    """Blobs as files root/ab/abcdef...; scratch in root/tmp (same file system, so storing is a rename)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        super().__init__(self.root / "tmp")

    def path(self, sha256: str) -> Path:
        check_sha(sha256)
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_file(self, src: Path, sha256: str) -> None:
        """Move src into the store after checking its sha256 (fsynced, then renamed into place)."""
        dest = self.path(sha256)
        check_file(src, sha256)
        if dest.is_file():
            Path(src).unlink(missing_ok=True)
            return
        with open(src, "rb") as f:
            os.fsync(f.fileno())
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)
        fsync_dir(dest.parent)

    def open(self, sha256: str) -> BinaryIO:
        return open(self.path(sha256), "rb")

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)


def make_store(settings) -> BlobStore:
    """ZOEDGE_BLOB_STORE: `local` (data_dir/blobs) or `s3` (ZOEDGE_S3_BUCKET, ZOEDGE_S3_ENDPOINT_URL, ...)."""
    kind = settings.blob_store.lower()
    if kind == "local":
        return LocalStore(settings.data_dir / "blobs")
    if kind == "s3":
        from zoedge.server.s3store import S3Store

        return S3Store.from_settings(settings)
    raise ZoedgeError(f"ZOEDGE_BLOB_STORE={settings.blob_store!r}: use 'local' or 's3'")


def blob_response(store: BlobStore, sha256: str, media_type: str, filename: str, headers: dict[str, str]):
    """A download of a stored blob: the file itself for LocalStore, streamed from the store otherwise."""
    from fastapi.responses import FileResponse, StreamingResponse

    if isinstance(store, LocalStore):
        return FileResponse(store.path(sha256), media_type=media_type, filename=filename, headers=headers)
    headers = {**headers, "Content-Length": str(store.size(sha256)),
               "Content-Disposition": f'attachment; filename="{filename}"'}
    return StreamingResponse(store.stream(sha256), media_type=media_type, headers=headers)
