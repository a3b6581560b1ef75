"""Archives of bundle and patch directories: deterministic tar on the way out, checked extraction on the way in.

`pack` writes an uncompressed tar whose bytes depend only on the files' names and contents (sorted
names, mtime 0, uid/gid 0, mode 0644), so packing the same patch twice gives the same sha256 and an
upload is idempotent. `unpack` accepts tar (any compression) or zip, refuses links, devices, absolute
paths and `..`, optionally a fixed set of names, and a total size limit; one top-level directory
(`tar czf b.tgz bundle/`) is stripped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterable, Iterator

from zoedge.errors import ZoedgeError
from zoedge.manifest import sha256_file


def pack(src_dir: str | Path, out_file: str | Path, names: Iterable[str] | None = None) -> tuple[str, int]:
    """Write `names` (default: every file under src_dir, recursively) to a tar; return (sha256, bytes)."""
    src_dir = Path(src_dir)
    if names is None:
        names = [p.relative_to(src_dir).as_posix() for p in src_dir.rglob("*") if p.is_file()]
    out_file = Path(out_file)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_file.name}.", dir=out_file.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name in sorted(set(names)):
                    path = src_dir / name
                    info = tarfile.TarInfo(name)
                    info.size = path.stat().st_size
                    info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
                    with open(path, "rb") as data:
                        tar.addfile(info, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sha256_file(out_file), out_file.stat().st_size


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unpack(archive: str | Path, dest: str | Path, allowed: Iterable[str] | None = None,
           max_bytes: int = 1 << 40) -> list[str]:
    """Extract a tar or zip into the directory dest; return the relative file names written."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    allowed_set = set(allowed) if allowed is not None else None
    with _open_members(archive) as members:
        files = [(name, size, opener) for name, size, opener in members if opener is not None]
        tops = {name.split("/", 1)[0] for name, _, _ in files}
        strip = len(tops) == 1 and all("/" in name for name, _, _ in files)
        total = 0
        written: list[str] = []
        for name, size, opener in files:
            if strip:
                name = name.split("/", 1)[1]
            if allowed_set is not None and name not in allowed_set:
                raise ZoedgeError(f"archive: unexpected file {name!r} "
                                  f"(expected only {', '.join(sorted(allowed_set))})")
            if name in written:
                raise ZoedgeError(f"archive: {name!r} appears twice")
            total += size
            if total > max_bytes:
                raise ZoedgeError(f"archive: unpacks to more than {max_bytes} bytes")
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with opener() as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as e:
                raise ZoedgeError(f"archive: {name!r} is corrupt ({str(e)[:80]})") from None
            if target.stat().st_size != size:
                raise ZoedgeError(f"archive: {name!r} is truncated")
            written.append(name)
    if not written:
        raise ZoedgeError("archive: contains no files")
    return written


@contextlib.contextmanager
def _open_members(archive: Path) -> Iterator[list[tuple[str, int, Callable[[], BinaryIO] | None]]]:
    """(name, declared size, opener) for every entry, openers None for directories. Unsafe entries raise."""
    if zipfile.is_zipfile(archive):
        try:
            with zipfile.ZipFile(archive) as z:
                out = []
                for info in z.infolist():
                    name = _safe_name(info.filename)
                    if info.is_dir() or not name:
                        out.append((name, 0, None))
                        continue
                    if (info.external_attr >> 16) & 0o170000 not in (0, 0o100000):
                        raise ZoedgeError(f"archive: {info.filename!r} is not a regular file")
                    out.append((name, info.file_size, lambda i=info: z.open(i)))
                yield out
        except (zipfile.BadZipFile, OSError) as e:
            raise ZoedgeError(f"archive: corrupt zip ({str(e)[:80]})") from None
        return
    try:
        tar = tarfile.open(archive, mode="r:*")
        infos = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ZoedgeError(f"archive: not a readable tar or zip file ({str(e)[:80]})") from None
    with tar:
        out = []
        for info in infos:
            name = _safe_name(info.name)
            if info.isdir() or not name:
                out.append((name, 0, None))
                continue
            if not info.isreg():
                raise ZoedgeError(f"archive: {info.name!r} is not a regular file (links are refused)")
            out.append((name, info.size, lambda i=info: tar.extractfile(i)))
        yield out


def _safe_name(name: str) -> str:
    p = PurePosixPath(name.replace("\\", "/"))
    parts = [x for x in p.parts if x not in ("", ".")]
    if p.is_absolute() or ".." in parts:
        raise ZoedgeError(f"archive: unsafe path {name!r}")
    return "/".join(parts)
