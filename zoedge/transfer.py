"""What travels between a device and the fleet server (standard library only), used by both sides.

* the HTTP header names of an upload / download;
* the upload formats and the patch files each carries:

    adapter     patch.json + adapter_model.safetensors (+ adapter_config.json, start.safetensors if present)
    trajectory  patch.json + trajectory.npy (+ start.safetensors if present): a few KB; the server
                replays it against the bundle to rebuild the adapter
    coefficients  a seed-pool patch (zoedge train --seed-pool K): patch.json + coefficients.npy (+ start.safetensors):
                4 KB for K = 1024 whatever the model; the server rebuilds the adapter from the bundle's seed pool
                (an adapter upload of a seed-pool patch carries its coefficients.npy too)

* archives: `pack` writes a tar whose bytes depend only on the files' names and contents (sorted names, mtime 0,
  uid/gid 0, mode 0644; gzipped with mtime 0 when asked), so packing the same patch twice gives the same sha256
  and an upload is idempotent; a coefficients upload is gzipped (COMPRESSED_FORMATS: a plain tar pads its few KB
  of files to 20 KB); `unpack` accepts tar (any compression) or zip, refuses links, devices, absolute paths and
  `..`, optionally a fixed set of names, and a total size limit; one top-level directory (`tar czf b.tgz bundle/`)
  is stripped;
* the sha256 checks of a patch directory's files against patch.json (`read_patch_doc`, `inspect_patch_dir`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterable, Iterator

from zoedge.errors import ZoedgeError
from zoedge.fsio import open_atomic
from zoedge.manifest import sha256_file
from zoedge.patchdoc import (
    ADAPTER_CONFIG_FILE, ADAPTER_FILE, COEFFICIENTS_FILE, PATCH_FILE, START_FILE, TRAJECTORY_FILE, PatchDoc,
)

SHA256_HEADER = "X-Zoedge-Sha256"  # sha256 of an upload's body / of a downloaded file
FORMAT_HEADER = "X-Zoedge-Format"  # the declared upload format

UPLOAD_FORMATS = ("adapter", "trajectory", "coefficients")
FORMAT_FILES = {
    "adapter": (PATCH_FILE, ADAPTER_FILE, ADAPTER_CONFIG_FILE, START_FILE, COEFFICIENTS_FILE),
    "trajectory": (PATCH_FILE, TRAJECTORY_FILE, START_FILE),
    "coefficients": (PATCH_FILE, COEFFICIENTS_FILE, START_FILE),
}
COMPRESSED_FORMATS = ("coefficients",)  # gzipped uploads: the tar's 10 KiB records would pad 8 KB to 20 KB
REQUIRED_FILES = {"adapter": (PATCH_FILE, ADAPTER_FILE), "trajectory": (PATCH_FILE, TRAJECTORY_FILE),
                  "coefficients": (PATCH_FILE, COEFFICIENTS_FILE)}


# ---- a patch directory's files ----------------------------------------------------------------------------
def read_patch_doc(patch_dir: str | Path, require_all: bool = True) -> PatchDoc:
    """patch.json, after checking every listed file that is present against its sha256. An uploaded patch
    carries only its format's files, so `require_all=False` accepts absent ones."""
    doc = PatchDoc.load(patch_dir)
    for name, digest in doc.files.items():
        f = Path(patch_dir) / name
        if not f.is_file():
            if require_all:
                raise ZoedgeError(f"{patch_dir}: {name} is missing")
            continue
        if sha256_file(f) != digest:
            raise ZoedgeError(f"{patch_dir}: {name} does not match its sha256 in {PATCH_FILE} (corrupt or edited)")
    return doc


