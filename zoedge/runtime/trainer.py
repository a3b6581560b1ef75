"""`zoedge train`: zeroth-order fine-tuning of a bundle's trainable inputs on local data -> a patch.

One step, top to bottom: learning rate -> minibatch -> for each perturbation: +εz, forward, -2εz, forward, +εz
-> the guard checks the losses -> snapshot / checkpoint of the state they verified -> update -> the guard checks
the tensors -> record the step -> eval (and keep the best) -> log -> stop. The whole run state is one
`RunState`: the guard rolls back to a snapshot of it, a checkpoint is it on disk, and resume loads it.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from zoedge.constants import KEEP_Z_BYTES, SNAPSHOT_EVERY
from zoedge.errors import ZoedgeError
from zoedge.manifest import OUTPUT_FEATURES, OUTPUT_LOGITS, OUTPUT_NLL, OUTPUT_TOKENS, Manifest
from zoedge.runtime import objectives
from zoedge.runtime.bundle import Bundle
from zoedge.runtime.checkpoint import CHECKPOINT_FILE
from zoedge.runtime.config import TrainConfig, default_recipe, lr_at, resolve, trajectory_key  # noqa: F401
from zoedge.runtime.evaluator import Dataset, Evaluator, fmt, load_dataset, score  # noqa: F401
from zoedge.runtime.forward import open_forward
from zoedge.runtime.head_grad import ce_head_step, head_names
from zoedge.runtime.guard import after_failure, loss_problem, passed, tensor_limits, tensor_problem
from zoedge.runtime.head_start import head_start
from zoedge.runtime.memory import parse_size, peak_rss_mb, plan_training_batch
from zoedge.runtime.patch import PATCH_FILE, PATCH_FILES, read_patch, write_patch
from zoedge.runtime.state import RunState
from zoedge.runtime.zo import DirectionCache, OptimizerState, ZOConfig, clip_grads, perturbation_cycle, update


def batch_indices(run_seed: int, step: int, n: int, batch: int) -> np.ndarray:
    """The step's minibatch, a pure function of (seed, step): resume needs no data-order state."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([run_seed, step, 0x5EED])))
    return rng.choice(n, size=min(batch, n), replace=False)


