"""What zoedge puts in Flower's records (flwr.app ArrayRecord / ConfigRecord / MetricRecord), for both apps.

The model the ServerApp sends, and the update a device sends back, is one ArrayRecord:

* mode "seed-pool": {"coefficients": float32 (K,), "start/<trainable>": the head start, ...}: θ = θ0 − Σ_j c_j z_j
  over the bundle's seed pool (zoedge.runtime.seedpool), θ0 = the bundle's initial trainables with the start laid
  over them. The train ConfigRecord carries the pool ("seed-pool-id", "seed-pool-k") and the digest of the
  global's rebuild ("adapter-sha256"); a device rebuilds it, and refuses to train when its digest differs.
* mode "fedavg": {<trainable name>: tensor} in manifest order (the adapter: LoRA A/B, head, ...).

A device's reply also has a MetricRecord (METRICS: "num-examples", the FedAvg weight, and timings) and a
ConfigRecord (PATCH: "adapter-sha256" of its patch, so the server checks its own rebuild against the device's).
Both apps write what they hold as ordinary zoedge patch directories (runtime.patch.write_patch), so
`zoedge eval --patch`, `zoedge patch replay` and a zoedge server read them as they read any other patch.
numpy + zoedge.runtime + flwr.app only: the ClientApp imports this module (no torch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from zoedge.errors import ZoedgeError
from zoedge.patchdoc import PatchDoc
from zoedge.runtime import seedpool
from zoedge.runtime.bundle import Bundle, check_trainables
from zoedge.runtime.patch import write_patch
from zoedge.runtime.zo import ZOConfig

MODES = ("seed-pool", "fedavg")
ARRAYS = "arrays"  # the ArrayRecord's key in a message (Flower's FedAvg default)
CONFIG = "config"  # the ConfigRecord of a train / evaluate instruction
METRICS = "metrics"  # the MetricRecord of a reply
PATCH = "patch"  # the ConfigRecord of a train reply: the device patch's adapter-sha256
WEIGHT = "num-examples"  # FedAvg's weight key (Flower's default weighted_by_key)
COEFFICIENTS = "coefficients"
START = "start/"


def seed_pool_record(coefficients: np.ndarray, start: dict[str, np.ndarray]) -> ArrayRecord:
    items = {COEFFICIENTS: Array(np.ascontiguousarray(coefficients, dtype=np.float32))}
    items.update({START + name: Array(np.ascontiguousarray(t, dtype=np.float32)) for name, t in start.items()})
    return ArrayRecord(items)


def read_seed_pool(record: ArrayRecord, bundle: Bundle, k: int, where: str) -> tuple[np.ndarray, dict]:
    """(coefficients, start) of a seed-pool ArrayRecord, checked against the bundle (one-line ZoedgeError)."""
    if COEFFICIENTS not in record:
        raise ZoedgeError(f"{where}: no {COEFFICIENTS!r} array (is the ServerApp in seed-pool mode?)")
    c = record[COEFFICIENTS].numpy()
    if c.dtype != np.float32 or c.shape != (k,) or not np.all(np.isfinite(c)):
        raise ZoedgeError(f"{where}: {COEFFICIENTS!r} must hold {k} finite float32 numbers "
                          f"(got {c.dtype} {list(c.shape)})")
    shapes = {t.name: list(t.shape) for t in bundle.manifest.trainables}
    start = {}
    for key in record:
        if key == COEFFICIENTS:
            continue
        name = key[len(START):]
        a = record[key].numpy()
        if not key.startswith(START) or shapes.get(name) != list(a.shape) or not np.all(np.isfinite(a)):
            raise ZoedgeError(f"{where}: {key!r} is no start tensor of this bundle's trainables")
        start[name] = np.ascontiguousarray(a, dtype=np.float32).copy()
    return c.copy(), start


def tensors_record(tensors: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(t, dtype=np.float32)) for name, t in tensors.items()})


def read_tensors(record: ArrayRecord, bundle: Bundle, where: str) -> dict[str, np.ndarray]:
    """The trainables of an adapter ArrayRecord: the bundle's names and shapes, float32, finite, manifest order."""
    return check_trainables(bundle.manifest, {k: record[k].numpy() for k in record}, where)


def seed_pool_meta(bundle: Bundle, k: int, roles: list[str] | None) -> dict:
    return {"seed_pool_id": seedpool.pool_id(bundle.manifest), "seed_pool_k": k,
            "zo": ZOConfig(roles=roles).to_dict()}


def write_seed_pool_patch(out: Path, bundle: Bundle, coefficients: np.ndarray, start: dict[str, np.ndarray],
                          roles: list[str] | None, **meta) -> PatchDoc:
    """The seed-pool patch of (coefficients, start) at `out`: its adapter is the rebuild θ0 − Σ_j c_j z_j (j
    ascending, float32, in place: the arithmetic of the trainer, the zoedge server and `zoedge patch replay`).
    meta: further PatchDoc fields (kind, version, examples, run_seed, ...)."""
    m = bundle.manifest
    tensors = {**bundle.initial_trainables(), **{n: v.copy() for n, v in start.items()}}
    zo = ZOConfig(roles=roles)
    seedpool.rebuild(zo.select(tensors, {t.name: t.role for t in m.trainables}), seedpool.pool_id(m), coefficients)
    fields = {"steps": 0, "run_seed": 0, **meta, **seed_pool_meta(bundle, len(coefficients), roles)}
    return write_patch(Path(out), m, tensors, np.zeros((0, zo.perturbations + 1), np.float32), start, fields,
                       coefficients)


def write_adapter_patch(out: Path, bundle: Bundle, tensors: dict[str, np.ndarray], **meta) -> PatchDoc:
    """A global adapter (FedAvg) as a patch: its tensors and an empty trajectory, as the zoedge server writes one."""
    zo = ZOConfig()
    fields = {"kind": "global", "steps": 0, "run_seed": 0, "zo": zo.to_dict(), **meta}
    return write_patch(Path(out), bundle.manifest, tensors, np.zeros((0, zo.perturbations + 1), np.float32), {},
                       fields)
