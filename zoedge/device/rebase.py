"""Training on top of a patch (the agent starts each run from the newest global patch) without a trainer option:

1. `derive_bundle`: a copy of the bundle whose initial trainables are the patch's tensors (model and tokenizer
   hard-linked, not copied; same bundle_id, initial_sha256 of the new tensors);
2. `zoedge train` on that copy, as usual;
3. `rebase_patch`: the run's patch re-expressed against the original bundle: its start.safetensors becomes the
   starting patch's tensors overlaid by the run's own start (the head start), its initial_sha256 the original's.
   Replay from the original bundle's initial tensors then sets start.safetensors and replays the trajectory: the
   same arithmetic as the run, so the adapter is rebuilt bit-exactly and the fleet server accepts the trajectory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np

from zoedge.errors import ZoedgeError
from zoedge.fsio import mkdtemp_in, write_bytes_atomic
from zoedge.manifest import MANIFEST_FILE, TRAINABLE_FILE, Manifest, sha256_file
from zoedge.patchdoc import PATCH_FILE, START_FILE, PatchDoc
from zoedge.runtime.patch import load_patch, replay_patch
from zoedge.runtime.tensors import load_tensors, safetensors_bytes, save_tensors, tensor_digest


def derive_bundle(bundle_dir: str | Path, patch_dir: str | Path, out: str | Path) -> Path:
    """The bundle with the patch's tensors as its initial trainables, at `out` (reused when already there)."""
    bundle_dir, out = Path(bundle_dir), Path(out)
    if (out / MANIFEST_FILE).is_file():
        return out
    m = Manifest.load(bundle_dir)
    _, tensors = load_patch(patch_dir, m)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = mkdtemp_in(out.parent, out.name)
    try:
        for name in m.files:
            if name == TRAINABLE_FILE:
                continue
            try:
                os.link(bundle_dir / name, tmp / name)
            except OSError:  # another file system
                shutil.copyfile(bundle_dir / name, tmp / name)
        save_tensors(tensors, tmp / TRAINABLE_FILE)
        derived = dataclasses.replace(m, initial_sha256=tensor_digest(tensors))
        derived.files = {**m.files, TRAINABLE_FILE: sha256_file(tmp / TRAINABLE_FILE)}
        derived.save(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def rebase_patch(patch_dir: str | Path, derived_dir: str | Path, bundle_dir: str | Path, out: str | Path) -> PatchDoc:
    """Write to `out` the patch trained on `derived_dir`, re-expressed against `bundle_dir`; checked by replaying
    it there (the adapter digest must come out equal)."""
    patch_dir, out = Path(patch_dir), Path(out)
    original = Manifest.load(bundle_dir)
    derived_start = load_tensors(Path(derived_dir) / TRAINABLE_FILE)
    doc = PatchDoc.load(patch_dir)
    run_start = load_tensors(patch_dir / START_FILE) if (patch_dir / START_FILE).is_file() else {}
    start = {k: np.ascontiguousarray(v) for k, v in {**derived_start, **run_start}.items()}
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = mkdtemp_in(out.parent, out.name)
    try:
        files = {}
        for name in doc.files:
            if name != START_FILE:
                shutil.copyfile(patch_dir / name, tmp / name)
                files[name] = doc.files[name]
        write_bytes_atomic(tmp / START_FILE, safetensors_bytes(start))
        files[START_FILE] = sha256_file(tmp / START_FILE)
        rebased = dataclasses.replace(doc, initial_sha256=original.initial_sha256, files=files)
        rebased.write(tmp)
        if tensor_digest(replay_patch(tmp, bundle_dir)) != doc.adapter_sha256:
            raise ZoedgeError(f"{patch_dir}: the rebased patch does not replay to its adapter on {bundle_dir}")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    assert (out / PATCH_FILE).is_file()
    return rebased