def train(bundle_dir: str | Path, data: str | Path, out: str | Path, cfg: TrainConfig, eval_path: str | Path | None = None,
          resume: bool = False, on_step: Callable[[dict], None] | None = None, log: Callable[[str], None] = print) -> dict:
    """Train and write the patch to `out`. resume=True continues the checkpoint in `out` if there is one, and
    otherwise starts fresh (so one fixed command line survives a kill at any moment)."""
    t0 = time.perf_counter()
    bundle = Bundle.open(bundle_dir)
    m = bundle.manifest
    cfg = resolve(cfg, m)
    out = Path(out)
    mode = _prepare_out(out, resume, log)
    if mode == "finished":
        return _finished(out, m, cfg, log)
    train_set = load_dataset(data, m)
    eval_set = load_dataset(eval_path, m, cfg.eval_limit) if eval_path else None

    tensors = bundle.initial_trainables()
    roles = {t.name: t.role for t in m.trainables}
    fwd = open_forward(bundle, tensors)
    evaluator = Evaluator(bundle, fwd, batch=cfg.batch_size)  # at the training batch: the arena keeps the largest
    zo_roles = cfg.roles
    head = head_names(m) if cfg.head_lr else None  # trained by its exact gradient: ZO leaves it alone
    if head:
        zo_roles = sorted({r for r in (cfg.roles or roles.values()) if r != "head"})
    zo_cfg = ZOConfig(optimizer=cfg.optimizer, eps=cfg.eps, perturbations=cfg.perturbations,
                      weight_decay=cfg.weight_decay, clip=cfg.clip, inplace=not cfg.batched, roles=zo_roles)
    moving = zo_cfg.select(tensors, roles)  # the arrays ZO perturbs and updates (shared with `tensors`)
    checked = {**moving, **({n: tensors[n] for n in head if n} if head else {})}  # what an update can change
    moved_bytes = sum(t.nbytes for t in moving.values())
    dirs = DirectionCache([(n, tuple(t.shape)) for n, t in moving.items()], keep=moved_bytes <= KEEP_Z_BYTES)
    outputs = (OUTPUT_LOGITS,) if m.task == "classify" else (OUTPUT_NLL, OUTPUT_TOKENS)
    if head:
        outputs = (OUTPUT_LOGITS, OUTPUT_FEATURES)
    features: list[np.ndarray] = []  # of this step's perturbed forwards (the exact head gradient reads them)
    width = cfg.perturbations + 1

    if mode == "resume":
        state = RunState.load(out, tensors, cfg.steps, width, m.bundle_id, trajectory_key(cfg))
        bundle.encoder.template = state.prompt_template or bundle.encoder.template
        log(f"resuming at step {state.step} of {cfg.steps}")
    else:
        state = RunState(bundle_id=m.bundle_id, config=trajectory_key(cfg), tensors=tensors,
                         trajectory=np.zeros((cfg.steps, width), np.float32))
        state.batch = cfg.batch_size
        if cfg.max_memory:  # planned once; a resumed run keeps the batch (it is part of the trajectory)
            state.batch = plan_training_batch(fwd, m, parse_size(cfg.max_memory) / 2**20, cfg.batch_size,
                                              moved_bytes, cfg.optimizer, log)
        _start(state, m, bundle, evaluator, train_set, eval_set, cfg, log)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.checkpoint_every:
            state.save(out)  # the head start is not lost to a kill before the first step's checkpoint
    evaluator.batch = state.batch
    origin = {**bundle.initial_trainables(), **state.start}
    limits = tensor_limits(origin)
    if mode == "resume":  # a checkpoint is checked like a bundle's initial values
        problem = tensor_problem(tensors, limits) or tensor_problem(state.best, limits)
        if problem:
            raise ZoedgeError(f"--resume: {out / CHECKPOINT_FILE}: {problem}: the saved run state is corrupt; "
                              "move it away to start fresh")
    opt = OptimizerState(step=state.step, buffers=state.optimizer)

    def loss_of(outs: list[np.ndarray], y) -> float:
        if head:
            features.append(outs[1])
        if m.task == "classify":
            return objectives.classification_loss(cfg.objective, outs[0], y)
        return objectives.lm_loss(outs[0], outs[1])

    def estimate(step: int, ids, mask, y) -> tuple[list[float], list[float]]:
        """The 2q losses and q projected gradients of this step (sequential in place, or one batched forward)."""
        if cfg.batched:
            fwd.load_perturbations([dict(dirs(cfg.seed, step, i)) for i in range(cfg.perturbations)], cfg.eps)
            outs = fwd.run_copies(ids, mask, outputs)
            losses = [loss_of([o[c] for o in outs], y) for c in range(m.copies)]
        else:
            losses = []
            for i in range(cfg.perturbations):
                losses += perturbation_cycle(moving, dirs, cfg.seed, step, i, cfg.eps,
                                             loss_at=lambda: loss_of(fwd(ids, mask, outputs), y))
        return losses, [(losses[2 * i] - losses[2 * i + 1]) / (2 * cfg.eps) for i in range(cfg.perturbations)]

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
        features.clear()
        losses, grads = estimate(step, ids, mask, y)
        problem = loss_problem(losses, grads, state, cfg.objective)
        if problem:
            log(after_failure(state, snap, step, problem, lr))
            continue
        if candidate is not None:
            snap = candidate
            if checkpoint_due:
                candidate.save(out)
        grads = clip_grads(grads, cfg.clip)
        update(moving, opt, zo_cfg, roles, dirs, cfg.seed, step, grads, lr)
        if head:  # the mean of the ± forwards' features is the unperturbed one to O(ε²)
            ce_head_step(np.mean(features, axis=0), y, tensors[head[0]], head[1] and tensors[head[1]],
                         lr / cfg.lr * cfg.head_lr)
        problem = tensor_problem(checked, limits)
        if problem:
            log(after_failure(state, snap, step, problem, lr))
            continue
        loss = float(np.mean(losses))
        state.trajectory[step - 1] = [*grads, lr]
        state.step = step
        state.loss_ref = loss if state.loss_ref is None else 0.95 * state.loss_ref + 0.05 * loss
        state.loss_floor = state.loss_ref if state.loss_floor is None else min(state.loss_floor, state.loss_ref)
        passed(state)
        record = {"step": step, "loss": loss, "lr": lr, "projected_grad": float(np.mean(grads))}
        if eval_set is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            te = time.perf_counter()
            metrics = evaluator(eval_set)
            record.update({f"eval_{k}": v for k, v in metrics.items()}, eval_seconds=time.perf_counter() - te)
            state.history.append({k: v for k, v in record.items() if k != "eval_seconds"})
            if state.best_score is None or score(metrics) > state.best_score:
                state.best_score, state.best_step, state.evals_since_best = score(metrics), step, 0
                state.best = {k: v.copy() for k, v in tensors.items()}
                snap = state.snapshot()  # a rollback never goes back past the best: its trajectory stays valid
            else:
                state.evals_since_best += 1
            if cfg.patience and state.evals_since_best >= cfg.patience:
                state.done = True
                log(f"early stop at step {step}: no eval improvement in {cfg.patience} evals")
        if on_step:
            on_step({**record, "total": cfg.steps, "rss_mb": peak_rss_mb()})

    # ---- the patch ----------------------------------------------------------------------------------------------
    state.done = True
    if cfg.checkpoint_every:
        state.save(out)  # a kill while the patch is written resumes here, not from an older checkpoint
    result = _write(out, m, bundle, cfg, state, evaluator, eval_set, len(train_set.texts), zo_cfg, fwd, opt, t0)
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return result


