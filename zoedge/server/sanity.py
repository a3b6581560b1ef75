"""Patch sanity: tensors that no healthy training run produces are refused, at upload and at aggregation.

* every value finite (runtime.bundle.check_trainables, before this) and within ±`max_tensor_abs`;
* once the bundle has `norm_ratio_min_patches` accepted device patches (distinct adapters, the FLEET_WINDOW most
  recent), no tensor's L2 norm above `max_norm_ratio` times the median of that tensor's norm over them.

A diverged run (a MiniLM patch with adapter values up to 4.5e9 once averaged into a global scoring 57%) is
refused with a one-line reason naming the tensor, its value or norm and the bound (a ZoedgeError: HTTP 400).
"""

from __future__ import annotations

import functools

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from zoedge.errors import ZoedgeError
from zoedge.runtime.tensors import load_tensors, peak_abs
from zoedge.server.models import Patch
from zoedge.server.settings import Settings
from zoedge.server.siblings import group_ids
from zoedge.server.state import ServerState

FLEET_WINDOW = 200  # the most recent device patches of a bundle that make its fleet

Norms = dict[str, float]


def tensor_norms(tensors: dict[str, np.ndarray]) -> Norms:
    """L2 norm of every tensor, accumulated in float64 (values of 1e20 do not overflow)."""
    return {name: float(np.linalg.norm(np.asarray(a, dtype=np.float64).ravel())) for name, a in tensors.items()}


@functools.lru_cache(maxsize=8192)
def _blob_norms(path: str) -> tuple[tuple[str, float], ...]:
    """Norms of a stored adapter blob (content-addressed, so immutable: cached per process)."""
    return tuple(tensor_norms(load_tensors(path)).items())


def fleet_norms(state: ServerState, db: Session, bundle_id: str) -> list[tuple[str, Norms]]:
    """(adapter_sha256, norms) of the accepted device patches of the bundle and its siblings, newest first, one per
    distinct adapter (the adapter and trajectory uploads of one run count once)."""
    rows = db.execute(select(Patch.adapter_sha256, Patch.adapter_blob)
                      .where(Patch.bundle_id.in_(group_ids(db, bundle_id)), Patch.kind != "global")
                      .order_by(Patch.created.desc()).limit(FLEET_WINDOW)).all()
    seen: set[str] = set()
    out = []
    for adapter_sha, blob in rows:
        if adapter_sha not in seen:
            seen.add(adapter_sha)
            out.append((adapter_sha, dict(_blob_norms(str(state.blobs.path(blob))))))
    return out


def value_problem(tensors: dict[str, np.ndarray], max_abs: float) -> str | None:
    if max_abs <= 0:
        return None
    for name, a in tensors.items():
        peak = peak_abs(a)
        if peak > max_abs:
            return (f"tensor {name!r} has a value of {peak:.3g}, beyond the server's bound of ±{max_abs:g} "
                    "(ZOEDGE_MAX_TENSOR_ABS)")
    return None


def norm_problem(norms: Norms, fleet: list[Norms], ratio: float, min_patches: int) -> str | None:
    """The tensor whose norm is furthest beyond `ratio` x its fleet median, described; None if none is."""
    if ratio <= 0 or len(fleet) < max(1, min_patches):
        return None
    worst = None
    for name, norm in norms.items():
        values = [f[name] for f in fleet if name in f]
        if len(values) < max(1, min_patches):
            continue
        median = float(np.median(values))
        if median > 0 and norm > ratio * median and (worst is None or norm / median > worst[0]):
            worst = (norm / median, name, norm, median, len(values))
    if worst is None:
        return None
    r, name, norm, median, k = worst
    return (f"tensor {name!r} has norm {norm:.3g}, {r:.3g}x the median {median:.3g} of the bundle's {k} accepted "
            f"patches (limit {ratio:g}x, ZOEDGE_MAX_NORM_RATIO)")


def check_tensors(settings: Settings, tensors: dict[str, np.ndarray], fleet: list[tuple[str, Norms]],
                  where: str, adapter_sha256: str = "") -> None:
    """Refuse (ZoedgeError, one line prefixed by `where`) tensors beyond the bounds; the patch's own adapter
    (adapter_sha256) is left out of the fleet it is compared with."""
    problem = value_problem(tensors, settings.max_tensor_abs) or norm_problem(
        tensor_norms(tensors), [n for sha, n in fleet if sha != adapter_sha256], settings.max_norm_ratio,
        settings.norm_ratio_min_patches)
    if problem:
        raise ZoedgeError(f"{where}: {problem}")
