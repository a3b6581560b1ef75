"""HTTP client of the fleet server (httpx), with retries and exponential backoff.

Connection errors, timeouts, 429 and 5xx are retried (`retries` times, waiting backoff·2^k, or the server's
Retry-After); other 4xx answers fail at once with the server's one-line reason. Patch uploads go through
the outbox first, so nothing is lost when the server is down: `sync` sends what is queued.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

from zoedge.device.outbox import Outbox, OutboxEntry
from zoedge.errors import ZoedgeError
from zoedge.fsio import dir_mode
from zoedge.manifest import Manifest, sha256_file, verify_files
from zoedge.patchdoc import PATCH_FILES
from zoedge.transfer import FORMAT_HEADER, SHA256_HEADER, inspect_patch_dir, pack, unpack
RETRY_STATUSES = {429, 500, 502, 503, 504}
CONTENT_REJECTED = {400, 409, 413, 422}  # the upload itself is refused: retrying the same bytes cannot help
NOT_YET = 424  # the patch's bundle is not published yet: the patch stays queued and is sent again later


class FleetError(ZoedgeError):
    """The server answered with an error (status set) or could not be reached (status None)."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class ServerUnreachable(FleetError):
    pass


@dataclass
class SyncResult:
    sent: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[OutboxEntry, str]] = field(default_factory=list)