# ---- helpers (called by train, top to bottom) -------------------------------------------------------------------


def _prepare_out(out: Path, resume: bool, log: Callable[[str], None]) -> str:
    """'resume' (a checkpoint is there), 'finished' (--resume after the patch was written) or 'fresh'."""
    if out.exists() and not out.is_dir():
        raise ZoedgeError(f"--out {out}: exists and is not a directory")
    _remove_stale_temporaries(out)  # left by a kill during an atomic write; never a complete file
    if resume and (out / CHECKPOINT_FILE).is_file():
        return "resume"
    if resume and (out / PATCH_FILE).is_file():
        return "finished"
    if out.is_dir() and any(out.iterdir()):
        hint = "and holds no checkpoint to resume" if resume else "(use --resume to continue a run, or another --out)"
        raise ZoedgeError(f"--out {out}: directory is not empty {hint}")
    if resume:
        log(f"--resume: no checkpoint in {out} yet: starting fresh")
    return "fresh"


def _remove_stale_temporaries(out: Path) -> None:
    """Delete `.NAME.xxxx` temporaries of our own atomic writes (a SIGKILL mid-write leaves them behind)."""
    if not out.is_dir():
        return
    ours = (CHECKPOINT_FILE, *PATCH_FILES)
    for p in out.iterdir():
        if p.is_file() and any(p.name.startswith(f".{name}.") for name in ours):
            p.unlink(missing_ok=True)


def _start(state: RunState, m: Manifest, bundle: Bundle, evaluator: Evaluator, train_set: Dataset,
           eval_set: Dataset | None, cfg: TrainConfig, log: Callable[[str], None]) -> None:
    """Step 0: eval of the exported tensors, the head start, and the first best."""
    evaluator.batch = state.batch
    if eval_set is not None:
        state.start_metrics = evaluator(eval_set)
        log(f"start: eval {fmt(state.start_metrics)}")
    if cfg.prompt != "auto":
        bundle.encoder.template = cfg.prompt
    if cfg.head_init == "lp":
        hs = head_start(m, bundle, evaluator, train_set, state.tensors, cfg.lp_examples, cfg.seed,
                        cfg.prompt == "auto", eval_set, state.start_metrics, log)
        state.start, state.lp_metrics, state.prompt_search = hs.tensors, hs.metrics, hs.prompt_search
    state.prompt_template = bundle.encoder.template
    begin = state.lp_metrics or state.start_metrics
    if begin is not None:
        state.best_score = score(begin)
        state.history.append({"step": 0, **{f"eval_{k}": v for k, v in begin.items()}})
        state.best = {k: v.copy() for k, v in state.tensors.items()}


