"""`zoedge train`: zeroth-order fine-tuning of a bundle's trainable inputs on local data -> a patch.

One step, top to bottom: learning rate -> minibatch -> for each perturbation: +εz, forward, -2εz, forward, +εz
-> the guard checks the losses -> snapshot / checkpoint of the state they verified -> update -> the guard checks
the tensors -> record the step -> eval (and keep the best) -> log -> stop. The whole run state is one
`RunState`: the guard rolls back to a snapshot of it, a checkpoint is it on disk, and resume loads it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from zoedge.constants import SNAPSHOT_EVERY
from zoedge.runtime.checkpoint import CHECKPOINT_FILE
from zoedge.runtime.config import TrainConfig, lr_at
from zoedge.runtime.evaluator import score
from zoedge.runtime.finish import finished, gate_kept_step, write_result
from zoedge.runtime.guard import after_failure, loss_problem, passed, tensor_problem
from zoedge.runtime.head_grad import ce_head_step
from zoedge.runtime.memory import peak_rss_mb
from zoedge.runtime.prior import check_unlabelled
from zoedge.runtime.setup import Run, open_out, open_run
from zoedge.runtime.state import RunState
from zoedge.runtime.zo import clip_grads, update


def batch_indices(run_seed: int, step: int, n: int, batch: int) -> np.ndarray:
    """The step's minibatch, a pure function of (seed, step): resume needs no data-order state."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([run_seed, step, 0x5EED])))
    return rng.choice(n, size=min(batch, n), replace=False)


def record_step(state: RunState, step: int, losses: list[float], grads: list[float], lr: float) -> dict:
    """The step passed both guards: it enters the trajectory and the guard's running loss; its log record."""
    loss = float(np.mean(losses))
    state.trajectory[step - 1] = [*grads, lr]
    state.step = step
    state.loss_ref = loss if state.loss_ref is None else 0.95 * state.loss_ref + 0.05 * loss
    state.loss_floor = state.loss_ref if state.loss_floor is None else min(state.loss_floor, state.loss_ref)
    return {"step": step, "loss": loss, "lr": lr, "projected_grad": float(np.mean(grads))}


def evaluate_step(run: Run, step: int, record: dict) -> bool:
    """Eval into the record and the history; True when it is a new best (its tensors are kept)."""
    state = run.state
    te = time.perf_counter()
    metrics = run.evaluator(run.eval_set)
    record.update({f"eval_{k}": v for k, v in metrics.items()}, eval_seconds=time.perf_counter() - te)
    state.history.append({k: v for k, v in record.items() if k != "eval_seconds"})
    if state.best_score is None or score(metrics, run.cfg.select) > state.best_score:
        state.best_score, state.best_step, state.evals_since_best = score(metrics, run.cfg.select), step, 0
        state.best = {k: v.copy() for k, v in run.tensors.items()}
        return True
    state.evals_since_best += 1
    return False


def train(bundle_dir: str | Path, data: str | Path, out: str | Path, cfg: TrainConfig, eval_path: str | Path | None = None,
          resume: bool = False, on_step: Callable[[dict], None] | None = None, log: Callable[[str], None] = print,
          unlabelled: str | Path | None = None) -> dict:
    """Train and write the patch to `out`. resume=True continues the checkpoint in `out` if there is one, and
    otherwise starts fresh (so one fixed command line survives a kill at any moment). unlabelled: the device's
    unlabelled texts, whose estimated label prior the head's bias takes at the end (runtime/prior.py)."""
    t0 = time.perf_counter()
    bundle, cfg, out, mode = open_out(bundle_dir, out, cfg, resume, log)
    if mode == "finished":
        return finished(out, bundle.manifest, cfg, log)
    check_unlabelled(bundle.manifest, cfg.head_lr, unlabelled)
    run = open_run(bundle, cfg, out, mode, data, eval_path, log)
    state, tensors, head, train_set = run.state, run.tensors, run.head, run.train_set

    # ---- the loop ---------------------------------------------------------------------------------------------
    snap = state.snapshot()
    while state.step < cfg.steps and not state.done:
        step = state.step + 1
        lr = float(np.float32(lr_at(cfg, step) * state.lr_scale))
        idx = batch_indices(cfg.seed, step, len(train_set.texts), state.batch)
        ids, mask = train_set.batch(bundle.encoder, idx)
        y = train_set.labels[idx] if train_set.labels is not None else None
        # a snapshot is taken before the in-place perturbations (their round-off belongs to this step) and
        # kept only once this step's losses have verified the state it holds
        checkpoint_due = cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.step > 0
        candidate = state.snapshot() if state.step % SNAPSHOT_EVERY == 0 or checkpoint_due else None
        losses, grads = run.estimate(step, ids, mask, y)
        problem = loss_problem(losses, grads, state, cfg.objective)
        if problem:
            log(after_failure(state, snap, step, problem, lr))
            continue
        if candidate is not None:
            snap = candidate
            if checkpoint_due:
                candidate.save(out)
        grads = clip_grads(grads, cfg.clip)
        update(run.moving, run.opt, run.zo_cfg, run.roles, run.dirs, cfg.seed, step, grads, lr)
        if head:  # the mean of the ± forwards' features is the unperturbed one to O(ε²)
            ce_head_step(run.estimate.head_features(), y, tensors[head[0]], head[1] and tensors[head[1]],
                         lr / cfg.lr * cfg.head_lr)
        problem = tensor_problem(run.checked, run.limits)
        if problem:
            log(after_failure(state, snap, step, problem, lr))
            continue
        record = record_step(state, step, losses, grads, lr)
        if stop := passed(state):
            log(stop)
        if run.eval_set is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            if evaluate_step(run, step, record):
                snap = state.snapshot()  # a rollback never goes back past the best: its trajectory stays valid
            if cfg.patience and state.evals_since_best >= cfg.patience:
                state.done = True
                log(f"early stop at step {step}: no eval improvement in {cfg.patience} evals")
        if on_step:
            on_step({**record, "total": cfg.steps, "rss_mb": peak_rss_mb()})

    # ---- the patch ----------------------------------------------------------------------------------------------
    state.done = True
    gate_kept_step(run, log)
    if cfg.checkpoint_every:
        state.save(out)  # a kill while the patch is written resumes here, not from an older checkpoint
    result = write_result(run, t0, unlabelled, log)
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return result
