"""FedAvg: a new global patch whose tensors are the examples-weighted mean of device patches.

Every listed patch passes the sanity bounds again (server/sanity.py; a patch stored before the bounds existed,
or while the fleet was too small for the ratio check, can still be an outlier): one that does not is refused
with a 400 naming it. Patches with the same adapter (the adapter and trajectory uploads of one run) count once;
the global patch's metrics say which were left out as duplicates. The patches may come from any sibling of the
bundle (server/siblings.py); the global patch is kept under the group's first published bundle. Seed-pool
patches (zoedge train --seed-pool) average their coefficient vectors and head starts instead, and the global
patch carries the mean vector and the tensors it rebuilds to (runtime/seedpool.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi import HTTPException, status
from sqlalchemy.exc import IntegrityError

from zoedge.errors import ZoedgeError
from zoedge.manifest import Manifest
from zoedge.patchdoc import ADAPTER_FILE, PATCH_FILES, PatchDoc
from zoedge.runtime.bundle import Bundle as RuntimeBundle, check_trainables
from zoedge.runtime import seedpool
from zoedge.runtime.patch import write_patch
from zoedge.runtime.tensors import load_tensors
from zoedge.runtime.zo import ZOConfig
from zoedge.server import sanity
from zoedge.server.lookup import by_id_or_prefix
from zoedge.server.intake import latest_global_version
from zoedge.server.models import Bundle, Patch
from zoedge.server.siblings import group, group_head
from zoedge.server.state import ServerState
from zoedge.transfer import pack, unpack


def fedavg(tensor_sets: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Σ w_i θ_i / Σ w_i per tensor, accumulated in float64, returned as float32."""
    return {name: seedpool.weighted_mean([t[name] for t in tensor_sets], weights) for name in tensor_sets[0]}


def one_per_run(patches: list[Patch]) -> tuple[list[Patch], dict[str, str]]:
    """(the first patch of each distinct adapter, {left-out patch id: the id it repeats})."""
    first: dict[str, Patch] = {}
    duplicates = {}
    for p in patches:
        if p.adapter_sha256 in first:
            duplicates[p.id] = first[p.adapter_sha256].id
        else:
            first[p.adapter_sha256] = p
    return list(first.values()), duplicates


def aggregate(state: ServerState, bundle_id: str, patch_ids: list[str]) -> Patch:
    with state.sessions() as db:
        bundle = by_id_or_prefix(db, Bundle, bundle_id, "bundle")  # ids or unique prefixes, as git takes them
        if bundle is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no bundle {bundle_id}")
        members = {b.id for b in group(db, bundle)}
        bundle = group_head(db, bundle)
        bundle_id = bundle.id
        patches = []
        for ident in patch_ids:
            row = by_id_or_prefix(db, Patch, ident, "patch")
            if row is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"no patch {ident}")
            patches.append(row)
        patch_ids = [p.id for p in patches]
        if len(set(patch_ids)) != len(patch_ids):
            raise ZoedgeError("aggregate: a patch is listed twice")
        for p in patches:
            if p.bundle_id not in members:
                raise ZoedgeError(f"aggregate: patch {p.id} belongs to bundle {p.bundle_id}, which is neither "
                                  f"{bundle_id} nor a sibling of it")
            if p.examples <= 0:
                raise ZoedgeError(f"aggregate: patch {p.id} reports no training examples (cannot weight it)")
        patches, duplicates = one_per_run(patches)
        manifest = Manifest.from_dict(bundle.manifest)
        fleet = sanity.fleet_norms(state, db, bundle_id)
        tensor_sets = []
        for p in patches:
            tensors = check_trainables(manifest, load_tensors(state.blobs.path(p.adapter_blob)),
                                       f"aggregate: patch {p.id}")
            sanity.check_tensors(state.settings, tensors, fleet, f"aggregate: patch {p.id} refused",
                                 p.adapter_sha256)
            tensor_sets.append(tensors)
        averaged = fedavg(tensor_sets, [float(p.examples) for p in patches])
        version = latest_global_version(db, bundle_id) + 1
        examples = sum(p.examples for p in patches)
        metrics = {"duplicates": duplicates} if duplicates else {}
        cfg = ZOConfig()
        with state.blobs.temp_dir() as work:
            docs = [_doc_of(state, p, work) for p in patches]
            prompts = {d.prompt_template for d in docs}
            if len(prompts) > 1:  # a head fitted through one prompt means nothing averaged with another's
                raise ZoedgeError("aggregate: the patches were trained through different prompt templates")
            meta = {"kind": "global", "version": version, "parents": patch_ids, "steps": 0, "run_seed": 0,
                    "zo": cfg.to_dict(), "examples": examples, "metrics": metrics, "prompt_template": prompts.pop()}
            start, coefficients = {}, None
            if any(d.seed_pool_k is not None for d in docs):  # the weighted mean of the coefficient vectors
                averaged, start, coefficients, pool = seedpool.average(
                    manifest, RuntimeBundle.open(state.bundle_dir(bundle), check_files=False).initial_trainables(),
                    [work / f"doc-{p.id}" for p in patches], docs, [float(p.examples) for p in patches])
                meta.update(pool)
            # A global patch is an adapter, not a run: its trajectory is empty (replaying it gives the bundle's
            # initial tensors), so it is used through adapter_model.safetensors, or rebuilt from its coefficients.
            doc = write_patch(work / "patch", manifest, averaged, np.zeros((0, cfg.perturbations + 1), np.float32),
                              start, meta, coefficients)
            archive = work / "patch.tar"
            sha, size = pack(work / "patch", archive)
            row = Patch(device_id=None, bundle_id=bundle_id, kind="global", sha256=sha, bytes=size,
                        archive_sha256=sha, adapter_sha256=doc.adapter_sha256, version=version, steps=0,
                        examples=examples, metrics=metrics, parent_ids=patch_ids)
            row.adapter_blob = state.blobs.put_copy(work / "patch" / ADAPTER_FILE)
            state.blobs.put_file(archive, sha)
        db.add(row)
        try:
            db.commit()
        except IntegrityError:
            db.rollback()
            raise HTTPException(status.HTTP_409_CONFLICT,
                                "another aggregate of this bundle was created at the same time; retry") from None
        return row


def _doc_of(state: ServerState, patch: Patch, work: Path) -> PatchDoc:
    """The patch.json of a stored patch (decoder patches may choose their own prompt)."""
    d = work / f"doc-{patch.id}"
    unpack(state.blobs.path(patch.archive_sha256), d, allowed=PATCH_FILES)
    return PatchDoc.load(d, where=f"patch {patch.id}")
