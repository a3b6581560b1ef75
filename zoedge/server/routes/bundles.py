"""Bundles: the admin publishes a bundle archive; devices read its manifest and download it.
Also the aggregation of a bundle's patches into a new global patch."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy import select

from zoedge.server.aggregate import aggregate
from zoedge.server.blobs import blob_response
from zoedge.server.deps import AdminDep, CallerDep, SessionDep, StateDep
from zoedge.server.intake import ingest_bundle
from zoedge.server.lookup import by_id_or_prefix
from zoedge.server.models import Bundle, Patch
from zoedge.server.schemas import AggregateRequest, BundleDetail, BundleOut, PatchOut
from zoedge.server.siblings import group
from zoedge.server.uploads import RAW_ARCHIVE_BODY, check_declared_sha256, receive_body
from zoedge.transfer import SHA256_HEADER

router = APIRouter(prefix="/bundles", tags=["bundles"])

@router.post("", status_code=status.HTTP_201_CREATED, response_model=BundleOut, openapi_extra=RAW_ARCHIVE_BODY)
async def publish_bundle(request: Request, response: Response, state: StateDep, _: AdminDep) -> Bundle:
    """Publish a bundle directory archive (manifest.json, model.onnx, trainable.safetensors, tokenizer.json).
    Publishing the same bundle again answers 200 with the existing record."""
    with state.blobs.temp_file(".upload") as upload:
        sha, size = await receive_body(request, upload, state.settings.max_bundle_bytes)
        check_declared_sha256(request, sha, required=False)
        bundle, created = await run_in_threadpool(ingest_bundle, state, upload, sha, size)
    if not created:
        response.status_code = status.HTTP_200_OK
    return bundle


@router.get("", response_model=list[BundleOut])
def list_bundles(db: SessionDep, _: CallerDep) -> list[Bundle]:
    return list(db.scalars(select(Bundle).order_by(Bundle.created)))


def bundle_by_id(db: SessionDep, bundle_id: str) -> Bundle:
    """By id or unique id prefix."""
    bundle = by_id_or_prefix(db, Bundle, bundle_id, "bundle")
    if bundle is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no bundle {bundle_id}")
    return bundle


@router.get("/{bundle_id}", response_model=BundleDetail)
def get_bundle(bundle_id: str, db: SessionDep, _: CallerDep) -> Bundle:
    """A bundle by id, or by a unique prefix of its id (at least 4 characters)."""
    return bundle_by_id(db, bundle_id)


@router.get("/{bundle_id}/siblings", response_model=list[BundleOut])
def list_siblings(bundle_id: str, db: SessionDep, _: CallerDep) -> list[Bundle]:
    """The bundle's sibling group, itself included, first published first: the bundles exported from the same base
    with the same trainables (other quantization, format, target), which share its patches."""
    return group(db, bundle_by_id(db, bundle_id))


@router.get("/{bundle_id}/archive", response_class=FileResponse)
def download_bundle(bundle_id: str, db: SessionDep, state: StateDep, _: CallerDep) -> Response:
    bundle = bundle_by_id(db, bundle_id)
    return blob_response(state.blobs, bundle.sha256, "application/octet-stream", f"bundle-{bundle.id}.tar",
                         {SHA256_HEADER: bundle.sha256})


@router.post("/{bundle_id}/aggregate", status_code=status.HTTP_201_CREATED, response_model=PatchOut)
def aggregate_patches(bundle_id: str, body: AggregateRequest, state: StateDep, _: AdminDep) -> Patch:
    """FedAvg of the listed patches' adapter tensors, weighted by their training examples: a new global
    patch whose version is the bundle's previous global version + 1. The patches may be any siblings'; the global
    patch is kept under the first published bundle of the sibling group."""
    return aggregate(state, bundle_id, body.patch_ids)
