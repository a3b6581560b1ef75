"""Issue 14: the ZO update without per-step full-size temporaries must stay bit-identical to the update it
replaced. `reference_update` below is that update, copied verbatim from zoedge/runtime/zo.py as it was
before the change (commit c91be58); it is the specification here, so do not "tidy" it.

Bit-identical means byte-identical (`tobytes`), not `array_equal`: a projected gradient of exactly 0 (L+ == L-,
common on quantized bundles) makes g*z a signed zero, and `0 + (-0)` is +0 -- an in-place rewrite that skips
the zero buffer would leave -0 behind, which `array_equal` cannot see.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from zoedge.runtime.zo import (
    NO_DECAY_ROLES, DirectionCache, OptimizerState, ZOConfig, perturbation_cycle, replay, update,
)


def reference_update(tensors, state, cfg, roles, dirs, run_seed, step, grads, lr):
    """zoedge.runtime.zo.update at c91be58, verbatim (the body; only the name differs)."""
    q = len(grads)
    lr32, wd = np.float32(lr), np.float32(cfg.weight_decay)
    # d = (1/q) Σ g_i z_i, accumulated per tensor; for q = 1 no buffer is needed with SGD.
    if cfg.optimizer == "zo-sgd" and q == 1:
        g = np.float32(grads[0])
        for name, z in dirs(run_seed, step, 0):
            t = tensors[name]
            if wd and roles.get(name) not in NO_DECAY_ROLES:
                t -= lr32 * (g * z + wd * t)
            else:
                t -= lr32 * (g * z)
        state.step = step
        return
    d = {name: np.zeros_like(t) for name, t in tensors.items()}
    inv_q = np.float32(1.0 / q)
    for i, g in enumerate(grads):
        g32 = np.float32(g) * inv_q
        for name, z in dirs(run_seed, step, i):
            d[name] += g32 * z
    for name, t in tensors.items():
        di = d[name]
        if wd and roles.get(name) not in NO_DECAY_ROLES:
            di += wd * t
        if cfg.optimizer == "zo-sgd":
            t -= lr32 * di
        elif cfg.optimizer == "zo-momentum":
            m = state.buffers.setdefault(f"m_{name}", np.zeros_like(t))
            m *= np.float32(cfg.momentum)
            m += di
            t -= lr32 * m
        elif cfg.optimizer == "zo-adam":
            b1, b2 = np.float32(cfg.momentum), np.float32(cfg.beta2)
            m = state.buffers.setdefault(f"m_{name}", np.zeros_like(t))
            v = state.buffers.setdefault(f"v_{name}", np.zeros_like(t))
            m *= b1
            m += (np.float32(1) - b1) * di
            v *= b2
            v += (np.float32(1) - b2) * di * di
            k = step  # steps are numbered from 1
            mhat = m / np.float32(1 - float(b1) ** k)
            vhat = v / np.float32(1 - float(b2) ** k)
            t -= lr32 * mhat / (np.sqrt(vhat) + np.float32(cfg.adam_eps))
        else:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    state.step = step


ROLES = {"q.lora_A": "lora_A", "q.lora_B": "lora_B", "v.lora_A": "lora_A", "v.lora_B": "lora_B",
         "head.weight": "head", "head.bias": "bias"}
SEED = 7
# steps 1 and 3 have projected gradients of exactly 0 (L+ == L-): g*z is then a signed zero, and on a tensor
# entry that is -0 (LoRA B starts at zero) the sign of the zero update decides the sign of the entry
GRADS = [[0.0, 0.0, 0.0], [-2.0, 0.5, 1.0], [0.0, 0.0, 0.0], [3.25, -0.125, 0.5], [-0.5, 2.0, -1.0]]
LRS = [1e-2, 5e-3, 1e-2, 2e-3, 1e-2]
CASES = [(opt, q, wd) for opt, qs in (("zo-sgd", (1, 3)), ("zo-momentum", (1, 2)), ("zo-adam", (1, 2)))
         for q in qs for wd in (0.0, 0.01)]


def start_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    shapes = {"q.lora_A": (8, 24), "q.lora_B": (24, 8), "v.lora_A": (8, 24), "v.lora_B": (24, 8),
              "head.weight": (2, 24), "head.bias": (2,)}
    t = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    t["q.lora_B"][:4] = 0.0  # LoRA B starts at zero: exact zeros of either sign are the edge case
    t["q.lora_B"][4:8] = -0.0
    t["v.lora_B"][:4] = -0.0
    t["head.bias"][1] = -0.0
    return t


def same_bytes(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def run(update_fn, optimizer: str, q: int, wd: float, keep: bool, cycle: bool, after_step=None):
    """Five steps of update_fn (with the in-place perturbation cycles before each when cycle) from start_tensors;
    after_step(tensors, state) is called after every update."""
    cfg = ZOConfig(optimizer=optimizer, perturbations=q, weight_decay=wd, eps=1e-2)
    tensors = start_tensors()
    dirs = DirectionCache([(n, t.shape) for n, t in tensors.items()], keep=keep)
    state = OptimizerState()
    for k, (grads, lr) in enumerate(zip(GRADS, LRS)):
        step = k + 1
        if cycle:
            for i in range(q):
                perturbation_cycle(tensors, dirs, SEED, step, i, cfg.eps)
        update_fn(tensors, state, cfg, ROLES, dirs, SEED, step, grads[:q], lr)
        if after_step:
            after_step(tensors, state)
    return tensors, state


def copies(seen: list):
    return lambda tensors, state: seen.append(({k: v.copy() for k, v in tensors.items()},
                                               {k: v.copy() for k, v in state.buffers.items()}))


@pytest.mark.parametrize("keep", [True, False], ids=["keep-z", "regen-z"])
@pytest.mark.parametrize("optimizer,q,wd", CASES)
def test_update_is_bit_identical_to_the_reference(optimizer, q, wd, keep):
    """After every step (a signed zero left by a zero-gradient step is washed out by the next one)."""
    ref_steps, new_steps = [], []
    _, ref_s = run(reference_update, optimizer, q, wd, keep, cycle=False, after_step=copies(ref_steps))
    _, new_s = run(update, optimizer, q, wd, keep, cycle=False, after_step=copies(new_steps))
    assert len(ref_steps) == len(new_steps) == len(GRADS)
    for (ref_t, ref_b), (new_t, new_b) in zip(ref_steps, new_steps):
        same_bytes(ref_t, new_t)
        same_bytes(ref_b, new_b)  # same keys in the same order: the checkpoint's optimizer group
    assert new_s.step == ref_s.step == len(GRADS)
    assert not np.array_equal(ref_steps[-1][0]["q.lora_A"], start_tensors()["q.lora_A"])  # it did move


@pytest.mark.parametrize("optimizer,q,wd", CASES)
def test_replay_of_the_trajectory_is_bit_identical_to_the_in_place_run(optimizer, q, wd):
    """The trainer's order (q perturbation cycles, then the update) against zo.replay of rows [g_1..g_q, lr],
    and both against the reference update."""
    ref_t, _ = run(reference_update, optimizer, q, wd, keep=True, cycle=True)
    live_t, live_s = run(update, optimizer, q, wd, keep=True, cycle=True)
    same_bytes(ref_t, live_t)
    traj = np.array([[*g[:q], lr] for g, lr in zip(GRADS, LRS)], np.float32)
    cfg = ZOConfig(optimizer=optimizer, perturbations=q, weight_decay=wd, eps=1e-2)
    replayed = start_tensors()
    rep_s = replay(replayed, cfg, ROLES, SEED, traj)
    same_bytes(live_t, replayed)
    same_bytes(live_s.buffers, rep_s.buffers)


def test_scratch_is_not_optimizer_state():
    """The scratch buffers are neither checkpointed (they are not in `buffers`, the checkpoint's optimizer
    group) nor counted in optimizer_state_bytes; they are a few buffers the size of the largest moved tensor
    (d, one temporary, and the q regenerated z), not a copy of all of them."""
    _, state = run(update, "zo-adam", 2, 0.01, keep=True, cycle=False)
    tensors = start_tensors()
    assert set(state.buffers) == {f"{p}_{n}" for n in tensors for p in ("m", "v")}
    assert state.nbytes() == 2 * sum(t.nbytes for t in tensors.values())
    assert 0 < state.scratch_nbytes() <= (2 + 2) * max(t.nbytes for t in tensors.values())


@pytest.mark.parametrize("keep", [True, False], ids=["keep-z", "regen-z"])
@pytest.mark.parametrize("optimizer,q", [("zo-sgd", 1), ("zo-sgd", 3), ("zo-momentum", 1), ("zo-adam", 2)])
def test_a_step_allocates_no_full_size_temporaries(optimizer, q, keep):
    """After the first update (which sizes the scratch) an update allocates nothing tensor-sized, whether the
    step's z is kept or regenerated: tracemalloc's peak stays below one moved tensor's bytes."""
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal((64, 64)).astype(np.float32) for i in range(4)}
    roles = {n: "lora_A" for n in tensors}
    cfg = ZOConfig(optimizer=optimizer, perturbations=q, weight_decay=0.01)
    dirs = DirectionCache([(n, t.shape) for n, t in tensors.items()], keep=keep)
    state = OptimizerState()
    for step in (1, 2):
        list(dirs(SEED, step, q - 1))  # the perturbation cycles leave the last z kept (when kept at all)
        tracemalloc.start()
        update(tensors, state, cfg, roles, dirs, SEED, step, [0.5, -0.25, 1.0][:q], 1e-3)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 64 * 64 * 4, peak