def _write(out: Path, m: Manifest, bundle: Bundle, cfg: TrainConfig, state: RunState, evaluator: Evaluator,
           eval_set: Dataset | None, examples: int, zo_cfg: ZOConfig, fwd, opt: OptimizerState, t0: float) -> dict:
    use_best = cfg.keep == "best" and eval_set is not None
    final_step = state.best_step if use_best else state.step
    final = state.best if use_best else state.tensors
    final_metrics = next((h for h in state.history if h["step"] == final_step), None) if use_best else None
    if eval_set is not None and final_metrics is None:
        final_metrics = {f"eval_{k}": v for k, v in evaluator(eval_set).items()}
    seconds = time.perf_counter() - t0
    metrics = {
        "eval_accuracy_start": (state.start_metrics or {}).get("accuracy"),
        "eval_accuracy_head_start": (state.lp_metrics or {}).get("accuracy"),
        "eval_accuracy": (final_metrics or {}).get("eval_accuracy"),
        "eval_loss": (final_metrics or {}).get("eval_loss"),
        "history": state.history,
    }
    meta = {
        "steps": int(final_step), "steps_run": int(state.step), "run_seed": cfg.seed, "zo": zo_cfg.to_dict(),
        "examples": examples, "metrics": metrics, "seconds": seconds,
        "hyperparameters": {**asdict(cfg), "batch_size": state.batch}, "rollbacks": state.rollbacks,
        "forward_passes": fwd.calls, "optimizer_state_bytes": opt.nbytes(),
    }
    if m.kind == "decoder" and m.task == "classify":
        meta["prompt_template"] = bundle.encoder.template  # the patch is read through this prompt
        if state.prompt_search:
            meta["prompt_search"] = state.prompt_search
    start = state.start
    if cfg.head_lr:  # replay rebuilds only what ZO moved: the head travels as it ended, beside the head start
        start = {**start, **{t.name: final[t.name] for t in m.trainables if t.role == "head"}}
    write_patch(out, m, final, state.trajectory[:final_step], start, meta)
    return _result(out, meta, metrics, seconds, fwd.calls)


def _result(out: Path, meta: dict, metrics: dict, seconds: float, forward_passes: int) -> dict:
    result = {
        "steps": meta["steps"], "steps_run": meta["steps_run"], "seconds": round(seconds, 2),
        "eval_accuracy_start": metrics.get("eval_accuracy_start"),
        "eval_accuracy_head_start": metrics.get("eval_accuracy_head_start"),
        "eval_accuracy": metrics.get("eval_accuracy"), "peak_rss_mb": round(peak_rss_mb(), 1),
        "forward_passes": forward_passes, "batch_size": meta["hyperparameters"]["batch_size"],
        "rollbacks": meta["rollbacks"], "optimizer_state_bytes": meta["optimizer_state_bytes"], "patch": str(out),
        "history": metrics.get("history", []),
    }
    if "prompt_template" in meta:
        result["prompt_template"] = meta["prompt_template"]
    return result


def _finished(out: Path, m: Manifest, cfg: TrainConfig, log: Callable[[str], None]) -> dict:
    """--resume on a directory whose patch is already written: the same run is done, say so and return it."""
    doc = read_patch(out)
    hp = doc.get("hyperparameters") if isinstance(doc.get("hyperparameters"), dict) else {}
    key = {k: v for k, v in trajectory_key(cfg).items() if k != "batch_size"}
    same = all(k in hp and hp[k] == v for k, v in key.items())
    if doc.get("bundle_id") != m.bundle_id or not same:
        raise ZoedgeError(f"--resume: {out} holds a finished patch of another bundle or with other settings")
    log(f"--resume: {out} already holds the finished patch of this run")
    return _result(out, doc, doc.get("metrics") or {}, float(doc.get("seconds") or 0.0), int(doc.get("forward_passes", 0)))
