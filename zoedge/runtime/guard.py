"""The divergence guard: decides whether a step's losses and the tensors after its update can be trusted.

A step's losses evaluate the state the previous update left (θ ± εz), so a loss blow-up blames an earlier
update; the tensors are checked right after every update. On either kind of failure the loop restores the last
snapshot (a state whose losses already passed, or that scored a new best) and retries with a smaller learning
rate, cut harder the more often it fails in a row. It stops with a one-line error that names the cause:
a state that fails before any update is corrupt; a run that keeps failing however small the steps get has a
step size (lr / eps) too large for the bundle. A run that recovers only at a tiny fraction of its lr stops there,
keeping what it has (keep-best or last, as for patience): its further steps could not move the tensors.
"""

from __future__ import annotations

import math

import numpy as np

from zoedge.constants import (
    HARD_BATCH_RETRIES, LOSS_BLOWUP_FACTOR, LR_CUT_FLOOR, MAX_FAILED_ROLLBACKS, TENSOR_ABS_LIMIT, TENSOR_GROWTH_LIMIT,
)
from zoedge.errors import ZoedgeError
from zoedge.runtime.state import RunState
from zoedge.runtime.tensors import peak_abs

NONFINITE_LOSS = "non-finite loss"


def tensor_limits(origin: dict[str, np.ndarray]) -> dict[str, float]:
    """Per tensor: the largest |value| a healthy run may reach, from the tensors it started with."""
    return {k: max(TENSOR_ABS_LIMIT, TENSOR_GROWTH_LIMIT * peak_abs(v))
            for k, v in origin.items()}


def tensor_problem(tensors: dict[str, np.ndarray], limits: dict[str, float]) -> str | None:
    """Why these tensors cannot be trusted (NaN / Inf, or a value beyond its limit), or None."""
    for name, t in tensors.items():
        peak = peak_abs(t)  # no temporary: this runs after every update
        if not math.isfinite(peak):
            return f"tensor {name!r} holds NaN or Inf"
        if peak > limits[name]:
            return f"tensor {name!r} reached |value| {peak:.3g} (limit {limits[name]:.3g})"
    return None


def loss_problem(losses: list[float], grads: list[float], state: RunState, objective: str) -> str | None:
    """Why this step's losses say the state diverged, or None. A finite blow-up seen HARD_BATCH_RETRIES times
    at the same step, each time with a smaller lr behind it, is a hard batch rather than a divergence, and stays
    one (state.hard_steps): a later failure that rolls back before it must not start its retries again (two such
    steps after one snapshot used to roll back in turn forever, the lr cut to nothing)."""
    if not all(math.isfinite(x) for x in losses + grads):
        return NONFINITE_LOSS
    ref = state.loss_floor
    if ref is None or objective in ("accuracy", "f1"):
        return None
    low = min(losses)
    if low <= LOSS_BLOWUP_FACTOR * abs(ref) + 1.0:
        return None
    if state.step + 1 in state.hard_steps:
        return None
    if state.fail_step == state.step + 1 and state.fail_count >= HARD_BATCH_RETRIES:
        state.hard_steps.append(state.step + 1)
        return None
    return f"loss {low:.4g} against a running mean of {ref:.4g}"


def after_failure(state: RunState, snap: RunState, failed_step: int, problem: str, lr: float) -> str:
    """Roll state back to snap and cut the lr; returns the log line, or raises the guard's one-line error.

    state.step is still failed_step - 1 (the failing step has not been recorded). A non-finite loss on the
    snapshot's own tensors, twice in a row, is a corrupt state: no learning rate can fix it."""
    repeat = state.fail_step == failed_step
    if problem == NONFINITE_LOSS and state.step == snap.step and repeat:
        raise ZoedgeError(f"the state at step {snap.step} gives a {problem} before any update, twice: the bundle, "
                          "checkpoint or data is corrupt (not the step size)")
    state.fail_count = state.fail_count + 1 if repeat else 1
    state.fail_step = failed_step
    state.failed_rollbacks += 1
    state.rollbacks += 1
    if state.failed_rollbacks > MAX_FAILED_ROLLBACKS:
        raise ZoedgeError(f"training diverged {state.failed_rollbacks} times in a row after step {snap.step} "
                          f"(last: {problem} at step {failed_step}) with the learning rate already cut to {lr:.3g}: "
                          f"the step size is too large for this bundle; try --lr {lr / 10:.1g} or a smaller --eps")
    state.lr_scale *= 0.5 ** state.failed_rollbacks
    state.restore(snap)
    return (f"divergence guard: {problem} at step {failed_step}; rolled back to step {snap.step}, "
            f"lr x{state.lr_scale:.3g}")


def passed(state: RunState) -> str | None:
    """A step got through past the last failure: the next failure starts a new series. If the lr it took is below
    LR_CUT_FLOOR of the set one, the run is done; returns the line that says so."""
    if state.failed_rollbacks and state.step > state.fail_step:
        state.failed_rollbacks = 0
        if state.lr_scale < LR_CUT_FLOOR:
            state.done = True
            return (f"divergence guard: past step {state.fail_step} only with the lr cut to x{state.lr_scale:.3g} "
                    f"after {state.rollbacks} rollbacks; stopping at step {state.step}, as steps this small no "
                    "longer move the tensors")
    return None
