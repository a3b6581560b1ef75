"""Seed-pool ZO (`zoedge train --seed-pool K`; FedKSeed, arXiv 2312.06353): every direction of a run comes from a
pool of K seeds that every device of a fleet shares, so a zo-sgd run's whole update is K numbers (numpy only).

* The pool: id = `pool_id(manifest)`, 52 bits of sha256 over the bundle's initial_sha256 and its trainable names
  and shapes in manifest order. Every device (and every re-export or sibling bundle) that starts from the same
  tensors derives the same pool offline, with nothing to publish; a patch rebuilds only on such a bundle. K is
  --seed-pool; the fleet server takes K = zoedge.constants.SEED_POOL_K.
* Step s, perturbation i draws seed j = `pool_index(run_seed, s, i, K)` (the first 64-bit word of
  SeedSequence([run_seed, s, i, INDEX_TAG]).generate_state, mod K), and its direction is
  z_j = PCG64(SeedSequence([pool_id, j])).standard_normal(float32), tensor by tensor over the moved trainables in
  manifest order.
* With zo-sgd and no weight decay a run's update is θ = θ0 − Σ_s lr_s (1/q) Σ_i g_si z_j(s,i) = θ0 − Σ_j c_j z_j:
  `coefficients` accumulates c_j += lr_s · (g_si · 1/q) in float32, steps ascending, then i ascending, from the
  trajectory rows the run kept (a rolled-back step's row is gone, so is its contribution).
* `rebuild`: from θ0 (the bundle's initial trainables overlaid with the patch's start.safetensors), for j = 0..K-1
  with c_j != 0, in that order: t -= c_j * z_j, float32, in place (a zero coefficient is no term of the sum).
  Training applied its steps in step order, interleaved with the perturbations' round-off, so its live tensors
  differ from this by float32 round-off: the patch's adapter is the rebuild (the trainer rebuilds at the end), and
  so are the server's and every device's copies, bit for bit.
* Aggregation: the global vector is `weighted_mean` of the devices' vectors (weights = examples; float64, then
  float32), and their head starts are averaged the same way: the rebuild is linear in (θ0, c), so the global
  tensors are the devices' FedAvg up to round-off.
* The next round (`--seed-pool-from GLOBAL`, `continue_from`): a device starts at the global's tensors (its start
  laid over the bundle's initial values, rebuilt from its vector, checked against its adapter_sha256) and keeps
  its start; its coefficients start from the global's vector, so its patch is again θ0 − Σ c_j z_j from the
  bundle and the next aggregate is the global's vector plus the devices' mean steps.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoedge.errors import ZoedgeError
from zoedge.manifest import Manifest
from zoedge.patchdoc import COEFFICIENTS_FILE, PATCH_FILE, START_FILE, PatchDoc
from zoedge.runtime.tensors import load_tensors, tensor_digest
from zoedge.runtime.zo import Scratch, ZOConfig, seeded_directions
from zoedge.transfer import read_patch_doc

INDEX_TAG = 0x5EED9001  # keeps the seed-index stream apart from the minibatch stream (SeedSequence([.., 0x5EED]))
GENERATOR = "numpy.PCG64(SeedSequence([pool_id, j])).standard_normal(float32), j = pool_index(run_seed, step, i, K)"


def pool_id(m: Manifest) -> int:
    """The pool of a bundle: a function of its initial trainables and their layout (names, shapes, order)."""
    spec = [m.initial_sha256, [[t.name, list(t.shape)] for t in m.trainables]]
    return int(hashlib.sha256(json.dumps(spec, separators=(",", ":")).encode()).hexdigest()[:13], 16)


def pool_index(run_seed: int, step: int, i: int, k: int) -> int:
    """The pool seed that step `step`, perturbation i of a run draws, in [0, k)."""
    word = np.random.SeedSequence([run_seed, step, i, INDEX_TAG]).generate_state(1, np.uint64)[0]
    return int(word % np.uint64(k))


@dataclass(frozen=True)
class SeedPool:
    id: int
    k: int

    def entropy(self, run_seed: int, step: int, i: int) -> list[int]:
        """The SeedSequence entropy of z for (run_seed, step, i): runtime.zo.DirectionCache's hook."""
        return [self.id, pool_index(run_seed, step, i, self.k)]


def coefficients(trajectory: np.ndarray, run_seed: int, k: int, q: int, first_step: int = 1,
                 base: np.ndarray | None = None) -> np.ndarray:
    """c (float32, (k,)) of a zo-sgd trajectory of rows [g_1..g_q, lr], accumulated onto a copy of base (the
    vector the run continued; default zeros): θ = θ0 − Σ_j c_j z_j."""
    c = np.zeros(k, np.float32) if base is None else np.array(base, np.float32)
    inv_q = np.float32(1.0 / q)
    for s, row in enumerate(np.asarray(trajectory, dtype=np.float32)):
        lr = row[q]
        for i in range(q):
            j = pool_index(run_seed, first_step + s, i, k)
            c[j] += lr * (row[i] * inv_q)
    return c


def rebuild(tensors: dict[str, np.ndarray], pool: int, c: np.ndarray) -> dict[str, np.ndarray]:
    """θ −= Σ_j c_j z_j in place (j ascending, zero coefficients skipped, float32); tensors: the moved ones,
    in manifest order. Returns tensors."""
    shapes = [(n, tuple(t.shape)) for n, t in tensors.items()]
    work = Scratch()
    for j in np.flatnonzero(c):
        cj = np.float32(c[j])
        for name, z in seeded_directions([pool, int(j)], shapes, out=lambda shape: work("z", shape)):
            tensors[name] -= np.multiply(z, cj, out=work("cz", z.shape))
    return tensors


