"""The device's outbox: patch archives waiting to be uploaded, kept on disk so they survive restarts.

    <root>/<sha256>.tar     the archive exactly as it will be sent (packed deterministically; a coefficients
                            upload is a gzipped tar)
    <root>/<sha256>.json    what it is: format, source directory, when queued, attempts, last error
    <root>/rejected/        entries the server refused for their content (400/409/413), with the reason

An entry is complete once its .json exists (written atomically after the archive), so a crash while
queueing leaves at most a stray temporary file. Uploads are idempotent by sha256, so re-sending an entry
after a crash between upload and removal is harmless.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from zoedge.fsio import fsync_dir, write_json_atomic
from zoedge.manifest import sha256_file
from zoedge.transfer import COMPRESSED_FORMATS, check_carried_files, format_files, pack

DEFAULT_OUTBOX = Path("~/.zoedge/outbox")
OUTBOX_ENV = "ZOEDGE_OUTBOX"


@dataclass
class OutboxEntry:
    sha256: str
    bytes: int
    format: str
    source: str
    queued_at: float
    attempts: int = 0
    last_error: str = ""
    extra: dict = field(default_factory=dict)


class Outbox:
    def __init__(self, root: str | Path | None = None):
        root = root or os.environ.get(OUTBOX_ENV) or DEFAULT_OUTBOX
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)

    def archive_path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.tar"

    def _meta_path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.json"

    def enqueue_patch(self, patch_dir: str | Path, fmt: str, bundle: str | None = None) -> OutboxEntry:
        """Pack the format's files of patch_dir into the outbox (idempotent: same content, same entry).
        bundle: the bundle id to store it for on the server (extra["bundle"]; the latest push's wins)."""
        names = format_files(patch_dir, fmt)
        check_carried_files(patch_dir, names)
        tmp = self.root / f".pack-{uuid.uuid4().hex}.tar"
        try:
            sha, size = pack(patch_dir, tmp, names, compress=fmt in COMPRESSED_FORMATS)
            os.replace(tmp, self.archive_path(sha))
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.root)
        existing = self._read_meta(sha)
        if existing is not None:
            if bundle and existing.extra.get("bundle") != bundle:
                existing.extra["bundle"] = bundle
                self._write_meta(existing)
            return existing
        entry = OutboxEntry(sha256=sha, bytes=size, format=fmt, source=str(Path(patch_dir).resolve()),
                            queued_at=time.time(), extra={"bundle": bundle} if bundle else {})
        self._write_meta(entry)
        return entry

    def entries(self) -> list[OutboxEntry]:
        """Complete entries, oldest first. An archive that no longer matches its sha256 is set aside."""
        out = []
        for meta in self.root.glob("*.json"):
            entry = self._read_meta(meta.stem)
            if entry is None:
                continue
            archive = self.archive_path(entry.sha256)
            if not archive.is_file() or sha256_file(archive) != entry.sha256:
                self.reject(entry, "archive missing or corrupt in the outbox")
                continue
            out.append(entry)
        return sorted(out, key=lambda e: (e.queued_at, e.sha256))

    def remove(self, entry: OutboxEntry) -> None:
        """Sent: drop the entry (metadata first, so a crash in between leaves no half entry listed)."""
        self._meta_path(entry.sha256).unlink(missing_ok=True)
        self.archive_path(entry.sha256).unlink(missing_ok=True)

    def reject(self, entry: OutboxEntry, reason: str) -> Path:
        """The server refused the content: move the entry to rejected/ with the reason; it is not retried."""
        dest = self.root / "rejected"
        dest.mkdir(exist_ok=True)
        entry.last_error = reason
        write_json_atomic(dest / f"{entry.sha256}.json", asdict(entry))
        if self.archive_path(entry.sha256).is_file():
            os.replace(self.archive_path(entry.sha256), dest / f"{entry.sha256}.tar")
        self._meta_path(entry.sha256).unlink(missing_ok=True)
        return dest

    def record_attempt(self, entry: OutboxEntry, error: str) -> None:
        entry.attempts += 1
        entry.last_error = error
        self._write_meta(entry)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of the outbox (one sync at a time, across processes)."""
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read_meta(self, sha256: str) -> OutboxEntry | None:
        try:
            d = json.loads(self._meta_path(sha256).read_text(encoding="utf-8"))
            return OutboxEntry(**{k: v for k, v in d.items() if k in OutboxEntry.__dataclass_fields__})
        except (OSError, ValueError, TypeError):
            return None

    def _write_meta(self, entry: OutboxEntry) -> None:
        write_json_atomic(self._meta_path(entry.sha256), asdict(entry))