def format_files(patch_dir: str | Path, fmt: str) -> list[str]:
    """The files of patch_dir that an upload in format fmt carries (checked to exist)."""
    if fmt not in UPLOAD_FORMATS:
        raise ZoedgeError(f"bad --format {fmt!r}: choose {', '.join(UPLOAD_FORMATS)}")
    patch_dir = Path(patch_dir)
    doc = PatchDoc.load(patch_dir)
    names = [n for n in FORMAT_FILES[fmt] if (patch_dir / n).is_file()]
    for n in REQUIRED_FILES[fmt]:
        if n not in names:
            raise ZoedgeError(f"{patch_dir}: has no {n}, needed for a {fmt} upload")
    if fmt == "adapter" and ADAPTER_CONFIG_FILE in doc.files and ADAPTER_CONFIG_FILE not in names:
        raise ZoedgeError(f"{patch_dir}: has no {ADAPTER_CONFIG_FILE}, which {PATCH_FILE} lists")
    return names


def check_carried_files(patch_dir: str | Path, names: list[str]) -> None:
    """Refuse locally what the server would refuse: never queue a corrupt or edited patch."""
    patch_dir = Path(patch_dir)
    doc = PatchDoc.load(patch_dir)
    for n in names:
        if n == PATCH_FILE:
            continue
        if n not in doc.files:
            raise ZoedgeError(f"{patch_dir}: {n} is not listed in {PATCH_FILE}")
        if sha256_file(patch_dir / n) != doc.files[n]:
            raise ZoedgeError(f"{patch_dir}: {n} does not match its sha256 in {PATCH_FILE} (corrupt or edited)")


def inspect_patch_dir(patch_dir: str | Path) -> tuple[PatchDoc, str]:
    """(patch.json, format) of a directory holding an upload's files; every file present must be listed
    in patch.json with its sha256. The format is adapter when the adapter tensors are there, else coefficients
    when a seed pool's coefficients are, else trajectory.
    Messages name the file, not the (server's scratch) directory."""
    patch_dir = Path(patch_dir)
    doc = PatchDoc.load(patch_dir, where=PATCH_FILE)
    present = sorted(p.name for p in patch_dir.iterdir() if p.is_file() and p.name != PATCH_FILE)
    for name in present:
        if name not in doc.files:
            raise ZoedgeError(f"{name} is not listed in {PATCH_FILE}")
        if sha256_file(patch_dir / name) != doc.files[name]:
            raise ZoedgeError(f"{name} does not match its sha256 in {PATCH_FILE} (corrupt or edited)")
    fmt = "adapter" if ADAPTER_FILE in present else "coefficients" if COEFFICIENTS_FILE in present else "trajectory"
    if TRAJECTORY_FILE not in present and fmt == "trajectory":
        raise ZoedgeError(f"the upload has neither {ADAPTER_FILE}, {COEFFICIENTS_FILE} nor {TRAJECTORY_FILE}")
    if doc.seed_pool_k is not None and COEFFICIENTS_FILE not in present:
        raise ZoedgeError(f"a seed-pool patch travels with its {COEFFICIENTS_FILE}")
    if fmt == "adapter" and ADAPTER_CONFIG_FILE in doc.files and ADAPTER_CONFIG_FILE not in present:
        raise ZoedgeError(f"{ADAPTER_CONFIG_FILE} is listed in {PATCH_FILE} but missing")
    return doc, fmt


# ---- archives ---------------------------------------------------------------------------------------------
def pack(src_dir: str | Path, out_file: str | Path, names: Iterable[str] | None = None,
         compress: bool = False) -> tuple[str, int]:
    """Write `names` (default: every file under src_dir, recursively) to a tar, atomically; return
    (sha256, bytes). compress: gzip it (mtime 0, no file name: still deterministic)."""
    src_dir = Path(src_dir)
    if names is None:
        names = [p.relative_to(src_dir).as_posix() for p in src_dir.rglob("*") if p.is_file()]
    out_file = Path(out_file)
    with open_atomic(out_file) as f, contextlib.ExitStack() as stack:
        sink = stack.enter_context(gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0)) if compress else f
        tar = stack.enter_context(tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT))
        for name in sorted(set(names)):
            path = src_dir / name
            info = tarfile.TarInfo(name)
            info.size = path.stat().st_size
            info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
            with open(path, "rb") as data:
                tar.addfile(info, data)
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
