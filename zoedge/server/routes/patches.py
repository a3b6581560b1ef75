"""Patches: devices upload theirs (adapter or trajectory archives) and read their own and the global ones."""

from __future__ import annotations

from typing import Literal, Optional

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy import or_, select

from zoedge.errors import ZoedgeError
from zoedge.server.auto import maybe_aggregate
from zoedge.server.blobs import blob_response
from zoedge.server.deps import CallerDep, DeviceDep, SessionDep, StateDep
from zoedge.server.intake import ingest_patch
from zoedge.server.lookup import by_id_or_prefix
from zoedge.server.models import Patch
from zoedge.server.schemas import PatchOut
from zoedge.server.siblings import group_ids
from zoedge.server.uploads import RAW_ARCHIVE_BODY, check_declared_sha256, receive_body
from zoedge.patchdoc import PATCH_FILES, PatchDoc
from zoedge.transfer import FORMAT_HEADER, SHA256_HEADER, UPLOAD_FORMATS, format_files, pack, unpack

router = APIRouter(prefix="/patches", tags=["patches"])
SIBLING_TARGET = ("store the patch for this bundle: the one it was trained on or a sibling (same base, trainables, "
                  "initial tensors, labels); one it does not fit answers 422. Default: the bundle patch.json names")


@router.post("", status_code=status.HTTP_201_CREATED, response_model=PatchOut, openapi_extra=RAW_ARCHIVE_BODY)
async def upload_patch(request: Request, response: Response, state: StateDep, device: DeviceDep,
                       format: Optional[Literal["adapter", "trajectory", "coefficients"]] = Query(
                           None, description=f"expected format (also header {FORMAT_HEADER}); default: detect"),
                       bundle_id: Optional[str] = Query(None, max_length=64, description=SIBLING_TARGET)) -> Patch:
    """Upload a patch archive. `adapter`: patch.json + adapter_model.safetensors (+ adapter_config.json,
    start.safetensors). `trajectory`: patch.json + trajectory.npy (+ start.safetensors); the server replays
    it against the bundle and stores the rebuilt adapter. `coefficients` (a seed-pool patch): patch.json +
    coefficients.npy (+ start.safetensors); the server rebuilds the adapter from the bundle's seed pool. The same
    archive again answers 200 with the existing patch (uploads are idempotent by sha256)."""
    metrics = state.metrics
    wait = await run_in_threadpool(state.limiter.retry_after, device.id)
    if wait:
        await run_in_threadpool(metrics.count_upload, "rate_limited")
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, "too many uploads from this device; slow down",
                            headers={"Retry-After": str(int(wait) + 1)})
    expected = format or request.headers.get(FORMAT_HEADER) or None
    if expected not in (None, *UPLOAD_FORMATS):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"unknown patch format {expected!r}")
    with state.blobs.temp_file(".upload") as upload:
        try:
            sha, size = await receive_body(request, upload, state.settings.max_upload_bytes)
        except HTTPException:
            await run_in_threadpool(metrics.count_upload, "too_large")
            raise
        try:
            check_declared_sha256(request, sha, required=True)
            patch, created = await run_in_threadpool(ingest_patch, state, device.id, upload, sha, size, expected,
                                                     bundle_id)
        except (HTTPException, ZoedgeError):
            await run_in_threadpool(metrics.count_upload, "rejected", size)
            raise
    await run_in_threadpool(metrics.count_upload, "created" if created else "duplicate", size)
    if not created:
        response.status_code = status.HTTP_200_OK
    elif state.settings.auto_aggregate:
        await run_in_threadpool(maybe_aggregate, state, patch.bundle_id)
    return patch


