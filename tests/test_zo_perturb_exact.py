"""Issue 14: the in-place perturbations and the batched copies without per-tensor temporaries must stay
bit-identical to the expressions they replaced. `reference_perturb` / `reference_cycle` and
`reference_load_perturbations` below are those, copied verbatim from zoedge/runtime/zo.py and forward.py as
they were before the change (commit cf035df); they are the specification here, so do not "tidy" them.
Byte equality (`tobytes`), signed zeros included, as in tests/test_zo_update_exact.py."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from test_zo_update_exact import GRADS, LRS, ROLES, SEED, same_bytes, start_tensors
from zoedge.runtime.forward import BoundForward
from zoedge.runtime.zo import DirectionCache, OptimizerState, ZOConfig, perturbation_cycle, replay, update


def reference_perturb(tensors, z, scale):
    """zoedge.runtime.zo.perturb at cf035df, verbatim (the body; only the name differs)."""
    s = np.float32(scale)
    for name, zi in z:
        t = tensors[name]
        t += s * zi


def reference_cycle(tensors, dirs, run_seed, step, i, eps, loss_at=None):
    """zoedge.runtime.zo.perturbation_cycle at cf035df, verbatim but for the perturb it calls."""
    reference_perturb(tensors, dirs(run_seed, step, i), eps)
    lp = loss_at() if loss_at else 0.0
    reference_perturb(tensors, dirs(run_seed, step, i), -2 * eps)
    lm = loss_at() if loss_at else 0.0
    reference_perturb(tensors, dirs(run_seed, step, i), eps)
    return lp, lm


def reference_load_perturbations(self, directions, eps):
    """zoedge.runtime.forward.BoundForward.load_perturbations at cf035df, verbatim."""
    s = np.float32(eps)
    for i, z in enumerate(directions):
        for name, theta in self.trainables.items():
            if name in z:
                np.add(theta, s * z[name], out=self.buffers[name][2 * i])
                np.subtract(theta, s * z[name], out=self.buffers[name][2 * i + 1])
            else:
                self.buffers[name][2 * i] = theta
                self.buffers[name][2 * i + 1] = theta


def train(cycle, q: int, keep: bool, seen: list):
    """Five steps (q perturbation cycles, recording the tensors at +εz and -εz, then the update)."""
    cfg = ZOConfig(optimizer="zo-adam", perturbations=q, weight_decay=0.01, eps=1e-2)
    tensors = start_tensors()
    dirs = DirectionCache([(n, t.shape) for n, t in tensors.items()], keep=keep)
    state = OptimizerState()
    snap = lambda: seen.append({k: v.copy() for k, v in tensors.items()}) or 0.0  # noqa: E731
    for k, (grads, lr) in enumerate(zip(GRADS, LRS)):
        for i in range(q):
            cycle(tensors, dirs, SEED, k + 1, i, cfg.eps, loss_at=snap)
        seen.append({k: v.copy() for k, v in tensors.items()})  # after the cycles: the round-off of ±εz
        update(tensors, state, cfg, ROLES, dirs, SEED, k + 1, grads[:q], lr)
    return tensors, cfg


@pytest.mark.parametrize("keep", [True, False], ids=["keep-z", "regen-z"])
@pytest.mark.parametrize("q", [1, 3])
def test_perturbation_cycle_is_bit_identical_to_the_reference(q, keep):
    """At θ+εz, at θ-εz and after every cycle, for five steps; then zo.replay (perturb without a forward)
    of the trajectory against the reference run."""
    ref_seen, new_seen = [], []
    ref_t, cfg = train(reference_cycle, q, keep, ref_seen)
    new_t, _ = train(perturbation_cycle, q, keep, new_seen)
    assert len(ref_seen) == len(new_seen) == len(GRADS) * (2 * q + 1)
    for a, b in zip(ref_seen, new_seen):
        same_bytes(a, b)
    same_bytes(ref_t, new_t)
    traj = np.array([[*g[:q], lr] for g, lr in zip(GRADS, LRS)], np.float32)
    replayed = start_tensors()
    replay(replayed, cfg, ROLES, SEED, traj)
    same_bytes(ref_t, replayed)


@pytest.mark.parametrize("keep", [True, False], ids=["keep-z", "regen-z"])
def test_a_perturbation_allocates_less_than_a_tensor(keep):
    """After the first cycle (which sizes the scratch) a cycle allocates nothing tensor-sized, whether z is
    kept or regenerated: tracemalloc's peak stays below one moved tensor's bytes."""
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal((64, 64)).astype(np.float32) for i in range(4)}
    dirs = DirectionCache([(n, t.shape) for n, t in tensors.items()], keep=keep)
    perturbation_cycle(tensors, dirs, SEED, 1, 0, 1e-3)
    for step in (2, 3):
        list(dirs(SEED, step, 0))  # a kept z is generated once per step (not what is measured here)
        tracemalloc.start()
        perturbation_cycle(tensors, dirs, SEED, step, 0, 1e-3)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 64 * 64 * 4, peak


class _Copies:
    """What load_perturbations reads and writes of a BoundForward (no session needed)."""

    def __init__(self, trainables, copies):
        self.trainables = trainables
        self.buffers = {k: np.full((copies, *v.shape), np.nan, np.float32) for k, v in trainables.items()}


@pytest.mark.parametrize("q", [1, 2])
def test_load_perturbations_is_bit_identical_to_the_reference(q):
    """Every copy θ ± εz_i, with a tensor that has no direction (left at θ) and exact zeros of either sign."""
    theta = start_tensors()
    dirs = DirectionCache([(n, t.shape) for n, t in theta.items() if n != "head.bias"], keep=False)
    for step in (1, 2):
        directions = [dict(dirs(SEED, step, i)) for i in range(q)]
        directions[0]["q.lora_B"][:2] = -0.0
        ref, new = _Copies(theta, 2 * q), _Copies(theta, 2 * q)
        reference_load_perturbations(ref, directions, 1e-2)
        BoundForward.load_perturbations(new, directions, 1e-2)
        same_bytes(ref.buffers, new.buffers)
        assert not np.isnan(new.buffers["head.bias"]).any()
