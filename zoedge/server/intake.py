"""Accepting bundles and patches: unpack into a scratch directory, check everything, and only then store
the blobs and add the row. A rejected upload leaves no row and no blob.

A patch must fit a published bundle (PatchDoc.check_fits: base, initial tensors, labels, trainables), its
tensors must be finite, match adapter_sha256 and pass the sanity bounds (server/sanity.py). It may be pushed for
any sibling of the bundle it was trained on (server/siblings.py); a bundle it does not fit refuses it (422).
A seed-pool patch must come from the bundle's pool with the fleet's K (zoedge.constants.SEED_POOL_K); its adapter
is rebuilt from its coefficients (and must equal the uploaded one, if any)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from fastapi import HTTPException, status
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from zoedge.constants import SEED_POOL_K
from zoedge.errors import ZoedgeError
from zoedge.manifest import MANIFEST_FILE, Manifest
from zoedge.patchdoc import ADAPTER_FILE, PATCH_FILE, PATCH_FILES, PatchDoc
from zoedge.runtime.bundle import Bundle as RuntimeBundle, check_trainables
from zoedge.runtime.patch import complete_patch_dir, replay_patch
from zoedge.runtime.seedpool import check_pool
from zoedge.runtime.tensors import load_tensors, tensor_digest
from zoedge.server import sanity
from zoedge.server.models import Bundle, Patch
from zoedge.server.siblings import fit_target, group_ids
from zoedge.server.state import ServerState
from zoedge.transfer import inspect_patch_dir, pack, unpack


BUNDLE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
NOT_PUBLISHED = "bundle not published"  # the start of a 424's detail (zoedge.device.client keeps such a patch queued)


# ---- bundles ----------------------------------------------------------------------------------------
def ingest_bundle(state: ServerState, upload: Path, sha256: str, size: int) -> tuple[Bundle, bool]:
    with state.blobs.temp_dir() as work:
        unpack(upload, work / "b", max_bytes=4 * state.settings.max_bundle_bytes)
        RuntimeBundle.open(work / "b")  # manifest, every file against its sha256, tokenizer
        manifest = Manifest.load(work / "b")
        if not manifest.bundle_id:
            raise ZoedgeError(f"{MANIFEST_FILE}: the bundle has no bundle_id (re-export it)")
        if not isinstance(manifest.bundle_id, str) or not BUNDLE_ID.match(manifest.bundle_id):
            # it names data_dir/bundles/<id> and URLs: "../x" would be stored outside the data directory
            raise ZoedgeError(f"{MANIFEST_FILE}: bad bundle_id {str(manifest.bundle_id)[:80]!r} "
                              "(letters, digits, '-' and '_', at most 64)")
        with state.sessions() as db:
            existing = db.get(Bundle, manifest.bundle_id)
            if existing is not None:
                if existing.manifest.get("files") != manifest.files:
                    raise HTTPException(status.HTTP_409_CONFLICT,
                                        f"bundle {manifest.bundle_id} is already published with other content")
                return existing, False
            state.blobs.put_file(upload, sha256)
            target = state.settings.data_dir / "bundles" / manifest.bundle_id
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.rename(work / "b", target)
            row = Bundle(id=manifest.bundle_id, model_id=manifest.model_id, base_sha256=manifest.base_sha256,
                         initial_sha256=manifest.initial_sha256, sibling_key=manifest.sibling_key,
                         manifest=manifest.to_dict(), sha256=sha256,
                         bytes=size)
            db.add(row)
            try:
                db.commit()
            except IntegrityError:  # published concurrently
                db.rollback()
                return db.get(Bundle, manifest.bundle_id), False
            return row, True


# ---- patches ----------------------------------------------------------------------------------------
def ingest_patch(state: ServerState, device_id: str, upload: Path, sha256: str, size: int,
                 expected_format: Optional[str] = None, target: Optional[str] = None) -> tuple[Patch, bool]:
    """Check an uploaded patch archive and store it; (row, created). Idempotent by the archive's sha256.
    target: the bundle it is pushed for (the one it was trained on or a sibling); default: the one it names."""
    with state.sessions() as db:
        target_row = _target(db, target)
        existing = _existing_patch(db, sha256, device_id)
        if existing is not None:
            if target_row is not None and existing.bundle_id not in group_ids(db, target_row.id):
                raise HTTPException(status.HTTP_409_CONFLICT, f"this patch is stored for bundle {existing.bundle_id}, "
                                                              f"which is no sibling of bundle {target_row.id}")
            return existing, False
        db.commit()  # no connection held while unpacking / replaying (seconds for a trajectory patch)
        with state.blobs.temp_dir() as work:
            pdir = work / "patch"
            unpack(upload, pdir, allowed=PATCH_FILES, max_bytes=4 * state.settings.max_upload_bytes)
            doc, fmt = inspect_patch_dir(pdir)
            if expected_format and fmt != expected_format:
                raise ZoedgeError(f"declared format {expected_format} but the archive is a {fmt} patch")
            bundle, manifest = (target_row, fit_target(db, doc, target_row)) if target_row else _bundle_for(db, doc)
            if doc.seed_pool_k is not None:
                check_pool(doc, manifest, SEED_POOL_K, "patch refused")
            if fmt != "adapter":  # replay / rebuild against the bundle; serve the complete directory
                complete_patch_dir(pdir, state.bundle_dir(bundle))
            elif doc.seed_pool_k is not None and tensor_digest(replay_patch(pdir, state.bundle_dir(bundle))) != \
                    doc.adapter_sha256:
                raise ZoedgeError(f"the seed-pool coefficients do not rebuild the adapter of adapter_sha256 in {PATCH_FILE}")
            tensors = check_trainables(manifest, load_tensors(pdir / ADAPTER_FILE), f"patch refused: {ADAPTER_FILE}")
            if tensor_digest(tensors) != doc.adapter_sha256:
                raise ZoedgeError(f"the adapter tensors do not match adapter_sha256 in {PATCH_FILE}")
            sanity.check_tensors(state.settings, tensors, sanity.fleet_norms(state, db, bundle.id), "patch refused")
            if fmt != "adapter":
                served = work / "complete.tar"
                served_sha, _ = pack(pdir, served)
            else:
                served, served_sha = upload, sha256
            row = Patch(device_id=device_id, bundle_id=bundle.id, kind=fmt, sha256=sha256, bytes=size,
                        archive_sha256=served_sha, adapter_sha256=doc.adapter_sha256,
                        version=latest_global_version(db, bundle.id), steps=doc.steps, examples=doc.examples,
                        metrics=doc.metrics)
            row.adapter_blob = state.blobs.put_copy(pdir / ADAPTER_FILE)
            if served is not upload:
                state.blobs.put_file(served, served_sha)
            state.blobs.put_file(upload, sha256)
        db.add(row)
        try:
            db.commit()
        except IntegrityError:  # the same archive arrived concurrently
            db.rollback()
            existing = _existing_patch(db, sha256, device_id)
            if existing is None:
                raise
            return existing, False
        return row, True


def _target(db: Session, bundle_id: Optional[str]) -> Optional[Bundle]:
    if not bundle_id:
        return None
    row = db.get(Bundle, bundle_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no bundle {bundle_id[:80]} to store the patch for")
    return row


def _existing_patch(db: Session, sha256: str, device_id: str) -> Optional[Patch]:
    existing = db.scalar(select(Patch).where(Patch.sha256 == sha256))
    if existing is not None and existing.device_id != device_id:
        raise HTTPException(status.HTTP_409_CONFLICT, "this patch archive was already uploaded by another device")
    return existing


def _bundle_for(db: Session, doc: PatchDoc) -> tuple[Bundle, Manifest]:
    """The published bundle the patch names, else the newest one it fits (a re-export with the same base,
    initial tensors, labels and trainables); the patch is checked to fit it."""
    bundle = db.get(Bundle, doc.bundle_id) if doc.bundle_id else None
    if bundle is not None:
        manifest = Manifest.from_dict(bundle.manifest)
        doc.check_fits(manifest, "patch")
        return bundle, manifest
    refusal = None
    for bundle in db.scalars(select(Bundle).where(Bundle.base_sha256 == doc.base_sha256,
                                                  Bundle.initial_sha256 == doc.initial_sha256)
                             .order_by(Bundle.created.desc()).limit(20)):
        manifest = Manifest.from_dict(bundle.manifest)
        try:
            doc.check_fits(manifest, "patch")
            return bundle, manifest
        except ZoedgeError as e:
            refusal = refusal or e
    if doc.bundle_id and BUNDLE_ID.match(doc.bundle_id):
        # the bundle it was trained on may be published later: 424, so the device keeps it queued and retries
        raise HTTPException(status.HTTP_424_FAILED_DEPENDENCY,
                            f"{NOT_PUBLISHED}: bundle {doc.bundle_id} (model {doc.model_id:.80}) is not on this server "
                            "yet; the patch can be sent again once the admin publishes it")
    if refusal is not None:
        raise refusal
    raise ZoedgeError(f"no published bundle fits this patch (model {doc.model_id:.80}, base "
                      f"{doc.base_sha256[:12]}); publish the bundle first")


def latest_global_version(db: Session, bundle_id: str) -> int:
    """The newest global version of the bundle's sibling group (0: none yet)."""
    return db.scalar(select(func.coalesce(func.max(Patch.version), 0))
                     .where(Patch.bundle_id.in_(group_ids(db, bundle_id)), Patch.kind == "global")) or 0