@router.get("", response_model=list[PatchOut])
def list_patches(db: SessionDep, caller: CallerDep, bundle_id: Optional[str] = None, siblings: bool = Query(
                     True, description="with bundle_id: also the patches of its sibling bundles (one history)"),
                 device_id: Optional[str] = None, version: Optional[int] = Query(None, ge=0, le=2**31 - 1),
                 kind: Optional[Literal["adapter", "trajectory", "coefficients", "global"]] = None,
                 limit: int = Query(1000, ge=1, le=10000)) -> list[Patch]:
    """Patches visible to the caller (a device: its own and the global ones; the admin: all), oldest first.
    A bundle's patches are those of its sibling group unless siblings=false."""
    q = select(Patch)
    if not caller.admin:
        q = q.where(or_(Patch.device_id == caller.device.id, Patch.device_id.is_(None)))
    if bundle_id is not None:
        q = q.where(Patch.bundle_id.in_(group_ids(db, bundle_id)) if siblings else Patch.bundle_id == bundle_id)
    if device_id is not None:
        q = q.where(Patch.device_id == device_id)
    if version is not None:
        q = q.where(Patch.version == version)
    if kind is not None:
        q = q.where(Patch.kind == kind)
    return list(db.scalars(q.order_by(Patch.created, Patch.id).limit(limit)))


def readable_patch(db: SessionDep, caller: CallerDep, patch_id: str) -> Patch:
    """By id or unique id prefix (among the patches the caller may read)."""
    visible = None if caller.admin else or_(Patch.device_id == caller.device.id, Patch.device_id.is_(None))
    patch = by_id_or_prefix(db, Patch, patch_id, "patch", visible)
    if patch is None or not caller.can_read(patch.device_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no patch {patch_id}")  # others' patches do not exist
    return patch


@router.get("/{patch_id}", response_model=PatchOut)
def get_patch(patch_id: str, db: SessionDep, caller: CallerDep) -> Patch:
    """A patch by id, or by a unique prefix of its id (at least 4 characters)."""
    return readable_patch(db, caller, patch_id)


@router.get("/{patch_id}/archive", response_class=FileResponse)
def download_patch(patch_id: str, db: SessionDep, caller: CallerDep, state: StateDep,
                   format: Optional[Literal["coefficients"]] = Query(
                       None, description="coefficients: only what rebuilds a seed-pool patch (patch.json, "
                                         "coefficients.npy, start.safetensors), gzipped: a few KB")) -> Response:
    """The complete patch directory as a tar: the uploaded archive for adapter patches; for trajectory
    patches the upload plus the replayed adapter_model.safetensors (and adapter_config.json). `patch_id`: the id or
    a unique prefix. `format=coefficients` (seed-pool patches): the device rebuilds the rest from the pool."""
    patch = readable_patch(db, caller, patch_id)
    sha = patch.archive_sha256 if format is None else coefficients_archive(state, patch)
    return blob_response(state.blobs, sha, "application/x-tar", f"patch-{patch.id}.tar", {SHA256_HEADER: sha})


def coefficients_archive(state, patch: Patch) -> str:
    """The gzipped coefficients-format archive of a stored seed-pool patch (made once, then a stored blob)."""
    with state.blobs.temp_dir() as work:
        unpack(state.blobs.path(patch.archive_sha256), work / "p", allowed=PATCH_FILES)
        if PatchDoc.load(work / "p", where=f"patch {patch.id}").seed_pool_k is None:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"patch {patch.id} is no seed-pool patch: it has no "
                                                             "coefficients (download it without format)")
        sha, _ = pack(work / "p", work / "c.tar", format_files(work / "p", "coefficients"), compress=True)
        if not state.blobs.exists(sha):
            state.blobs.put_file(work / "c.tar", sha)
    return sha


@router.get("/{patch_id}/adapter", response_class=FileResponse)
def download_adapter(patch_id: str, db: SessionDep, caller: CallerDep, state: StateDep) -> Response:
    """adapter_model.safetensors alone (uploaded, replayed or averaged)."""
    patch = readable_patch(db, caller, patch_id)
    return blob_response(state.blobs, patch.adapter_blob, "application/octet-stream", "adapter_model.safetensors",
                         {SHA256_HEADER: patch.adapter_blob})
