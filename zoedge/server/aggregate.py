"""FedAvg: a new global patch whose tensors are the examples-weighted mean of device patches."""

from __future__ import annotations

import numpy as np
from fastapi import HTTPException, status
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from zoedge.device.archive import pack, unpack
from zoedge.errors import ZoedgeError
from zoedge.manifest import Manifest
from zoedge.runtime.bundle import check_trainables
from zoedge.runtime.patch import ADAPTER_FILE, PATCH_FILES, load_patch_doc, prompt_of, write_patch
from zoedge.runtime.tensors import load_tensors
from zoedge.runtime.zo import ZOConfig
from zoedge.server.intake import latest_global_version
from zoedge.server.models import Bundle, Patch
from zoedge.server.state import ServerState


def fedavg(tensor_sets: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Σ w_i θ_i / Σ w_i per tensor, accumulated in float64, returned as float32."""
    total = float(sum(weights))
    out = {}
    for name in tensor_sets[0]:
        acc = np.zeros(tensor_sets[0][name].shape, dtype=np.float64)
        for tensors, w in zip(tensor_sets, weights):
            acc += w * tensors[name].astype(np.float64)
        out[name] = (acc / total).astype(np.float32)
    return out


def aggregate(state: ServerState, bundle_id: str, patch_ids: list[str]) -> Patch:
    if len(set(patch_ids)) != len(patch_ids):
        raise ZoedgeError("aggregate: a patch id is listed twice")
    with state.sessions() as db:
        bundle = db.get(Bundle, bundle_id)
        if bundle is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no bundle {bundle_id}")
        rows = {p.id: p for p in db.scalars(select(Patch).where(Patch.id.in_(patch_ids)))}
        missing = [i for i in patch_ids if i not in rows]
        if missing:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no patch {missing[0]}")
        patches = [rows[i] for i in patch_ids]
        for p in patches:
            if p.bundle_id != bundle_id:
                raise ZoedgeError(f"aggregate: patch {p.id} belongs to bundle {p.bundle_id}, not {bundle_id}")
            if p.examples <= 0:
                raise ZoedgeError(f"aggregate: patch {p.id} reports no training examples (cannot weight it)")
        manifest = Manifest.from_dict(bundle.manifest)
        tensor_sets = [check_trainables(manifest, load_tensors(state.blobs.path(p.adapter_blob)), f"patch {p.id}")
                       for p in patches]
        averaged = fedavg(tensor_sets, [float(p.examples) for p in patches])
        version = latest_global_version(db, bundle_id) + 1
        examples = sum(p.examples for p in patches)
        cfg = ZOConfig()
        with state.blobs.temp_dir() as work:
            prompts = {_prompt_of(state, p, work) for p in patches}
            if len(prompts) > 1:  # a head fitted through one prompt means nothing averaged with another's
                raise ZoedgeError("aggregate: the patches were trained through different prompt templates")
            prompt = prompts.pop()
            # A global patch is an adapter, not a run: its trajectory is empty (replaying it gives the
            # bundle's initial tensors), so it is always used through adapter_model.safetensors.
            doc = write_patch(work / "patch", manifest, averaged, np.zeros((0, cfg.perturbations + 1), np.float32),
                              {}, {"kind": "global", "version": version, "parents": patch_ids, "steps": 0,
                                   "run_seed": 0, "zo": cfg.to_dict(), "examples": examples, "metrics": {},
                                   **({"prompt_template": prompt} if prompt else {})})
            archive = work / "patch.tar"
            sha, size = pack(work / "patch", archive)
            row = Patch(device_id=None, bundle_id=bundle_id, kind="global", sha256=sha, bytes=size,
                        archive_sha256=sha, adapter_sha256=doc["adapter_sha256"], version=version, steps=0,
                        examples=examples, metrics={}, parent_ids=patch_ids)
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


def _prompt_of(state: ServerState, patch: Patch, work) -> str | None:
    """The prompt template in a stored patch's patch.json (decoder patches may choose their own)."""
    d = work / f"doc-{patch.id}"
    unpack(state.blobs.path(patch.archive_sha256), d, allowed=PATCH_FILES)
    return prompt_of(load_patch_doc(d), f"patch {patch.id}")
