"""Realistic patches without the trainer: a random trajectory replayed from the bundle's initial tensors
and written with the runtime's `write_patch` (the format `zoedge train` produces); `rewrite_doc` edits a
patch.json through the same contract (PatchDoc), `with_tensors` writes a patch with chosen tensor values."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from zoedge.patchdoc import PatchDoc
from zoedge.runtime.bundle import Bundle
from zoedge.runtime.patch import write_patch
from zoedge.runtime.zo import ZOConfig, replay


def make_patch(bundle_dir: Path, out: Path, steps: int = 4, run_seed: int = 0, seed: int = 0, lr: float = 1e-3,
               examples: int = 100, accuracy: float = 0.8, start_head: bool = False,
               cfg: ZOConfig | None = None) -> Path:
    """Write a patch directory; (run_seed, seed) make distinct patches. start_head also writes
    start.safetensors (a perturbed head, as the linear-probe start would)."""
    cfg = cfg or ZOConfig()
    bundle = Bundle.open(bundle_dir)
    m = bundle.manifest
    tensors = bundle.initial_trainables()
    rng = np.random.default_rng(seed)
    start = {}
    if start_head:
        for t in m.trainables:
            if t.role == "head":
                start[t.name] = (tensors[t.name] + rng.standard_normal(tensors[t.name].shape)
                                 .astype(np.float32) * np.float32(0.1)).astype(np.float32)
        tensors.update({k: v.copy() for k, v in start.items()})
    traj = rng.standard_normal((steps, cfg.perturbations + 1)).astype(np.float32)
    traj[:, cfg.perturbations] = np.float32(lr)
    roles = {t.name: t.role for t in m.trainables}
    replay(tensors, cfg, roles, run_seed, traj)
    write_patch(out, m, tensors, traj, start, {"steps": steps, "run_seed": run_seed, "zo": cfg.to_dict(),
                                                "examples": examples, "metrics": {"eval_accuracy": accuracy}})
    return out


def rewrite_doc(patch_dir: Path, **changes: Any) -> PatchDoc:
    """Change fields of patch.json (validated: a bad value raises ZoedgeError); the files stay as they are."""
    doc = dataclasses.replace(PatchDoc.load(patch_dir), **changes)
    doc.write(patch_dir)
    return doc


def with_tensors(bundle_dir: Path, out: Path, edit, examples: int = 100) -> Path:
    """A patch (adapter upload; its trajectory is empty) whose tensors are the bundle's initial ones after
    edit(name, role, array) -> array, e.g. a diverged run's values."""
    bundle = Bundle.open(bundle_dir)
    tensors = bundle.initial_trainables()
    for t in bundle.manifest.trainables:
        tensors[t.name] = np.ascontiguousarray(edit(t.name, t.role, tensors[t.name]), dtype=np.float32)
    cfg = ZOConfig()
    write_patch(out, bundle.manifest, tensors, np.zeros((0, cfg.perturbations + 1), np.float32), {},
                {"steps": 0, "run_seed": 0, "zo": cfg.to_dict(), "examples": examples, "metrics": {}})
    return out