class FleetClient:
    def __init__(self, server: str, token: Optional[str] = None, *, retries: int = 4, backoff: float = 0.5,
                 max_backoff: float = 30.0, timeout: float = 60.0, transport: Optional[httpx.BaseTransport] = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.server = server.rstrip("/")
        self.retries, self.backoff, self.max_backoff, self.sleep = retries, backoff, max_backoff, sleep
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "FleetClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- transport -----------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, idempotent: bool = True, body_file: Optional[Path] = None,
                **kw: Any) -> httpx.Response:
        """One API call with retries; raises FleetError on an error answer, ServerUnreachable at the end."""
        last = ""
        for attempt in range(self.retries + 1):
            wait = min(self.max_backoff, self.backoff * 2 ** attempt)
            try:
                if body_file is not None:
                    with open(body_file, "rb") as f:
                        r = self.http.request(method, path, content=f, **kw)
                else:
                    r = self.http.request(method, path, **kw)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                last = f"{type(e).__name__}: {e}"
            except httpx.TransportError as e:  # the request may have reached the server
                if not idempotent:
                    raise ServerUnreachable(f"{self.server}: connection lost ({type(e).__name__}: {e})") from None
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code < 400:
                    return r
                if r.status_code not in RETRY_STATUSES or (not idempotent and r.status_code != 429):
                    raise FleetError(f"{self.server} refused {method} {path} ({r.status_code}): {_detail(r)}",
                                     r.status_code)
                last = f"{r.status_code}: {_detail(r)}"
                retry_after = r.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    wait = min(self.max_backoff, max(wait, float(retry_after)))
            if attempt < self.retries:
                self.sleep(wait)
        raise ServerUnreachable(f"cannot reach {self.server} after {self.retries + 1} attempts ({last})")

    # ---- admin ---------------------------------------------------------------------------------------
    def register_device(self, name: str) -> dict[str, Any]:
        """(admin token) Register a device: {"device_id", "name", "token"}."""
        return self.request("POST", "/v1/devices", json={"name": name}, idempotent=False).json()

    def publish_bundle(self, bundle_dir: str | Path) -> dict[str, Any]:
        """(admin token) Upload a bundle directory as a tar; idempotent."""
        Manifest.load(bundle_dir)  # fail early, locally, on a directory that is no bundle
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "bundle.tar"
            sha, size = pack(bundle_dir, archive)
            r = self.request("POST", "/v1/bundles", body_file=archive,
                             headers={SHA256_HEADER: sha, "Content-Type": "application/octet-stream",
                                      "Content-Length": str(size)})
        return r.json()

    def aggregate(self, bundle_id: str, patch_ids: list[str]) -> dict[str, Any]:
        return self.request("POST", f"/v1/bundles/{bundle_id}/aggregate", json={"patch_ids": patch_ids},
                            idempotent=False).json()

    # ---- device --------------------------------------------------------------------------------------
    def upload_archive(self, archive: Path, sha256: str, fmt: Optional[str] = None,
                       bundle: Optional[str] = None) -> dict[str, Any]:
        """bundle: the id of the bundle to store it for (the one it was trained on or a sibling; default: the one
        patch.json names)."""
        headers = {SHA256_HEADER: sha256, "Content-Type": "application/octet-stream",
                   "Content-Length": str(archive.stat().st_size)}
        if fmt:
            headers[FORMAT_HEADER] = fmt
        params = {"bundle_id": bundle} if bundle else None
        return self.request("POST", "/v1/patches", body_file=archive, headers=headers, params=params).json()

    def push(self, patch_dir: str | Path, fmt: str, outbox: Outbox, bundle: Optional[str] = None) -> dict[str, Any]:
        """Queue the patch in the outbox, then send it. On failure it stays queued (unless refused).
        Holds the outbox lock, so a concurrent push or sync of the same entry waits instead of racing.
        bundle: store it for this bundle id (a sibling of the one it was trained on); kept with the entry."""
        with outbox.locked():
            entry = outbox.enqueue_patch(patch_dir, fmt, bundle)
            return self.send(entry, outbox)

    def send(self, entry: OutboxEntry, outbox: Outbox) -> dict[str, Any]:
        try:
            result = self.upload_archive(outbox.archive_path(entry.sha256), entry.sha256, entry.format,
                                         entry.extra.get("bundle"))
        except FleetError as e:
            if e.status in CONTENT_REJECTED:
                where = outbox.reject(entry, str(e))
                raise FleetError(f"{e} (moved to {where})", e.status) from None
            outbox.record_attempt(entry, str(e))
            if e.status == NOT_YET:
                raise FleetError(f"{e} (kept in {outbox.root}: `zoedge sync` sends it once the bundle is published)",
                                 e.status) from None
            if isinstance(e, ServerUnreachable):
                raise ServerUnreachable(f"{e}; the patch stays queued in {outbox.root} (run `zoedge sync`)") from None
            raise
        outbox.remove(entry)
        return result

    def sync(self, outbox: Outbox) -> SyncResult:
        """Send every queued patch, oldest first. Stops early when the server is unreachable."""
        result = SyncResult()
        with outbox.locked():
            for entry in outbox.entries():
                try:
                    result.sent.append(self.send(entry, outbox))
                except ServerUnreachable as e:
                    result.failed.append((entry, str(e)))
                    break
                except FleetError as e:
                    result.failed.append((entry, str(e)))
        return result

    def list_patches(self, **filters: Any) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v is not None}
        return self.request("GET", "/v1/patches", params=params).json()

    def get_patch(self, patch_id: str) -> dict[str, Any]:
        """A patch's metadata, by id or unique id prefix."""
        return self.request("GET", f"/v1/patches/{_segment(patch_id)}").json()

    def latest_global(self, bundle_id: str) -> Optional[dict[str, Any]]:
        """The global patch of the bundle with the highest version (None: no aggregate yet)."""
        found = self.list_patches(bundle_id=bundle_id, kind="global")
        return max(found, key=lambda p: p["version"]) if found else None

    def list_bundles(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/bundles").json()

    def siblings(self, bundle_id: str) -> list[dict[str, Any]]:
        """The bundle's sibling group (itself included): bundles that share its patches."""
        return self.request("GET", f"/v1/bundles/{_segment(bundle_id)}/siblings").json()

    def get_bundle(self, bundle_id: str) -> dict[str, Any]:
        """A bundle's metadata (with its manifest), by id or unique id prefix."""
        return self.request("GET", f"/v1/bundles/{_segment(bundle_id)}").json()

    def pull_bundle(self, bundle_id: str, out: str | Path) -> dict[str, Any]:
        """Download a published bundle into out (absent or empty), checked against the archive's sha256 and every
        file against the manifest; the directory appears complete or not at all."""
        def check(archive: Path, work: Path) -> None:
            unpack(archive, work)
            verify_files(work, Manifest.load(work))

        return self._fetch_dir(out, lambda: self.get_bundle(bundle_id), "bundle", "sha256", check)

    def pull(self, patch_id: str, out: str | Path, fmt: Optional[str] = None) -> dict[str, Any]:
        """Download a patch into out (absent or empty), checked against its sha256s; the complete
        directory appears at once (renamed from a temporary sibling). fmt "coefficients" (a seed-pool patch): only
        patch.json, coefficients.npy and start.safetensors, a gzipped few KB; the device rebuilds the adapter from
        the pool (`runtime.patch.complete_patch_dir`) or continues it (`--seed-pool-from`). Its files are checked
        against its patch.json, whose adapter_sha256 must be the server's (the rebuild checks that digest)."""
        meta = self.get_patch(patch_id)

        def check(archive: Path, work: Path) -> None:
            unpack(archive, work, allowed=PATCH_FILES)
            doc, kind = inspect_patch_dir(work)
            if fmt and (kind != fmt or doc.adapter_sha256 != meta["adapter_sha256"]):
                raise FleetError(f"downloaded patch {meta['patch_id']} is not its {fmt} archive (corrupted in transit)")

        return self._fetch_dir(out, lambda: meta, "patch", None if fmt else "archive_sha256", check,
                               f"?format={fmt}" if fmt else "")

    def _fetch_dir(self, out: str | Path, get_meta, kind: str, sha_key: Optional[str], check,
                   query: str = "") -> dict[str, Any]:
        """The archive of a bundle or patch, downloaded to a temporary sibling of out, its sha256 (meta[sha_key],
        unless None) and contents checked (`check(archive, dir)` unpacks and verifies), then renamed into place."""
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ZoedgeError(f"--out {out}: exists and is not an empty directory")
        meta = get_meta()
        the_id = meta[f"{kind}_id"]
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
            archive, work = Path(tmp) / f"{kind}.tar", Path(tmp) / kind
            self.download(f"/v1/{'patches' if kind == 'patch' else 'bundles'}/{the_id}/archive{query}", archive)
            if sha_key and sha256_file(archive) != meta[sha_key]:
                raise FleetError(f"downloaded {kind} {the_id} does not match its sha256 (corrupted in transit)")
            check(archive, work)
            archive.unlink()
            os.chmod(work, dir_mode())
            if out.exists():
                out.rmdir()
            os.rename(work, out)
        return meta

    def download(self, path: str, dest: Path) -> None:
        for attempt in range(self.retries + 1):
            try:
                with self.http.stream("GET", path) as r:
                    if r.status_code >= 400 and r.status_code not in RETRY_STATUSES:
                        r.read()
                        raise FleetError(f"{self.server} refused GET {path} ({r.status_code}): {_detail(r)}",
                                         r.status_code)
                    if r.status_code < 400:
                        with open(dest, "wb") as f:
                            for chunk in r.iter_bytes(1 << 20):
                                f.write(chunk)
                        return
                    last = f"{r.status_code}"
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
            if attempt < self.retries:
                self.sleep(min(self.max_backoff, self.backoff * 2 ** attempt))
        raise ServerUnreachable(f"cannot download {path} from {self.server} after {self.retries + 1} attempts ({last})")


def _segment(ident: str) -> str:
    """An id as one URL path segment (a pasted id with a slash must not reach another route)."""
    from urllib.parse import quote

    return quote(ident.strip(), safe="")


def _detail(r: httpx.Response) -> str:
    try:
        detail = r.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list) and detail:  # FastAPI validation errors
        first = detail[0]
        detail = f"{'.'.join(map(str, first.get('loc', [])))}: {first.get('msg')}"
    text = str(detail or r.reason_phrase or r.text[:200] or "")
    return text.splitlines()[0] if text else ""