def weighted_mean(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Σ w_i a_i / Σ w_i, accumulated in float64 in list order, returned as float32 (FedAvg's arithmetic)."""
    acc = np.zeros(arrays[0].shape, dtype=np.float64)
    for a, w in zip(arrays, weights):
        acc += w * a.astype(np.float64)
    return (acc / float(sum(weights))).astype(np.float32)


def check_pool(doc: PatchDoc, m: Manifest, fleet_k: int | None = None, where: str = PATCH_FILE,
               whose: str = "this fleet's pool") -> None:
    """A seed-pool patch's pool must be the bundle's (and hold fleet_k seeds, when given); one-line errors."""
    if doc.seed_pool_id != pool_id(m):
        raise ZoedgeError(f"{where}: seed pool {doc.seed_pool_id} is not this bundle's pool {pool_id(m)} (its "
                          "directions come from other initial trainables)")
    if fleet_k is not None and doc.seed_pool_k != fleet_k:
        raise ZoedgeError(f"{where}: a seed pool of {doc.seed_pool_k} seeds; {whose} has {fleet_k} "
                          f"(train with --seed-pool {fleet_k})")


def load_coefficients(patch_dir: str | Path, k: int) -> np.ndarray:
    """coefficients.npy of a seed-pool patch: k finite float32 numbers, else a one-line ZoedgeError."""
    path = Path(patch_dir) / COEFFICIENTS_FILE
    if not path.is_file():
        raise ZoedgeError(f"{patch_dir}: {COEFFICIENTS_FILE} is missing; cannot rebuild a seed-pool patch")
    try:
        c = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ZoedgeError(f"{patch_dir}: unreadable {COEFFICIENTS_FILE} ({str(e)[:120]})") from None
    if c.dtype != np.float32 or c.shape != (k,) or not np.all(np.isfinite(c)):
        raise ZoedgeError(f"{patch_dir}: {COEFFICIENTS_FILE} must hold {k} finite float32 numbers "
                          f"(got {c.dtype} {list(c.shape)})")
    return c


def average(m: Manifest, initial: dict[str, np.ndarray], patch_dirs: list[Path], docs: list[PatchDoc],
            weights: list[float]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, dict]:
    """The global of seed-pool patches (their directories hold coefficients.npy, start.safetensors if any):
    (tensors, start, coefficients, its PatchDoc seed-pool fields). Coefficients and head starts are
    `weighted_mean`s (a patch without a start of a tensor counts the bundle's initial value); the tensors are
    their rebuild. Patches of different pools or trained tensors (zo.roles) are refused."""
    if any(d.seed_pool_k is None for d in docs):
        raise ZoedgeError("aggregate: seed-pool patches are averaged by their coefficients, not with other patches")
    pools = {(d.seed_pool_id, d.seed_pool_k) for d in docs}
    roles = {json.dumps((d.zo or {}).get("roles")) for d in docs}
    if len(pools) > 1 or len(roles) > 1:
        raise ZoedgeError("aggregate: the seed-pool patches come from different pools or train different roles")
    for d in docs:
        check_pool(d, m, where="aggregate")
    (pool, k), zo = pools.pop(), ZOConfig(roles=json.loads(roles.pop()))
    c = weighted_mean([load_coefficients(p, k) for p in patch_dirs], weights)
    starts = [load_tensors(p / START_FILE) if (p / START_FILE).is_file() else {} for p in patch_dirs]
    start = {n: weighted_mean([s.get(n, v) for s in starts], weights) for n, v in initial.items()
             if any(n in s for s in starts)}
    tensors = {**{n: v.copy() for n, v in initial.items()}, **{n: v.copy() for n, v in start.items()}}
    rebuild(zo.select(tensors, {t.name: t.role for t in m.trainables}), pool, c)
    return tensors, start, c, {"seed_pool_id": pool, "seed_pool_k": k, "zo": zo.to_dict()}


def continue_from(patch_dir: str | Path, m: Manifest, tensors: dict[str, np.ndarray], pool: SeedPool,
                  zo: ZOConfig) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Set the live `tensors` (in place) to the seed-pool patch's, rebuilt from the bundle's initial values;
    (its start tensors, its coefficients). Refused in one line unless it is a patch of this bundle's pool of
    pool.k seeds over the same trained roles whose rebuild gives its adapter_sha256."""
    where = f"--seed-pool-from {patch_dir}"
    doc = read_patch_doc(patch_dir, require_all=False)
    doc.check_fits(m, where)
    if doc.seed_pool_k is None:
        raise ZoedgeError(f"{where}: not a seed-pool patch (no coefficients to continue)")
    check_pool(doc, m, pool.k, where, "this run's pool")
    if (doc.zo or {}).get("roles") != zo.roles:
        raise ZoedgeError(f"{where}: it trained roles {(doc.zo or {}).get('roles')}, this run {zo.roles}")
    c = load_coefficients(patch_dir, pool.k)
    start_path = Path(patch_dir) / START_FILE
    start = {k: v for k, v in (load_tensors(start_path) if start_path.is_file() else {}).items() if k in tensors}
    for k, v in start.items():
        np.copyto(tensors[k], v)
    rebuild(zo.select(tensors, {t.name: t.role for t in m.trainables}), pool.id, c)
    if tensor_digest(tensors) != doc.adapter_sha256:
        raise ZoedgeError(f"{where}: its coefficients do not rebuild the tensors of its adapter_sha256")
    return start, c
